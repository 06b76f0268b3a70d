#!/usr/bin/env bash
# The gallery index at scale (docs/gallery-index.md), with the release build:
#  1. indexing throughput: `fam-cli index` on a gallery of G distinct images (random crops,
#     flips and rescales of data/images, made with Pillow), MobileNetV2 at 224 px;
#  2. search: `fam-cli run` with `task.index` on generated index parts of 10^5 and 10^6
#     embeddings of 1,280 values (written directly with NumPy, in parts of 100,000 rows,
#     with the real model's fingerprint; rows point at the sample photos, so hits are real
#     images), for 1, 100 and 1,000 queries, top 1 hit each: the search time (manifest
#     `timings_ms.search`), the peak resident memory when the search ends (its log line),
#     and the peak resident memory and wall time of the whole run.
#   scripts/bench-index.sh                   (G = 20000, sizes 100000 1000000)
#   GALLERY=2000 SIZES="100000" QUERIES="1 100" scripts/bench-index.sh
#   GALLERY=0 ...     (no indexing benchmark: the model fingerprint comes from data/images)
#   REPEAT=5 ...      (runs per search, default 3: the median time and the largest memory)
# Needs target/release (cargo build --release), python3 with Pillow for the gallery, and
# NumPy (the zoo environment, .cache/zoo-venv, has it) for the generated parts.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
fam=${FAM:-$root/target/release/fam-cli}
gallery_n=${GALLERY:-20000}
sizes=(${SIZES:-100000 1000000})
queries=(${QUERIES:-1 100 1000})
repeat=${REPEAT:-3}
work=${BENCH_DIR:-$root/.cache/bench-index}
py=${PYTHON:-$root/.cache/zoo-venv/bin/python}
[[ -x $py ]] || py=python3
mkdir -p "$work"

