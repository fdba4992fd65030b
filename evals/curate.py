"""`medvl-engine curate`: keep the questions of medium difficulty and order them, as MedVLThinker does.

    medvl-engine curate --source UCSC-VLAA/MedVLThinker-pmc_vqa --split train \
        --pass-counts runs/passrate-3b --output data/pmc_vqa-easy_to_hard

Joins the pass counts of a `medvl-engine passrate` run to the dataset by `dataset_index`, keeps the
rows whose pass count lies in [min_pass, max_pass] (default 1..7 of 16: MedVLThinker drops questions
no sample solves and questions half or more of the samples solve), reports how many rows were
dropped at each end and how many had no pass count, orders the rest (easy_to_hard: descending pass
count with ties shuffled by the seed, as MedVLThinker shuffles then sorts; hard_to_easy: ascending;
shuffled), and writes

    OUTPUT/dataset/       a `save_to_disk` folder (what `medvl-engine grpo --data.source` reads)
    OUTPUT/data.parquet   the same rows as one parquet file
    OUTPUT/curation.json  the counts and settings

in the unified schema plus a `pass_count` column. Images keep their original encoded bytes. A band that
keeps no row writes an empty dataset. The folder is written beside OUTPUT and renamed into place, so a
failed run leaves nothing half-written; `--overwrite` replaces only an earlier curation (its
curation.json is there), never a folder holding the source or the pass counts.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medvl_engine import run_folder
from medvl_engine.config import param
from medvl_engine.errors import ConfigError, DataError, RunFolderError

logger = logging.getLogger(__name__)

ORDERS = ("easy_to_hard", "hard_to_easy", "shuffled")
RESULTS_NAME = run_folder.RESULTS
SUMMARY_NAME = "curation.json"


@dataclass
class CurateConfig:
    """Which dataset, which pass counts, which band and order, and where to write."""

    source: str = param("", "dataset: hub name, save_to_disk folder, parquet or jsonl (`bundled`: the bundled set)")
    split: str = param("train", "split to read when the source has several")
    pass_counts: str = param("", "a passrate run folder or its results.jsonl")
    output: str = param("", "output folder (dataset/, data.parquet, curation.json)")
    min_pass: int = param(1, "keep rows with pass count >= this (MedVLThinker: 1)")
    max_pass: int = param(7, "keep rows with pass count <= this (MedVLThinker: 7 of 16)")
    order: Literal["easy_to_hard", "hard_to_easy", "shuffled"] = param("easy_to_hard", "row order of the output")
    seed: int = param(42, "seed of the tie shuffle (MedVLThinker: 42)")
    overwrite: bool = param(False, "replace an earlier curation in the output folder (only one curate wrote)")
    band_of: int = param(16, "samples per question the band min_pass..max_pass is for; the pass counts must "
                         "come from this many (MedVLThinker's 1..7 is of 16)")

    def __post_init__(self):
        for name in ("source", "pass_counts", "output"):
            if not getattr(self, name):
                raise ConfigError(f"curate: --{name.replace('_', '-')} is required")
        if self.band_of < 1:
            raise ConfigError(f"curate: band_of must be >= 1, got {self.band_of}")
        if not 0 <= self.min_pass <= self.max_pass:
            raise ConfigError(f"curate: need 0 <= min_pass <= max_pass, got {self.min_pass}..{self.max_pass}")
        if self.max_pass > self.band_of:
            raise ConfigError(f"curate: max_pass {self.max_pass} exceeds the {self.band_of} samples per question "
                              "the band is for (--band-of)")
        if self.order not in ORDERS:
            raise ConfigError(f"curate: order {self.order!r} is not one of {ORDERS}")


def check_pass_count_run(cfg: CurateConfig, num_rollouts: int) -> None:
    """Refuse pass counts that do not fit `cfg`: out of another sample count than the band is for, or from a
    pass-rate run over another dataset than `cfg.source` (its manifest says which; rows join by index)."""
    if num_rollouts != cfg.band_of:
        raise ConfigError(f"curate: the pass counts in {cfg.pass_counts} are out of {num_rollouts} samples but the "
                          f"band {cfg.min_pass}..{cfg.max_pass} is for --band-of {cfg.band_of}; give --band-of "
                          f"{num_rollouts} with --min-pass and --max-pass for that many")
    from medvl_engine.evals.manifest import MANIFEST_NAME, read_manifest

    folder = Path(cfg.pass_counts)
    folder = folder if folder.is_dir() else folder.parent
    if not (folder / MANIFEST_NAME).is_file():
        return  # a bare results file: nothing records its dataset
    data = read_manifest(folder).get("identity", {}).get("data", {})
    recorded = (_same_source(data.get("source")), data.get("split"))
    if data and recorded != (_same_source(cfg.source), cfg.split):
        raise ConfigError(f"curate: the pass counts in {folder} were measured on {data.get('source')} (split "
                          f"{data.get('split')}), not on --source {cfg.source} (split {cfg.split}); rows are joined "
                          "by dataset_index, so they would be matched to other questions")


def _same_source(source) -> str | None:
    """A data source in one spelling: a local path made absolute, a hub or bundled name as given."""
    if not isinstance(source, str):
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() and source != "bundled" else source


@dataclass(frozen=True)
class Curation:
    """The outcome of a curation: the kept rows in output order and what was dropped, counted."""

    rows: list[int]
    pass_counts: list[int]
    total: int
    dropped_below: int
    dropped_above: int
    missing: int
    unknown: int
    num_rollouts: int

    @property
    def kept(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("rows", "pass_counts")}
        out["kept"] = self.kept
        return out


def read_pass_counts(path: str | Path) -> tuple[dict[int, int], int]:
    """dataset_index -> pass count from a passrate run (folder or jsonl), and the samples per question.

    All records must come from the same number of samples: pass counts out of 8 and out of 16 are not
    comparable, and the default band 1..7 is meant for 16.
    """
    from medvl_engine.evals.results import iter_pass_counts

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_NAME
    counts: dict[int, int] = {}
    rollouts: set[int] = set()
    for index, num_correct, num_rollouts in iter_pass_counts(path):
        if not 0 <= num_correct <= num_rollouts:
            raise RunFolderError(f"{path}: dataset_index {index} has num_correct={num_correct} of {num_rollouts}")
        counts[index] = num_correct
        rollouts.add(num_rollouts)
    if not counts:
        raise RunFolderError(f"{path}: no pass counts")
    if len(rollouts) > 1:
        raise RunFolderError(f"{path}: records come from different sample counts {sorted(rollouts)}; pass counts "
                             "of different n cannot share one band")
    return counts, rollouts.pop()


def select(
    dataset_indices: Sequence[int],
    pass_counts: Mapping[int, int],
    *,
    min_pass: int = 1,
    max_pass: int = 7,
    order: str = "easy_to_hard",
    seed: int = 42,
    num_rollouts: int = 16,
) -> Curation:
    """Which rows (positions in `dataset_indices`) to keep, in output order, and the drop counts."""
    if order not in ORDERS:
        raise ConfigError(f"order {order!r} is not one of {ORDERS}")
    known = set(dataset_indices)
    if len(known) != len(dataset_indices):
        raise DataError("dataset_index values of the dataset are not unique; they cannot be joined")
    keep, below, above, missing = [], 0, 0, 0
    for row, index in enumerate(dataset_indices):
        count = pass_counts.get(index)
        if count is None:
            missing += 1
        elif count < min_pass:
            below += 1
        elif count > max_pass:
            above += 1
        else:
            keep.append(row)
    keep_arr = np.asarray(keep, dtype=np.int64)
    counts = np.asarray([pass_counts[dataset_indices[r]] for r in keep], dtype=np.int64)
    # Shuffle first, then a stable sort: rows with equal pass counts end up in seeded random order.
    perm = np.random.default_rng(seed).permutation(len(keep_arr))
    keep_arr, counts = keep_arr[perm], counts[perm]
    if order != "shuffled":
        by = np.argsort(-counts if order == "easy_to_hard" else counts, kind="stable")
        keep_arr, counts = keep_arr[by], counts[by]
    return Curation(
        rows=keep_arr.tolist(),
        pass_counts=counts.tolist(),
        total=len(dataset_indices),
        dropped_below=below,
        dropped_above=above,
        missing=missing,
        unknown=len(set(pass_counts) - known),
        num_rollouts=num_rollouts,
    )


# --- writing -----------------------------------------------------------------------------------------


def _features():
    import datasets

    return datasets.Features({
        "images": datasets.List(datasets.Image()),
        "question": datasets.Value("string"),
        "options": datasets.Value("string"),
        "answer_label": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "reasoning": datasets.Value("string"),
        "dataset_name": datasets.Value("string"),
        "dataset_index": datasets.Value("int64"),
        "pass_count": datasets.Value("int64"),
    })


def _image_bytes(image) -> dict:
    # The loaders open every image from its original encoded bytes (an in-memory file); storing those
    # bytes again keeps a JPEG bit-exact instead of re-encoding it at quality 75.
    fp = getattr(image, "fp", None)
    if isinstance(fp, io.BytesIO):
        return {"bytes": fp.getvalue(), "path": None}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _row(sample, pass_count: int) -> dict:
    return {
        "images": [_image_bytes(image) for image in sample.images],
        "question": sample.question,
        # MedVLThinker's datasets store options as a JSON string (ensure_ascii=False), letter order kept.
        "options": json.dumps(sample.options, ensure_ascii=False),
        "answer_label": sample.answer_label,
        "answer": sample.answer,
        "reasoning": sample.reasoning,
        "dataset_name": sample.dataset_name,
        "dataset_index": sample.dataset_index,
        "pass_count": pass_count,
    }


def save_samples(samples: Sequence, pass_counts: Sequence[int], output: str | Path, *, batch_rows: int = 256) -> Path:
    """Write samples (with their pass counts) as OUTPUT/data.parquet and the save_to_disk folder OUTPUT/dataset.

    Rows are streamed into parquet `batch_rows` at a time (a PMC-VQA-sized set with images does not fit
    in memory as Python objects), then the parquet is turned into the arrow folder.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    features = _features()
    schema = features.arrow_schema
    parquet_path = output / "data.parquet"
    with pq.ParquetWriter(parquet_path, schema) as writer:
        for start in range(0, len(samples), batch_rows):
            stop = start + batch_rows
            rows = [_row(s, c) for s, c in zip(samples[start:stop], pass_counts[start:stop])]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    if not samples:
        # `datasets` reads no split from a parquet without rows, and saves zero rows as zero shards that
        # load_from_disk then fails on: one empty shard, built from the features.
        empty = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        empty.save_to_disk(str(output / "dataset"), num_shards=1)
        return output
    cache = output / ".cache"
    try:
        dataset = datasets.Dataset.from_parquet(str(parquet_path), features=features, cache_dir=str(cache))
        dataset.save_to_disk(str(output / "dataset"))
        del dataset
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return output


