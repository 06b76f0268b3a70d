"""Writes a natural-image evaluation set DERIVED from the ten sample photos (data/images):
each query is one photo altered by a random crop, rescale, horizontal flip, colour change
(brightness, contrast, saturation) and, for some, a grey occluding rectangle; the gallery is
the ten unaltered photos. It is not an independent data set: each query was made from one
gallery photo (two gallery photos are a mirrored pair, two a stereo pair), and the ten
scenes are all there is. Deterministic for a given N (seeded); PNG, so no JPEG decoder
differences.

    python scripts/make-derived-eval-set.py OUT_DIR N [SOURCE_DIR [MIN_CROP]]

SOURCE_DIR (default data/images) can be another folder of photos, such as the aligned face
crops of data/faces/gallery with MIN_CROP 0.85 (default 0.6: the share of each side kept).
OUT_DIR/queries/<photo>__<i>.png, OUT_DIR/gallery/<photo>.png, OUT_DIR/transforms.json."""
import json
import os
import random
import sys

from PIL import Image, ImageEnhance

out, n = sys.argv[1], int(sys.argv[2])
source = sys.argv[3] if len(sys.argv) > 3 else "data/images"
min_crop = float(sys.argv[4]) if len(sys.argv) > 4 else 0.6
src = sorted(f for f in os.listdir(source) if f.lower().endswith((".png", ".jpg")))
os.makedirs(os.path.join(out, "queries"), exist_ok=True)
os.makedirs(os.path.join(out, "gallery"), exist_ok=True)
imgs = {}
for f in src:
    stem = os.path.splitext(f)[0]
    imgs[stem] = Image.open(os.path.join(source, f)).convert("RGB")
    imgs[stem].save(os.path.join(out, "gallery", stem + ".png"))
stems = sorted(imgs)
rng = random.Random(1000 + n)
log = []
for i in range(n):
    stem = stems[i % len(stems)]
    im = imgs[stem]
    w, h = im.size
    t = {"query": f"{stem}__{i:04d}.png", "source": stem}
    s = rng.uniform(min_crop, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    side = rng.randint(180, 360)
    v = im.crop((x, y, x + cw, y + ch))
    v = v.resize((side, max(1, round(side * ch / cw))), Image.BILINEAR)
    t.update(crop=[x, y, cw, ch], size=list(v.size))
    if rng.random() < 0.5:
        v = v.transpose(Image.FLIP_LEFT_RIGHT)
        t["flip"] = True
    for name, enh in [("brightness", ImageEnhance.Brightness),
                      ("contrast", ImageEnhance.Contrast),
                      ("saturation", ImageEnhance.Color)]:
        f = rng.uniform(0.7, 1.3)
        v = enh(v).enhance(f)
        t[name] = round(f, 3)
    if rng.random() < 0.4:
        vw, vh = v.size
        ow, oh = int(vw * rng.uniform(0.15, 0.3)), int(vh * rng.uniform(0.15, 0.3))
        ox, oy = rng.randint(0, vw - ow), rng.randint(0, vh - oh)
        v.paste((128, 128, 128), (ox, oy, ox + ow, oy + oh))
        t["occluder"] = [ox, oy, ow, oh]
    v.save(os.path.join(out, "queries", t["query"]))
    log.append(t)
with open(os.path.join(out, "transforms.json"), "w") as f:
    json.dump(log, f, indent=1)
open(os.path.join(out, ".done"), "w").close()
print(f"wrote {n} derived queries and {len(stems)} gallery photos to {out}")