pipeline() { # pipeline FILE QUERIES INDEX [GALLERY]
    cat > "$1" <<TOML
[run]
batch_size = 16
output = "$work/out"
[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = "$root/models/mobilenet_v2.safetensors"
layer = "features.18"
[similarity]
plugin = "metrics"
kind = "cosine"
[task]
kind = "retrieval"
queries = "$2"
index = "$3"
${4:+gallery = \"$4\"}
top_k = 1
exclude_self = false
cache = false
[[render]]
plugin = "render"
kind = "scores"
TOML
}

# 1. Indexing.
gdir="$work/gallery-$gallery_n"
[[ $gallery_n == 0 ]] && gdir="$root/data/images"
if [[ $gallery_n != 0 && ! -f $gdir/.done ]]; then
    "$py" scripts/make-derived-gallery.py "$gdir" "$gallery_n"
fi
rm -rf "$work/index-$gallery_n"
pipeline "$work/index.toml" "$root/data/queries" "$work/index-$gallery_n" "$gdir"
/usr/bin/time -f "%e %M" -o "$work/time-index" "$fam" -q index "$work/index.toml" > /dev/null 2> "$work/log-index"
read -r wall kib < "$work/time-index"
[[ $gallery_n == 0 ]] || "$py" - "$work/index-$gallery_n" "$gallery_n" "$wall" "$kib" <<'PY'
import json, sys, glob
d, n, wall, kib = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
h = json.load(open(glob.glob(d + "/part-*.json")[0]))
t = h["timings_ms"]
print(f"index: {n} images, {h['rows']} embedded in {wall:.1f} s = {n / wall:.1f} images/s "
      f"(decode {t['decode_preprocess'] / 1e3:.1f} s, forward {t['forward'] / 1e3:.1f} s, load {t['load_models'] / 1e3:.1f} s), "
      f"peak RSS {kib / 1024:.0f} MiB")
PY

# 2. Search against generated parts.
template=$(ls "$work/index-$gallery_n"/part-*.json | head -1)
for s in "${sizes[@]}"; do
    gen="$work/gen-$s"
    if [[ ! -f $gen/.done ]]; then
        rm -rf "$gen"
        "$py" - "$gen" "$s" "$template" <<'PY'
import hashlib, json, os, sys
import numpy as np
out, n, template = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out)
head = json.load(open(template))
d, per = 1280, 100_000
photos = sorted(os.path.abspath(os.path.join("data/images", f)) for f in os.listdir("data/images")
                if f.lower().endswith((".png", ".jpg")))
facts = [(p, os.path.getsize(p), hashlib.sha256(open(p, "rb").read()).hexdigest()) for p in photos]
parts = (n + per - 1) // per
listing = hashlib.sha256(f"generated {n}".encode()).hexdigest()
rng = np.random.default_rng(n)
for k in range(1, parts + 1):
    first, rows = (k - 1) * per, min(per, n - (k - 1) * per)
    stem = f"part-{k:05d}-of-{parts:05d}"
    emb = np.lib.format.open_memmap(f"{out}/{stem}.f32.npy", mode="w+", dtype="<f4", shape=(rows, d))
    for a in range(0, rows, 10_000):
        b = min(rows, a + 10_000)
        # Pooled ReLU features are non-negative.
        emb[a:b] = np.abs(rng.standard_normal((b - a, d), dtype=np.float32))
    emb.flush()
    del emb
    with open(f"{out}/{stem}.items.jsonl", "w") as f:
        for r in range(rows):
            i = first + r
            p, size, sha = facts[i % len(facts)]
            f.write(json.dumps({"file": i, "path": p, "size": size, "sha256": sha,
                                "same_name_before": i // len(facts)}) + "\n")
    h = dict(head, listing={"files": n, "sha256": listing}, part=k, parts=parts,
             first_file=first, files=rows, rows=rows, dims=d, embeddings=f"{stem}.f32.npy",
             items=f"{stem}.items.jsonl", failures=[])
    json.dump(h, open(f"{out}/{stem}.json", "w"), indent=2)
open(f"{out}/.done", "w").close()
PY
    fi
    for q in "${queries[@]}"; do
        qdir="$work/queries-$q"
        if [[ ! -d $qdir ]]; then
            mkdir -p "$qdir"
            mapfile -t photos < <(ls "$root"/data/images/*.{png,jpg} "$root"/data/queries/*.png)
            for ((i = 0; i < q; i++)); do
                src=${photos[$((i % ${#photos[@]}))]}
                ln -s "$src" "$qdir/q$(printf %05d "$i").${src##*.}"
            done
        fi
        pipeline "$work/search.toml" "$qdir" "$gen"
        runs=()
        for ((r = 0; r < repeat; r++)); do
            rm -rf "$work/out"
            # Read the parts first, so that every run finds them in the page cache alike.
            cat "$gen"/*.npy > /dev/null
            NO_COLOR=1 /usr/bin/time -f "%e %M" -o "$work/time-search" "$fam" run "$work/search.toml" > /dev/null 2> "$work/log-search"
            read -r wall kib < "$work/time-search"
            rss=$(grep -o 'peak_rss_mib=[0-9.]*' "$work/log-search" | tail -1 | cut -d= -f2)
            search=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["timings_ms"]["search"])' "$work/out/manifest.json")
            runs+=("$search,$rss,$wall,$kib")
        done
        "$py" - "$s" "$q" "${runs[@]}" <<'PY'
import statistics, sys
s, q = int(sys.argv[1]), int(sys.argv[2])
runs = [tuple(float(x) for x in r.split(",")) for r in sys.argv[3:]]
search = statistics.median(r[0] for r in runs) / 1e3
rss = max(r[1] for r in runs)
wall = statistics.median(r[2] for r in runs)
kib = max(r[3] for r in runs)
gb = s * 1280 * 4 / 1e9
print(f"search: {s:>8} x 1280 ({gb:.2f} GB), {q:>5} queries: search {search:7.2f} s median of {len(runs)} "
      f"({gb / search:.1f} GB/s, {s * q / search / 1e6:.0f} M scores/s), "
      f"peak RSS at the end of the search {rss:.0f} MiB; whole run {wall:.1f} s, peak RSS {kib / 1024:.0f} MiB")
PY
    done
done