# --- command -----------------------------------------------------------------------------------------


def _check_output(cfg: CurateConfig) -> None:
    """Refuse, before any work, an output folder that holds an input or that --overwrite may not replace."""
    from medvl_engine.evals.manifest import check_not_input

    output = Path(cfg.output)
    check_not_input(output, [cfg.source, cfg.pass_counts])
    if output.exists() and not output.is_dir():
        raise RunFolderError(f"curate: --output {output} is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()):
        if not cfg.overwrite:
            raise RunFolderError(f"output folder {output} is not empty (pass --overwrite to replace it)")
        if not (output / SUMMARY_NAME).is_file():
            raise RunFolderError(f"--overwrite: {output} has no {SUMMARY_NAME}, so curate did not write it; "
                                 "remove it yourself or choose another --output")


def _move_into_place(written: Path, output: Path) -> None:
    """Rename the finished folder to `output`; an earlier one there is renamed aside first, then removed."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    written.rename(output)
    if old is not None:
        shutil.rmtree(old)


def curate(cfg: CurateConfig) -> Curation:
    """Load, join, select, order and save; returns the counts (also written to curation.json)."""
    from medvl_engine.data import load_bundled, load_samples

    _check_output(cfg)
    samples = load_bundled() if cfg.source == "bundled" else load_samples(cfg.source, split=cfg.split)
    counts, num_rollouts = read_pass_counts(cfg.pass_counts)
    check_pass_count_run(cfg, num_rollouts)  # then max_pass <= band_of == num_rollouts (CurateConfig)
    result = select([s.dataset_index for s in samples], counts, min_pass=cfg.min_pass, max_pass=cfg.max_pass,
                    order=cfg.order, seed=cfg.seed, num_rollouts=num_rollouts)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_samples([samples[r] for r in result.rows], result.pass_counts, partial)
        summary = {**result.summary(), "config": asdict(cfg)}
        (partial / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        _move_into_place(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return result


def format_summary(result: Curation, cfg: CurateConfig) -> str:
    n = result.num_rollouts
    lines = [
        f"rows in dataset        {result.total}",
        f"kept ({cfg.min_pass}..{cfg.max_pass} of {n})      {result.kept}",
        f"dropped, pass < {cfg.min_pass}     {result.dropped_below}",
        f"dropped, pass > {cfg.max_pass}     {result.dropped_above}",
        f"no pass count          {result.missing}",
        f"pass counts not in dataset {result.unknown}",
        f"order                  {cfg.order} (seed {cfg.seed})",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config

    config.add_arguments(parser, CurateConfig)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config

    cfg = config.from_args(CurateConfig, args)
    result = curate(cfg)
    print(format_summary(result, cfg))
    if not result.kept:
        logger.warning("no row has a pass count in %s..%s: the dataset written is empty", cfg.min_pass, cfg.max_pass)
    logger.info("wrote %s/dataset (save_to_disk) and %s/data.parquet", cfg.output, cfg.output)
    return 0
