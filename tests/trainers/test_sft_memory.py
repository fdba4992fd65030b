"""SFT's memory is flat in the data: rows are encoded a batch at a time, so 4x the rows is not 4x the memory.

One 448x448 image is 1,024 patches of 1,176 float32 values at Qwen2.5-VL's default pixel limits (~4.8 MB): a
run that encoded every row before its first step held ~850 GB per rank for PMC-VQA's 176,896 rows. Measured here
on a 2-core CPU (two steps of 4 rows): peak RSS 1.40 GB at 48 rows and 2.12 GB at 192 (1.52x) when every row was
encoded up front; 1.23 GB and 1.27 GB (1.03x) encoded a step at a time.

Each run is `sft.run` in a fresh process (~25 s each on 2 cores, mostly imports and DeepSpeed's start), which
reports its own peak RSS (`ru_maxrss`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROWS = 48  # and 4x as many
IMAGE_SIZE = 448

CHILD = textwrap.dedent("""
    import json, resource, sys
    from medvl_engine import config as config_lib
    from medvl_engine.trainers import sft
    from medvl_engine.trainers.config import SFTConfig

    model, data, output = sys.argv[1:4]
    cfg = config_lib.build(SFTConfig, {
        "model": {"path": model, "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"source": data},
        "deepspeed": {"micro_batch_size": 2},
        "output": output,
        "checkpoint": {"final": False, "export": False},
        "epochs": 1, "global_batch_size": 4, "max_steps": 2,
    })
    assert len(sft.run(cfg)) == 2
    print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.fixture(scope="module")
def vl_model_at_real_pixel_limits(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with the image processor's default pixel limits (56x56 to 28x28x1280 pixels), as
    the real Qwen2.5-VL ships it, not the test fixture's 4-16 patches."""
    from tiny_models import qwen_tokenizer, tiny_qwen2_5_vl
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medvl_engine.vision import image_only_processor

    folder = tmp_path_factory.mktemp("tiny-vl-real-pixels")
    tokenizer = qwen_tokenizer()
    tiny_qwen2_5_vl(tokenizer).save_pretrained(folder)
    image_only_processor(Qwen2VLImageProcessorPil(patch_size=14, merge_size=2), tokenizer).save_pretrained(folder)
    return folder


def write_rows(folder: Path, count: int) -> Path:
    """`count` SFT rows, one distinct 448x448 JPEG each (smooth noise: ~28 KB, as photographs compress)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / f"rows-{count}.jsonl"
    with path.open("w") as f:
        for i in range(count):
            image = folder / "images" / f"{i}.jpg"
            if not image.exists():
                coarse = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), "RGB")
                coarse.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).save(image, quality=90)
            f.write(json.dumps({
                "dataset_index": i, "dataset_name": "synthetic", "images": [f"images/{i}.jpg"],
                "question": f"What does image {i} show?", "options": json.dumps({"A": "noise", "B": "an organ"}),
                "answer_label": "A", "answer": "noise", "reasoning": f"Image {i} has no anatomy in it.",
            }) + "\n")
    return path


def peak_rss_gb(model: Path, data: Path, output: Path) -> float:
    # Not this process's one-rank group: a learner built in it earlier (another test) left its MASTER_PORT in
    # os.environ, still bound (EADDRINUSE in the child).
    group = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in group} | {"OMP_NUM_THREADS": "1", "MEDVL_PROGRESS": "log"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), str(output)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_kb"] / 1e6


@pytest.mark.slow
def test_sft_peak_memory_is_flat_in_the_number_of_rows(vl_model_at_real_pixel_limits, tmp_path):
    rss = {n: peak_rss_gb(vl_model_at_real_pixel_limits, write_rows(tmp_path, n), tmp_path / f"run-{n}")
           for n in (ROWS, 4 * ROWS)}
    print(f"peak RSS: {rss[ROWS]:.2f} GB at {ROWS} rows, {rss[4 * ROWS]:.2f} GB at {4 * ROWS} rows")
    assert rss[4 * ROWS] <= 1.2 * rss[ROWS], rss
