"""Writes N distinct gallery images derived from the sample photos (data/images): random
crops, rescales to 160-320 px and horizontal flips, as JPEG. Deterministic for a given N.
Used by scripts/scale-gallery.sh and scripts/bench-index.sh.
    python scripts/make-derived-gallery.py OUT_DIR N"""
import os
import random
import sys

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
open(os.path.join(out, ".done"), "w").close()
