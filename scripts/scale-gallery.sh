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
        python3 - "$dir" "$n" <<'PY'
import os, random, sys
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
src = sorted(f for f in os.listdir("data/images") if f.lower().endswith((".png", ".jpg")))
imgs = [Image.open(os.path.join("data/images", f)).convert("RGB") for f in src]
rng = random.Random(n)
for i in range(n):
    im = imgs[i % len(imgs)]
    w, h = im.size
    s = rng.uniform(0.5, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    v = im.crop((x, y, x + cw, y + ch)).resize((rng.randint(160, 320), rng.randint(160, 320)))
    if rng.random() < 0.5:
        v = v.transpose(Image.FLIP_LEFT_RIGHT)
    v.save(os.path.join(out, f"g{i:05d}.jpg"), quality=85)
PY
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
