"""Draws the small synthetic "scans" that the bundled questions refer to (images/*.png).

    python medvl_engine/data/bundled/make_images.py     # rewrites the PNGs next to this file

They are cartoons, not patient data: shapes in the places the questions ask about (an opacity in the
right lower zone, a biconvex hyperdense collection, a hypodense liver lesion...), 128 px and a few KB
each, drawn deterministically so the committed files can be regenerated pixel for pixel.
Radiographs and CT follow the radiological convention: the patient's right is on the viewer's left.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128


def _chest(heart_half_width: int, opacity: bool) -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 20)
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 4, 120, 124), fill=120)  # soft tissue of the thorax
    draw.ellipse((16, 14, 60, 112), fill=40)  # right lung (viewer's left)
    draw.ellipse((68, 14, 112, 112), fill=40)  # left lung
    draw.rectangle((58, 4, 70, 124), fill=210)  # spine and mediastinum
    for y in range(22, 100, 12):  # posterior ribs
        draw.arc((14, y - 6, 62, y + 14), 200, 340, fill=150, width=2)
        draw.arc((66, y - 6, 114, y + 14), 200, 340, fill=150, width=2)
    # Heart shadow, mostly on the patient's left; its width against the thorax (112 px) gives the
    # cardiothoracic ratio: 2 * 22 / 112 = 0.39 (normal) and 2 * 33 / 112 = 0.59 (enlarged, > 0.5).
    centre = 70
    draw.ellipse((centre - heart_half_width, 62, centre + heart_half_width, 104), fill=190)
    draw.chord((12, 100, 62, 124), 180, 360, fill=170)  # right hemidiaphragm
    draw.chord((66, 102, 116, 126), 180, 360, fill=170)  # left hemidiaphragm
    if opacity:
        draw.ellipse((22, 72, 52, 100), fill=165)  # right lower zone consolidation
    return image.filter(ImageFilter.GaussianBlur(1.5))


def _ct_head_epidural() -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((14, 8, 114, 120), fill=105)  # brain
    draw.ellipse((52, 50, 60, 72), fill=40)  # lateral ventricles (CSF is dark on CT)
    draw.ellipse((66, 50, 74, 72), fill=40)
    # Biconvex (lentiform) hyperdense collection against the inner table on the patient's left; the
    # skull drawn over it hides its outer half.
    draw.ellipse((88, 34, 112, 94), fill=200)
    draw.ellipse((14, 8, 114, 120), outline=245, width=7)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def _mri_brain_t2() -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((14, 8, 114, 120), fill=90)  # scalp fat
    draw.ellipse((18, 12, 110, 116), fill=10)  # skull: no signal
    draw.ellipse((22, 16, 106, 112), fill=120)  # brain
    draw.polygon([(56, 40), (62, 64), (54, 86), (48, 64)], fill=235)  # ventricles: CSF is bright on T2
    draw.polygon([(72, 40), (66, 64), (74, 86), (80, 64)], fill=235)
    return image.filter(ImageFilter.GaussianBlur(1.0))


def _ct_abdomen_liver_cyst() -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 22, 122, 110), fill=95)  # body wall and fat
    draw.ellipse((12, 30, 70, 90), fill=140)  # liver on the patient's right
    draw.ellipse((28, 46, 46, 64), fill=60)  # round lesion of water attenuation
    draw.ellipse((84, 36, 108, 62), fill=135)  # spleen
    draw.ellipse((40, 76, 54, 94), fill=150)  # kidneys
    draw.ellipse((76, 76, 90, 94), fill=150)
    draw.ellipse((57, 84, 73, 102), fill=250)  # vertebral body
    draw.ellipse((62, 66, 70, 74), fill=170)  # aorta
    return image.filter(ImageFilter.GaussianBlur(0.7))


def _forearm_fracture() -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 15)
    draw = ImageDraw.Draw(image)
    draw.rectangle((26, 0, 102, 127), fill=70)  # soft tissue
    # Radius and ulna, each broken across its shaft at mid-height with the distal part shifted.
    for x in (42, 74):
        draw.rectangle((x, 0, x + 12, 58), fill=215)
        draw.rectangle((x + 5, 64, x + 17, 127), fill=215)
        draw.line((x + 2, 4, x + 2, 56), fill=170, width=2)  # cortex over marrow
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _histology(rng: random.Random, *, adipose: bool) -> Image.Image:
    if adipose:
        image = Image.new("RGB", (SIZE, SIZE), (250, 246, 248))
        draw = ImageDraw.Draw(image)
        for cy in range(0, SIZE + 24, 24):
            for cx in range(0, SIZE + 24, 24):
                x, y = cx + rng.randint(-4, 4) + (12 if cy % 48 else 0), cy + rng.randint(-4, 4)
                draw.ellipse((x - 13, y - 12, x + 13, y + 12), outline=(222, 120, 170), width=2)
                if rng.random() < 0.2:  # a flattened nucleus pushed to the cell's rim
                    draw.ellipse((x + 8, y - 2, x + 13, y + 2), fill=(90, 40, 130))
        return image
    image = Image.new("RGB", (SIZE, SIZE), (236, 150, 190))  # eosin-pink stroma
    draw = ImageDraw.Draw(image)
    for _ in range(70):
        x, y = rng.randint(0, SIZE), rng.randint(0, SIZE)
        r = rng.choice((3, 3, 4, 4, 6, 8, 10))  # nuclei of very different sizes: pleomorphism
        shade = rng.randint(60, 110)
        draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=(shade, shade // 3, shade + 60))
    return image.filter(ImageFilter.GaussianBlur(0.5))


def images() -> dict[str, Image.Image]:
    rng = random.Random(20250802)
    return {
        "cxr_normal.png": _chest(heart_half_width=22, opacity=False),
        "cxr_right_lower_opacity.png": _chest(heart_half_width=22, opacity=True),
        "cxr_cardiomegaly.png": _chest(heart_half_width=33, opacity=False),
        "ct_head_epidural.png": _ct_head_epidural(),
        "mri_brain_t2.png": _mri_brain_t2(),
        "ct_abdomen_liver_cyst.png": _ct_abdomen_liver_cyst(),
        "xray_forearm_fracture.png": _forearm_fracture(),
        "histology_he_pleomorphic.png": _histology(rng, adipose=False),
        "histology_adipose.png": _histology(rng, adipose=True),
    }


def main() -> None:
    folder = Path(__file__).parent / "images"
    folder.mkdir(exist_ok=True)
    for name, image in images().items():
        image.save(folder / name, optimize=True)
        print(f"{folder / name}: {(folder / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
