"""Prints the markdown tables of docs/evaluation.md from the eval.json files that
scripts/eval-scale.sh wrote: per run, each method's mean and 95% bootstrap interval per
metric, the items it has a map for, the undefined values counted, the extra forward passes
per map, and FAM's wins and losses (a win only where the intervals separate). Standard
library only.

    python3 scripts/eval-tables.py [.cache/eval-scale/results]"""
import json
import math
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else ".cache/eval-scale/results"
METRICS = [
    ("average_drop", "AvgDrop% ↓", True, 1),
    ("increase_in_confidence", "IC% ↑", False, 1),
    ("deletion_auc", "Del/s ↓", True, 3),
    ("insertion_auc", "Ins/s ↑", False, 3),
    ("deletion_auc_range", "Del(rng) ↓", True, 3),
    ("insertion_auc_range", "Ins(rng) ↑", False, 3),
]


def defined(e):
    return e["n"] > 0 and e["mean"] is not None and not (
        isinstance(e["mean"], float) and math.isnan(e["mean"])
    )


def cell(e, digits):
    if not defined(e):
        return "—"
    return f"{e['mean']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def separated(a, b):
    return defined(a) and defined(b) and (a["lo"] > b["hi"] or b["lo"] > a["hi"])


for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "eval.json")
    if not os.path.isfile(path):
        continue
    r = json.load(open(path))
    s = r["summaries"]
    print(f"#### {name}\n")
    print(
        f"{r['backbone']}, {r['similarity']}, target: {r['target']}; removal `{r['removal']}`, "
        f"{r['steps']} steps, {s[0]['items']} items, 95% intervals from {r['resamples']} "
        "bootstrap resamples.\n"
    )
    shown = [m for m in METRICS if any(defined(x[m[0]]) for x in s)]
    print("| method | items | " + " | ".join(m[1] for m in shown) + " | passes/map |")
    print("|---|---|" + "---|" * (len(shown) + 1))
    for x in s:
        cells = [cell(x[k], d) for k, _, _, d in shown]
        items = x["items"] if x["items"] else "0 (no map)"
        print(f"| {x['method']} | {items} | " + " | ".join(cells) + f" | {x['passes_per_map']} |")
    undefined = [
        f"{label.split()[0]} {s[0][k]['undefined']}"
        for k, label, _, _ in shown
        if s[0][k]["undefined"]
    ]
    if undefined:
        print(f"\nUndefined and left out (of {s[0]['items']}): " + ", ".join(undefined) + ".")
    print()
    for other in s[1:]:
        words = []
        for k, label, lower, _ in shown:
            a, b = s[0][k], other[k]
            if not (defined(a) and defined(b)):
                continue
            if not separated(a, b):
                w = "tie"
            elif (a["mean"] < b["mean"]) == lower:
                w = "**win**"
            else:
                w = "loss"
            words.append(f"{label.split()[0]} {w}")
        said = ", ".join(words) if words else "no map for any item"
        print(f"- {s[0]['method']} vs {other['method']}: {said}")
    print()
