"""Benchmark of `build-data`: rows/s of each stage on generated captions, and dedup's memory peak.

    python benchmarks/bench_build_data.py                       # 100k captions; dedup index at 100k and 1M
    python benchmarks/bench_build_data.py --rows 20000 --index-rows 100000
    python benchmarks/bench_build_data.py --rows 16 --index-rows 64 --million 256 --probe-batches 1 \
        --skip encoder                                          # smoke-test sizes (tests/test_benchmarks.py)

Measurements (each in its own process, so its memory peak is its own):

- filter-text, filter-image: the stages as the command runs them (`run_stage`, checkpoints included)
  over `--rows` generated captions (`medvl_engine.databuild.synthetic`); the images are a pool of 64
  JPEG/PNG files of 200-830 pixels (fewer under 64 rows) that the rows share, so every row still decodes
  its image.
- dedup encoder: the default encoder (SmolLM2-135M mean-pooled, float32) on `--encoder-rows` captions;
  on a CPU it is the whole cost of dedup (a few rows/s on 2 cores), so it is timed apart.
- dedup index: the exact greedy search (`Deduplicator`) over synthetic unit embeddings (576 dims, the
  default encoder's; 15% near-duplicates of earlier rows) streamed in batches of 64: rows/s and the
  process's memory peak at `--index-rows`.
- dedup index at 1M kept: 1M embeddings loaded into the index (the worst case: every row kept) and
  `--probe-batches` batches searched against it: the memory peak of a million-row index and the search
  rate at that size. A full exact 1M run costs rows x kept x dims multiply-adds (~3e14 here):
  hours on 2 CPU cores, seconds on a GPU; this row gives its memory, not its wall time.

Prints a table and writes one JSON row per measurement (environment columns first).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 576
MEASUREMENTS = ("filter-text", "filter-image", "encoder", "index", "million")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_source(folder: Path, rows: int) -> Path:
    from medvl_engine.databuild.synthetic import synthetic_captions, write_image

    images = []
    for k in range(min(64, rows)):  # a smaller run (a smoke test) writes only the images its rows use
        side = 200 + 10 * k
        images.append(str(write_image(folder / "images" / f"{k}.{'jpg' if k % 2 else 'png'}", side, side, seed=k)))
    source = folder / "captions.jsonl"
    with source.open("w") as f:
        for i, row in enumerate(synthetic_captions(rows, seed=0)):
            f.write(json.dumps({**row, "image": images[i % len(images)]}) + "\n")
    return source


def measure_stage(stage: str, rows: int) -> dict:
    from medvl_engine.databuild.config import ImageFilterConfig, InputConfig, TextFilterConfig
    from medvl_engine.databuild.filter_image import ImageFilter
    from medvl_engine.databuild.filter_text import TextFilter
    from medvl_engine.databuild.stage import run_stage

    with tempfile.TemporaryDirectory() as tmp:
        source = write_source(Path(tmp), rows)
        filt = TextFilter(TextFilterConfig()) if stage == "filter-text" else ImageFilter(ImageFilterConfig())
        start = time.perf_counter()
        summary = run_stage(filt, Path(tmp) / "out", InputConfig(source=str(source)), show_progress=False)
        seconds = time.perf_counter() - start
    return {"stage": stage, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "kept": summary["kept"],
            "peak_rss_mib": peak_mib()}


def measure_encoder(rows: int) -> dict:
    from medvl_engine.databuild.dedup import embed, load_encoder
    from medvl_engine.databuild.synthetic import synthetic_captions

    captions = [r["caption"] for r in synthetic_captions(rows, seed=1)]
    encoder = load_encoder("smollm2", device="cpu")
    embed(encoder, captions[:8], 8)  # warm-up
    start = time.perf_counter()
    embed(encoder, captions, 64)
    seconds = time.perf_counter() - start
    return {"stage": "dedup: encoder (SmolLM2, fp32)", "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_mib": peak_mib()}


def synthetic_embeddings(rows: int, batch: int, seed: int = 0):
    """Batches of unit vectors; 15% of rows are near-copies of a recent earlier row (similarity ~0.999)."""
    rng = np.random.default_rng(seed)
    recent = np.empty((0, DIM), dtype=np.float32)
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        dup = rng.random(n) < 0.15
        if len(recent):
            x[dup] = recent[rng.integers(len(recent), size=int(dup.sum()))] + 0.02 * x[dup] / np.sqrt(DIM)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        recent = np.concatenate([recent, x])[-4096:]
        yield x


def measure_index(rows: int) -> dict:
    from medvl_engine.databuild.dedup import Deduplicator

    dedup = Deduplicator(DIM, 0.995)
    kept = 0
    start = time.perf_counter()
    for batch in synthetic_embeddings(rows, 64):
        kept += int(dedup.add(batch)[0].sum())
    seconds = time.perf_counter() - start
    return {"stage": "dedup: exact index", "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "kept": kept, "index_mib": dedup.nbytes / 2**20, "peak_rss_mib": peak_mib()}


def measure_index_loaded(rows: int, probe_batches: int) -> dict:
    from medvl_engine.databuild.dedup import Deduplicator

    dedup = Deduplicator(DIM, 0.995)
    for chunk in synthetic_embeddings(rows, 65536, seed=2):
        dedup.load(chunk)
    probes = list(synthetic_embeddings(probe_batches * 64, 64, seed=3))
    start = time.perf_counter()
    for batch in probes:
        dedup.add(batch)
    seconds = time.perf_counter() - start
    return {"stage": "dedup: exact index, 1M kept", "rows": rows, "probe_rows": probe_batches * 64,
            "seconds": seconds, "rows_per_s": probe_batches * 64 / seconds, "index_mib": dedup.nbytes / 2**20,
            "peak_rss_mib": peak_mib()}


def child(args) -> dict:
    if args.measure in ("filter-text", "filter-image"):
        return measure_stage(args.measure, args.rows)
    if args.measure == "encoder":
        return measure_encoder(args.encoder_rows)
    if args.measure == "index":
        return measure_index(args.index_rows)
    return measure_index_loaded(args.million, args.probe_batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="generated captions for the filters")
    parser.add_argument("--encoder-rows", type=int, default=128, help="captions embedded by the default encoder")
    parser.add_argument("--index-rows", type=int, default=100_000, help="synthetic embeddings deduplicated")
    parser.add_argument("--million", type=int, default=1_000_000, help="embeddings loaded for the memory row")
    parser.add_argument("--probe-batches", type=int, default=4, help="batches of 64 searched against the 1M index")
    parser.add_argument("--skip", nargs="*", default=[], choices=MEASUREMENTS, metavar="MEASUREMENT",
                        help=f"measurements to leave out ({', '.join(MEASUREMENTS)})")
    parser.add_argument("--out", default=None, help="JSON-lines output (default: the temp folder)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(child(args)))
        return 0
    from medvl_engine.benchmarking import format_table, write_rows

    rows = []
    for measure in MEASUREMENTS:
        if measure in args.skip:
            continue
        cmd = [sys.executable, __file__, "--measure", measure, "--rows", str(args.rows), "--encoder-rows",
               str(args.encoder_rows), "--index-rows", str(args.index_rows), "--million", str(args.million),
               "--probe-batches", str(args.probe_batches)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # the child's traceback, not only its exit status
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"{measure}: the measuring process failed (exit {done.returncode})")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['stage']}: {row['rows_per_s']:.1f} rows/s", file=sys.stderr, flush=True)
    print(format_table(rows, ["stage", "rows", "seconds", "rows_per_s", "kept", "index_mib", "peak_rss_mib"]))
    path = write_rows(args.out or Path(tempfile.gettempdir()) / "bench_build_data.jsonl", rows)
    print(f"rows written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
