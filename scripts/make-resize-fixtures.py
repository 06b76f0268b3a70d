#!/usr/bin/env python3
"""Writes fam-engine/tests/fixtures/pil-resize.json: what Pillow's Image.resize(BILINEAR) and
torchvision's Resize + CenterCrop make of synthetic images over many sizes and of the PNG
photos in data/images, as sha256 digests of the RGB bytes. The Rust test
`preprocess::tests::resize_is_byte_identical_to_pil` recomputes them.

    .cache/zoo-venv/bin/python scripts/make-resize-fixtures.py   # (Pillow, torchvision)
"""
import hashlib
import json
import os
import random

import PIL
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def synthetic(w, h):
    """The test image: gradients, a checkerboard and hashed noise, per channel. The Rust
    test builds the same bytes (`synthetic` in preprocess.rs)."""
    data = bytearray(w * h * 3)
    for y in range(h):
        for x in range(w):
            i = (y * w + x) * 3
            data[i] = (x * 255 // max(w - 1, 1)) & 255
            data[i + 1] = 255 if ((x // 3 + y // 3) % 2) else 0
            data[i + 2] = ((x * 2654435761 + y * 40503) >> 7) & 255
    return Image.frombytes("RGB", (w, h), bytes(data))


def digest(img):
    return hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()


rng = random.Random(17)
sizes = [1, 2, 3, 5, 7, 8, 13, 28, 31, 64, 97, 112, 224, 256, 299, 333, 512, 640]
cases = set()
for a in sizes:
    for b in sizes:
        cases.add((a, rng.choice(sizes), b, rng.choice(sizes)))
while len(cases) < 400:
    cases.add(tuple(rng.randint(1, 700) for _ in range(4)))
synthetic_cases = []
for (w, h, ow, oh) in sorted(cases):
    out = synthetic(w, h).resize((ow, oh), Image.BILINEAR)
    synthetic_cases.append({"in": [w, h], "out": [ow, oh], "sha256": digest(out)})

photos = []
from torchvision import transforms

for name in sorted(os.listdir(os.path.join(ROOT, "data", "images"))):
    if not name.endswith(".png"):
        continue
    img = Image.open(os.path.join(ROOT, "data", "images", name)).convert("RGB")
    for resize, crop in [(256, 224), (232, 224), (160, 128), (37, 32)]:
        t = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])
        photos.append(
            {"image": name, "resize": resize, "crop": crop, "sha256": digest(t(img))}
        )
    for (ow, oh) in [(224, 224), (112, 112), (28, 28), (1000, 77)]:
        photos.append({"image": name, "out": [ow, oh], "sha256": digest(img.resize((ow, oh), Image.BILINEAR))})

out = os.path.join(ROOT, "fam-engine", "tests", "fixtures", "pil-resize.json")
with open(out, "w") as f:
    json.dump(
        {
            "generator": f"scripts/make-resize-fixtures.py, Pillow {PIL.__version__}",
            "synthetic": synthetic_cases,
            "photos": photos,
        },
        f,
        indent=0,
    )
    f.write("\n")
print("wrote", out, len(synthetic_cases), "synthetic cases,", len(photos), "photo cases")
