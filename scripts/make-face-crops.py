#!/usr/bin/env python3
"""Cuts the 112x112 face crops used by pipelines/retrieval-faces.toml from the sample photos.

Boxes are (left, top, right, bottom) in the source image, chosen so that the eyes land near
where MobileFaceNet's alignment puts them (about (38, 52) and (74, 52) in the 112x112 crop).

    pip install pillow
    python3 scripts/make-face-crops.py [path/to/skimage/data/camera.png]
"""
import os, sys
from PIL import Image, ImageEnhance, ImageOps

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
img = lambda *p: os.path.join(root, *p)
S = (112, 112)

astronaut = Image.open(img("data/images/astronaut.png")).convert("RGB")
BOX = (148, 31, 300, 183)          # Eileen Collins: eyes at about (200, 102) and (249, 102)
base = astronaut.crop(BOX).resize(S, Image.BILINEAR)
base.save(img("data/faces/gallery/astronaut.png"))
# The same person, changed: mirrored; re-cropped (shifted, 8% wider); re-lit (darker, warmer).
ImageOps.mirror(base).save(img("data/faces/queries/astronaut_flipped.png"))
astronaut.crop((136, 25, 300, 189)).resize(S, Image.BILINEAR).save(img("data/faces/queries/astronaut_recropped.png"))
relit = ImageEnhance.Brightness(base).enhance(0.65)
relit = ImageEnhance.Contrast(relit).enhance(1.3)
r, g, b = relit.split()
Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.1))), g, b.point(lambda v: int(v * 0.85)))).save(
    img("data/faces/queries/astronaut_relit.png"))

# Other subjects: the cameraman (CC0, scikit-image camera.png) and, as a non-human impostor,
# the cat's face.
camera = sys.argv[1] if len(sys.argv) > 1 else img("data/images/camera.png")
Image.open(camera).convert("RGB").crop((188, 78, 300, 190)).resize(S, Image.BILINEAR).save(
    img("data/faces/gallery/cameraman.png"))
Image.open(img("data/images/chelsea.png")).convert("RGB").crop((110, 20, 350, 260)).resize(S, Image.BILINEAR).save(
    img("data/faces/gallery/chelsea_face.png"))
print("face crops written to data/faces/")
