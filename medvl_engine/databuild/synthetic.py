"""Generated image-caption data for the tests and benchmarks of `build-data` (no download needed).

    rows = list(synthetic_captions(100_000, seed=0))      # dicts: id, caption, context
    write_image(path, 400, 380)                            # a small PNG/JPEG of the given size

Captions come in three kinds, by a seeded draw: medical figure captions built from imaging, anatomy and
finding phrases (many lexicon terms), chart captions (few or none), and near-duplicates of an earlier
medical caption (a word or two changed). Nothing here is used by the stages themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

MODALITIES = ("Axial CT scan", "Coronal T2-weighted MRI", "Chest X-ray", "Abdominal ultrasound",
              "Contrast-enhanced CT", "Sagittal MRI", "PET-CT image", "Histopathology (H&E, x200)",
              "Fundus photograph", "Transthoracic echocardiography")
ORGANS = ("right upper lobe", "left kidney", "liver", "pancreatic head", "lumbar spine", "left ventricle",
          "thyroid gland", "mediastinum", "gallbladder", "right femur", "frontal lobe", "bladder")
FINDINGS = ("a spiculated mass", "a well-defined cyst", "multiple nodules", "a large hematoma", "pleural effusion",
            "diffuse ground-glass opacity", "a calcified lesion", "marked wall thickening", "a necrotic tumor",
            "an abscess with peripheral enhancement", "a displaced fracture", "lymphadenopathy")
DETAILS = ("suggesting metastasis", "consistent with adenocarcinoma", "with surrounding edema",
           "compatible with lymphoma", "after chemotherapy", "confirmed by biopsy", "with mild hydronephrosis",
           "without invasion of adjacent vessels", "indicating inflammation", "with central necrosis")
CHARTS = ("Bar chart of mean response times across four sessions.",
          "Line plot showing the number of participants per year.",
          "Flow diagram of the study design and the number of records screened.",
          "Scatter plot of the two questionnaire scores with the regression line.",
          "Box plots of reaction times in the three groups.",
          "Schematic overview of the proposed software architecture.")
WORD_SWAPS = {"shows": "demonstrates", "a": "one", "with": "and", "of": "in"}


def medical_caption(rng: np.random.Generator) -> str:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    return (f"{pick(MODALITIES)} of the {pick(ORGANS)} shows {pick(FINDINGS)} {pick(DETAILS)}; "
            f"follow-up {pick(MODALITIES).lower()} showed {pick(FINDINGS)} in the {pick(ORGANS)}.")


def near_duplicate(caption: str, rng: np.random.Generator) -> str:
    """The caption with one or two small words swapped for synonyms (same meaning, different text)."""
    words = caption.split(" ")
    spots = [i for i, w in enumerate(words) if w in WORD_SWAPS]
    for i in rng.permutation(spots)[:2]:
        words[i] = WORD_SWAPS[words[i]]
    return " ".join(words)


def synthetic_captions(n: int, *, seed: int = 0, chart_share: float = 0.3,
                       duplicate_share: float = 0.15) -> Iterator[dict]:
    """`n` rows {id, caption, context}: medical, chart and near-duplicate captions in seeded proportions."""
    rng = np.random.default_rng(seed)
    recent: list[str] = []
    for i in range(n):
        draw = rng.random()
        if draw < chart_share:
            caption, context = CHARTS[int(rng.integers(len(CHARTS)))], ""
        elif draw < chart_share + duplicate_share and recent:
            caption = near_duplicate(recent[int(rng.integers(len(recent)))], rng)
            context = ""
        else:
            caption = medical_caption(rng)
            context = f"As shown in Figure {i % 7 + 1}, the lesion was resected."
            recent = (recent + [caption])[-64:]
        yield {"id": f"pmc-{i:07d}", "caption": caption, "context": context}


def write_image(path: str | Path, width: int, height: int, *, seed: int = 0) -> Path:
    """A noisy grey-level picture of `width` x `height` (format from the suffix: .png or .jpg)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width)) * 64 + np.linspace(64, 192, width)[None, :]).astype(np.uint8)
    Image.fromarray(pixels, mode="L").convert("RGB").save(path)
    return path
