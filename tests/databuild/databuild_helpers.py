"""Generated image-caption data for the build-data tests, a bag-of-words test encoder, file helpers.

`caption_source` writes a jsonl source whose rows cover every case a stage decides: medical captions
with images of several sizes and formats, a chart caption, a truncated image, a missing image file,
a file that is not an image, an exact and a near-duplicate caption, a two-image row, a row without a
caption and a line that is not JSON. `EXPECTED` says what each stage does with each row.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from medvl_engine.databuild.synthetic import write_image

MEDICAL = ("Axial contrast-enhanced CT of the abdomen shows a hypodense lesion in the liver with peripheral "
           "enhancement, consistent with an abscess; the spleen and pancreas are normal.")
NEAR_DUPLICATE = MEDICAL.replace("shows", "demonstrates")
OTHER = ("Histopathology of the biopsy specimen (H&E stain) demonstrates adenocarcinoma with glandular "
         "architecture, atypia and invasion of the submucosa.")
MRI = ("Sagittal T2-weighted MRI of the lumbar spine reveals disc herniation at L4-L5 compressing the spinal "
       "cord, with edema of the vertebral body.")
CHEST = "Chest X-ray shows a right upper lobe consolidation and a small pleural effusion suggesting pneumonia."
CHART = "Bar chart of the mean response times of the three groups across four sessions."

# id -> (caption, images as (name, width, height) or a special marker, filter-text, filter-image, dedup)
ROWS = [
    ("r0", MEDICAL, [("r0.png", 400, 360)], "keep", "keep", "keep"),
    ("r1", CHART, [("r1.png", 500, 500)], "too few medical terms", None, None),
    ("r2", OTHER, [("r2.jpg", 340, 336)], "keep", "keep", "keep"),
    ("r3", MRI, [("r3.png", 200, 400)], "keep", "image too small", None),
    ("r4", CHEST, ["truncated"], "keep", "truncated image", None),
    ("r5", MRI, ["missing"], "keep", "missing image file", None),
    ("r6", OTHER, ["not-an-image"], "keep", "undecodable image", None),
    ("r7", MEDICAL, [("r7.jpg", 640, 480)], "keep", "keep", "near-duplicate caption"),  # exact duplicate
    ("r8", NEAR_DUPLICATE, [("r8.png", 400, 400)], "keep", "keep", "near-duplicate caption"),
    ("r9", CHEST, [("r9a.png", 400, 400), ("r9b.jpg", 512, 400)], "keep", "keep", "keep"),
    ("r10", MRI, [("r10a.png", 400, 400), ("r10b.png", 100, 100)], "keep", "image too small", None),
    ("r11", MRI, [("r11.jpg", 800, 600)], "keep", "keep", "keep"),
]


def write_source(folder: Path, rows=ROWS, *, bad_rows: bool = True) -> Path:
    """The jsonl source (relative image paths, as PMC-OA ships them) and its images under `folder`."""
    images = folder / "images"
    lines = []
    for i, (row_id, caption, specs, *_) in enumerate(rows):
        names = []
        for k, spec in enumerate(specs):
            if spec == "missing":
                names.append(f"images/{row_id}-missing.png")
            elif spec == "truncated":
                path = write_image(images / f"{row_id}.jpg", 400, 400, seed=i)
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                names.append(f"images/{row_id}.jpg")
            elif spec == "not-an-image":
                (images / f"{row_id}.png").write_bytes(b"this is not a picture" * 10)
                names.append(f"images/{row_id}.png")
            else:
                name, width, height = spec
                write_image(images / name, width, height, seed=10 * i + k)
                names.append(f"images/{name}")
        image = names[0] if len(names) == 1 else names
        lines.append(json.dumps({"id": row_id, "image": image, "caption": caption,
                                 "in_text_mention": [{"tokens": ["The", "lesion", "is", "shown", "in", "Fig", "1"]}]}))
    if bad_rows:
        lines.insert(5, json.dumps({"id": "no-caption", "image": "images/r0.png"}))
        lines.insert(8, "{this line is not json")
    source = folder / "source.jsonl"
    source.write_text("\n".join(lines) + "\n")
    return source


class HashedWordsEncoder:
    """Test double of a sentence encoder: normalised counts of hashed lower-case words (4096 buckets).

    Exact duplicates score 1.0, a caption with one word of ~25 swapped ~0.96, the test's different
    captions below 0.5: what the dedup tests need to know in advance, which a random model cannot give.
    """

    dim = 4096

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True, **_):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().replace(",", " ").replace(".", " ").split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def folder_bytes(folder: Path, names=("kept.jsonl", "dropped.jsonl", "summary.json")) -> dict[str, bytes]:
    return {name: (Path(folder) / name).read_bytes() for name in names}
