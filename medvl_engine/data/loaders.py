"""Loaders that turn a dataset in MedVLThinker's layout into checked `Sample`s.

    from medvl_engine.data import load_samples
    samples = load_samples("UCSC-VLAA/MedVLThinker-Eval", split="test")   # hub name + split
    samples = load_samples("runs/curated")                                # a save_to_disk folder
    samples = load_samples("eval.parquet")                                # a parquet file
    samples = load_samples("questions.jsonl", skip_invalid=True)          # a jsonl file

Every source is read as raw rows (images as PIL images, `{"bytes", "path"}` dicts or file paths;
options as a JSON string or a mapping) and each row becomes one `Sample`. A row that does not fit
raises `DataError` naming the dataset, the row and the problem; with `skip_invalid=True` it is dropped
instead and listed in `SampleSet.skipped`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from PIL import Image

from medvl_engine.data.sample import DataError, Sample

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("question", "options", "answer_label", "answer")
# Rows are read from arrow in batches: small enough that a batch of image bytes stays a few MB.
_ARROW_BATCH_ROWS = 64

_BUNDLED = Path(__file__).parent / "bundled"
# The name every command's data-source flag takes for the bundled set.
BUNDLED_NAME = "bundled"
# A reachable hub answers a TCP connect in well under a second; DNS failure (offline) returns at once.
_HUB_PROBE_TIMEOUT_S = 3.0


class SampleSet(Sequence):
    """The samples of one dataset, in source order, with the rows that were skipped and why."""

    def __init__(self, samples: Iterable[Sample], *, name: str, skipped: Iterable[tuple[int, str]] = ()):
        self._samples = list(samples)
        self.name = name
        self.skipped: list[tuple[int, str]] = list(skipped)
        self._by_index: dict[int, Sample] | None = None

    def __getitem__(self, item):
        return self._samples[item]

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return f"SampleSet({self.name!r}, {len(self)} samples, {len(self.skipped)} skipped)"

    def by_index(self) -> dict[int, Sample]:
        """dataset_index -> Sample (the join key of answers, rollouts and pass counts)."""
        if self._by_index is None:
            self._by_index = {s.dataset_index: s for s in self._samples}
        return self._by_index

    def skipped_summary(self, limit: int = 10) -> str:
        """One line: how many rows were skipped and the first `limit` of them with their reason."""
        if not self.skipped:
            return f"{self.name}: no rows skipped"
        shown = "; ".join(f"row {row}: {reason}" for row, reason in self.skipped[:limit])
        more = f"; ... and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        total = len(self) + len(self.skipped)
        return f"{self.name}: skipped {len(self.skipped)} of {total} rows ({shown}{more})"


def bundled_dataset_path() -> Path:
    """The bundled sample dataset: a jsonl of medical multiple-choice questions, some with images."""
    return _BUNDLED / "questions.jsonl"


def bundled_answers_path() -> Path:
    """Bundled model answers (`{dataset_index, response}` per line) for the bundled questions."""
    return _BUNDLED / "answers.jsonl"


def load_bundled(*, skip_invalid: bool = False) -> SampleSet:
    return load_samples(BUNDLED_NAME, skip_invalid=skip_invalid)


def load_samples(source, *, split: str = "test", skip_invalid: bool = False, name: str | None = None) -> SampleSet:
    """Load `source` into a `SampleSet`.

    `source` is `bundled` (the bundled set), a `.jsonl` file, a `.parquet` file, a folder written by
    `datasets`' `save_to_disk`, a `datasets.Dataset`/`DatasetDict`, or a Hugging Face hub name (then
    `split` picks the split, as it does for a saved `DatasetDict`). `name` labels the set in errors and
    reports (default: the file, folder or hub name). A hub name fails at once when the hub cannot be
    reached (unless HF_HUB_OFFLINE=1 asks for the cache).
    """
    rows, base_dir, label = _open_rows(source, split)
    name = name or label
    samples: list[Sample] = []
    skipped: list[tuple[int, str]] = []
    seen: dict[int, int] = {}
    for row_number, where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, Mapping):
                raise DataError(f"expected a JSON object, got {type(row).__name__}")
            sample = sample_from_row(row, position=row_number, base_dir=base_dir)
            if sample.dataset_index in seen:
                raise DataError(
                    f"field 'dataset_index': {sample.dataset_index} already used by row {seen[sample.dataset_index]}"
                )
        except (DataError, TypeError) as exc:
            if not skip_invalid:
                raise DataError(f"{name}: row {row_number}{where}: {exc}") from exc
            skipped.append((row_number, str(exc)))
            continue
        seen[sample.dataset_index] = row_number
        samples.append(sample)
    result = SampleSet(samples, name=name, skipped=skipped)
    if skipped:
        logger.warning("%s", result.skipped_summary())
    return result


def sample_from_row(row: Mapping, *, position: int, base_dir: Path | None = None) -> Sample:
    """One raw row -> `Sample`. `position` is the row's place in its source, used when it has no
    `dataset_index`; image paths are relative to `base_dir` (the jsonl's or parquet's folder)."""
    missing = [field for field in REQUIRED_FIELDS if row.get(field) is None]
    if missing:
        raise DataError(f"missing field {missing[0]!r}" + (f" (also {missing[1:]})" if len(missing) > 1 else ""))
    index = row.get("dataset_index")
    return Sample(
        images=_decode_images(row.get("images"), base_dir),
        question=row["question"],
        options=_decode_options(row["options"]),
        answer_label=row["answer_label"],
        answer=row["answer"],
        reasoning=row.get("reasoning"),
        dataset_name=row.get("dataset_name") or "",
        dataset_index=position if index is None else index,
    )


def _decode_options(raw) -> dict[str, str]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"field 'options': not valid JSON ({exc.msg}: character {exc.pos})") from None
        if not isinstance(raw, dict):
            raise DataError(f"field 'options': JSON decodes to {type(raw).__name__}, expected an object letter -> text")
        return raw
    if isinstance(raw, Mapping):
        # Arrow stores a mapping column as a struct with the union of all rows' letters, so a
        # four-option row read from parquet carries "E": None; such padding is not an option.
        return {letter: text for letter, text in raw.items() if text is not None}
    raise DataError(f"field 'options': expected a JSON object string or a mapping, got {type(raw).__name__}")


def _decode_images(raw, base_dir: Path | None) -> list:
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    return [_decode_image(value, i, base_dir) for i, value in enumerate(raw)]


def _decode_image(value, i: int, base_dir: Path | None) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    data, path = None, None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = value
    elif isinstance(value, str):
        path = value
    else:
        kind = type(value).__name__
        raise DataError(f"field 'images'[{i}]: expected a PIL image, an image dict or a path, got {kind}")
    if not data:
        if not path:
            raise DataError(f"field 'images'[{i}]: image dict has neither bytes nor path")
        file = Path(path) if base_dir is None or Path(path).is_absolute() else base_dir / path
        if not file.is_file():
            raise DataError(f"field 'images'[{i}]: image file {str(file)!r} not found")
        data = file.read_bytes()
    # Opened from memory and decoded lazily: a dataset keeps its compressed bytes (not 8k decoded
    # pictures, ~6 GB for MedVLThinker-Eval) and holds no open file per image. `verify()` reads the
    # file's structure without decoding it (0.3 ms for a 512x512 PNG against 10 ms to decode), so a
    # truncated or corrupt PNG is reported here with its row instead of failing a generate batch;
    # what verify cannot see (a truncated JPEG) the rollout pool finds before the backend does.
    try:
        Image.open(io.BytesIO(data)).verify()
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for a broken PNG chunk
        raise DataError(f"field 'images'[{i}]: not a readable image ({exc})") from None


# --- sources -----------------------------------------------------------------------------------------
# Each yields (row number, where-suffix for messages, raw row); row numbers count from 0. A jsonl line
# that is not JSON comes through as its DataError, so skip_invalid treats it like any other bad row.


def _open_rows(source, split: str) -> tuple[Iterator[tuple[int, str, object]], Path | None, str]:
    if not isinstance(source, (str, Path)):
        import datasets

        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            return _dataset_rows(_pick_split(source, split, "the given DatasetDict")), None, "dataset"
        raise TypeError(f"source: expected a path, a hub name or a datasets.Dataset, got {type(source).__name__}")
    if source == BUNDLED_NAME:
        return _jsonl_rows(bundled_dataset_path()), _BUNDLED, BUNDLED_NAME
    path = Path(source)
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: not a folder written by save_to_disk ({exc})") from None
        return _dataset_rows(_pick_split(loaded, split, str(path))), path, path.name
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        rows = _jsonl_rows(path) if suffix == ".jsonl" else _parquet_rows(path)
        return rows, path.parent, path.name
    if path.suffix or str(source).startswith((".", "/", "~")):
        raise DataError(f"{source}: not a .jsonl or .parquet file, a save_to_disk folder, or a hub name")
    import datasets

    label = f"{source}[{split}]"
    _check_hub_reachable(str(source), label)
    try:
        loaded = datasets.load_dataset(str(source), split=split)
    except (OSError, ValueError) as exc:  # no network, unknown name or split: datasets' own message says which
        raise DataError(f"{label}: cannot load from the Hugging Face hub ({type(exc).__name__}: {exc})") from exc
    return _dataset_rows(loaded), None, label


def _check_hub_reachable(name: str, label: str) -> None:
    """Fail at once when `name` can only come from the hub and the hub cannot be reached; `datasets`
    would retry for about 40 s first. With HF_HUB_OFFLINE=1 `datasets` reads its cache without asking."""
    import os
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(name, "") not in ("", "0") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    from huggingface_hub import constants

    url = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise DataError(f"{label}: not a local file or folder, not `{BUNDLED_NAME}`, and the Hugging Face hub "
                        f"({host}) cannot be reached ({exc}); give a local path, or set HF_HUB_OFFLINE=1 to read "
                        "a dataset downloaded before") from None


def _pick_split(loaded, split: str, where: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{where}: no split {split!r} (has {sorted(loaded)})")
        return loaded[split]
    return loaded


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, object]]:
    # Read as bytes, decoded line by line: a line that is not UTF-8 is reported as that row.
    row_number = 0
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                row = DataError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            else:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    row = DataError(f"not valid JSON ({exc.msg}: column {exc.colno})")
            yield row_number, f" (line {line_number})", row
            row_number += 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, str, object]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_ARROW_BATCH_ROWS)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return _numbered(row for batch in batches for row in batch.to_pylist())


def _dataset_rows(dataset) -> Iterator[tuple[int, str, object]]:
    # The arrow view hands images over as {"bytes", "path"} dicts, so a broken image is reported for
    # its row by the same code as every other source instead of failing inside `datasets`.
    arrow = dataset.with_format("arrow")
    return _numbered(row for batch in arrow.iter(batch_size=_ARROW_BATCH_ROWS) for row in batch.to_pylist())


def _numbered(rows: Iterable[object]) -> Iterator[tuple[int, str, object]]:
    for row_number, row in enumerate(rows):
        yield row_number, "", row
