#!/usr/bin/env bash
# Retrieval at scale (issue 6): the gallery is streamed (embeddings kept, feature maps only
# for the hits), so peak memory should not grow with the gallery. Makes galleries of 1,000
# and 10,000 distinct images (crops, flips and rescales of data/images, made with Pillow)
# and reports wall time and peak resident memory of `fam-cli run` on each.
#   scripts/scale-gallery.sh [sizes...]     (default: 1000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
fam=${FAM:-target/release/fam-cli}
sizes=("${@:-1000 10000}")
[[ $# -gt 0 ]] || sizes=(1000 10000)
work=${SCALE_DIR:-$(mktemp -d)}
for n in "${sizes[@]}"; do
    dir="$work/gallery-$n"
    if [[ ! -d $dir ]]; then
        python3 scripts/make-derived-gallery.py "$dir" "$n"
    fi
    cat > "$work/scale-$n.toml" <<TOML
[run]
batch_size = 16
output = "$work/out-$n"
[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = "$PWD/models/mobilenet_v2.safetensors"
layer = "features.18"
[similarity]
plugin = "metrics"
kind = "cosine"
[task]
kind = "retrieval"
queries = "$PWD/data/queries"
gallery = "$dir"
top_k = 5
cache = false
[[render]]
plugin = "render"
kind = "panel"
TOML
    /usr/bin/time -f "%e s wall, %M KiB peak RSS" -o "$work/time-$n" \
        "$fam" -q run "$work/scale-$n.toml" > "$work/report-$n" 2>&1
    echo "gallery $n: $(cat "$work/time-$n") ($(tail -1 "$work/report-$n"))"
done
