#!/usr/bin/env bash
# Runs every shipped pipeline (and one sharded run merged back) with fam built at a base
# revision and with this checkout, and compares the outputs byte for byte.
#
#   scripts/compare-outputs.sh [BASE_REV]     (default: HEAD)
#
# Every file must be identical. manifest.json is compared as JSON without `timings_ms`
# (wall times differ from run to run) and, where only the newer side has them, the keys it
# added (listed in the report); `merged_from` names the shard folders, which are compared
# relative to their output folder. Prints one line per pipeline and exits 1 on a difference.
# Needs the models of scripts/fetch-models.sh. Both builds use the dev profile (dependencies
# optimized), the base one in .cache/compare/target.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
base_rev=${1:-HEAD}
work="$root/.cache/compare"
mkdir -p "$work"

if [ -d "$work/base" ]; then git worktree remove --force "$work/base"; fi
git worktree add --detach "$work/base" "$base_rev" >/dev/null
trap 'git worktree remove --force "$work/base"' EXIT
# The base build reuses the dependencies this checkout has built (hard links, no copies).
if [ ! -d "$work/target/debug" ] && [ -d "$root/target/debug" ]; then
    mkdir -p "$work/target"
    cp -al "$root/target/debug" "$work/target/debug"
    rm -f "$work/target/debug/fam-cli" "$work/target/debug/"libfam_plugin_*.so
fi
echo "building $base_rev ($(git rev-parse --short "$base_rev")) and this checkout" >&2
(cd "$work/base" && CARGO_TARGET_DIR="$work/target" cargo build -q)
cargo build -q

run_all() { # BIN OUT
    local bin=$1 out=$2
    rm -rf "$out"
    mkdir -p "$out"
    for p in pipelines/*.toml; do
        name=$(basename "$p" .toml)
        "$bin" -q run "$p" --output "$out/$name" >"$out/$name.log" 2>&1 || echo "exit $?" >>"$out/$name.log"
    done
    # A sharded run, merged back.
    for k in 1 2; do
        "$bin" -q run pipelines/retrieval-imagenet.toml --shard "$k/2" \
            --output "$out/shards/shard-$k" >>"$out/shards.log" 2>&1 || echo "exit $?" >>"$out/shards.log"
    done
    "$bin" -q merge --output "$out/merged" "$out/shards/shard-1" "$out/shards/shard-2" \
        >>"$out/shards.log" 2>&1 || echo "exit $?" >>"$out/shards.log"
}
run_all "$work/target/debug/fam-cli" "$work/out-base"
run_all "$root/target/debug/fam-cli" "$work/out-new"

python3 - "$work/out-base" "$work/out-new" <<'EOF'
import json, os, sys
base, new = sys.argv[1], sys.argv[2]
failed = False

def files(d):
    out = set()
    for r, _, fs in os.walk(d):
        for f in fs:
            out.add(os.path.relpath(os.path.join(r, f), d))
    return out

def manifest(path, root):
    m = json.load(open(path))
    m.pop("timings_ms", None)
    if "merged_from" in m:
        m["merged_from"] = [os.path.relpath(p, root) for p in m["merged_from"]]
    return m

names = sorted(set(os.listdir(base)) | set(os.listdir(new)))
for name in names:
    b, n = os.path.join(base, name), os.path.join(new, name)
    if name.endswith(".log") or not os.path.isdir(b):
        continue
    fb, fn = files(b), files(n)
    diffs, added = [], set()
    for f in sorted(fb | fn):
        if f not in fb or f not in fn:
            diffs.append(f"{f}: only in {'base' if f in fb else 'new'}")
            continue
        if os.path.basename(f) == "manifest.json":
            mb, mn = manifest(os.path.join(b, f), base), manifest(os.path.join(n, f), new)
            for k in set(mn) - set(mb):
                added.add(k)
                mn.pop(k)
            if mb != mn:
                keys = sorted(k for k in set(mb) | set(mn) if mb.get(k) != mn.get(k))
                diffs.append(f"{f}: differs in {keys}")
            continue
        if open(os.path.join(b, f), "rb").read() != open(os.path.join(n, f), "rb").read():
            diffs.append(f"{f}: bytes differ")
    count = len(fb)
    if diffs:
        failed = True
        print(f"{name}: {len(diffs)} difference(s) in {count} files")
        for d in diffs[:20]:
            print(f"  {d}")
    else:
        extra = f" (manifest adds {sorted(added)})" if added else ""
        print(f"{name}: {count} files identical{extra}")
    if count == 0:
        failed = True
        print(f"  {name}: no files: see {base}/{name}.log and {new}/{name}.log")
sys.exit(1 if failed else 0)
EOF
