"""What one GRPO group with images costs on the wire: bytes, and the time to build, encode, decode and
turn back into images, for raw pixels (what the engine sends) against PNG (the alternative).

A group is n answers of `--tokens` tokens each (int32 ids + float32 log-probs) and `images` images of
`--side` x `--side` RGB (Qwen2.5-VL's prompts carry 1-7 images in MedVLThinker's data).

    python benchmarks/bench_wire.py [--n 8] [--tokens 1024] [--side 448] [--out benchmarks/out/bench_wire.jsonl]
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from medvl_engine.benchmarking import environment, format_table, median_time, write_rows
from medvl_engine.transport.messages import RolloutGroup, decode, encode

COLUMNS = ("images", "format", "bytes", "build_ms", "encode_ms", "decode_ms", "to_pil_ms", "total_ms", "MB_per_s")


def photo_like(rng: np.random.Generator, side: int) -> Image.Image:
    """A smooth image with noise (PNG compresses it like a medical scan, not like random bytes)."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(6 * x + k) * np.cos(4 * y - k) for k in range(3)], -1) * 100 + 128
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def build(images, n: int, tokens: int, rng: np.random.Generator) -> RolloutGroup:
    return RolloutGroup.build(
        producer="w0", seq=0, prompt_id="p", dataset_name="d", dataset_index=0, weight_version=0, answer_label="A",
        prompt_ids=rng.integers(0, 150_000, 300), response_ids=[rng.integers(0, 150_000, tokens) for _ in range(n)],
        logprobs=[rng.normal(-1, 1, tokens) for _ in range(n)], texts=["x" * (4 * tokens)] * n,
        finish_reasons=["stop"] * n, rewards=np.zeros(n), correct=np.zeros(n, bool), format_ok=np.zeros(n, bool),
        letters=[""] * n, images=images)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def measure(images: list, n: int, tokens: int, rng: np.random.Generator) -> list[dict]:
    """Rows for one group: raw pixels (what the engine sends) and, with images, PNG in their place."""
    group = build(images, n, tokens, rng)
    payload = encode(group)
    decoded = decode(payload)
    raw = {"images": len(images), "format": "raw", "bytes": len(payload),
           "build_ms": 1e3 * median_time(lambda: build(images, n, tokens, rng)),
           "encode_ms": 1e3 * median_time(lambda: encode(group)),
           "decode_ms": 1e3 * median_time(lambda: decode(payload)),
           "to_pil_ms": 1e3 * median_time(decoded.image_list)}
    if not images:
        return [raw]
    pngs = [png_bytes(im) for im in images]
    png_size = len(payload) - sum(len(im.data) for im in group.images) + sum(map(len, pngs))
    png = {**raw, "format": "png", "bytes": png_size,
           "build_ms": 1e3 * median_time(lambda: [png_bytes(im) for im in images]),
           "to_pil_ms": 1e3 * median_time(lambda: [Image.open(io.BytesIO(b)).load() for b in pngs])}
    return [raw, png]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--side", type=int, default=448)
    parser.add_argument("--out", default="benchmarks/out/bench_wire.jsonl")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for count in (0, 1, 3, 7):
        rows += measure([photo_like(rng, args.side) for _ in range(count)], args.n, args.tokens, rng)
    env = environment()
    for row in rows:
        row["total_ms"] = row["build_ms"] + row["encode_ms"] + row["decode_ms"] + row["to_pil_ms"]
        row["MB_per_s"] = row["bytes"] / 1e6 / (row["total_ms"] / 1e3)
        row.update({"bench": "wire", "n": args.n, "tokens": args.tokens, "side": args.side, **env})
    print(f"one group: n={args.n} answers x {args.tokens} tokens, images {args.side}x{args.side} RGB")
    print(format_table(rows, COLUMNS))
    print(f"wrote {write_rows(args.out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
