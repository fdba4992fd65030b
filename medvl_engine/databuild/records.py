"""Image-caption records: what every `build-data` stage reads and writes.

    records = read_records(InputConfig(source="pmc_oa.jsonl"), images_dir=run / "images")
    for position, record in records:               # (row number in the source, CaptionRecord)
        ...

A `CaptionRecord` is one or more images, a caption, the inline mentions ("context") and a source id.
Sources are a jsonl file, a parquet file, a `save_to_disk` folder or a Hugging Face hub name (LLaVA-Med /
PMC-OA style); the field names are found among common spellings unless the config names them. Rows are
read lazily, one at a time (arrow in batches of 64), so a stage holds a constant number of rows.

Images travel between stages as file paths. Relative paths in a source are relative to
`input.image_root` (default: the source file's folder); a stage writes them absolute. Image bytes
(a datasets `Image` column, a parquet bytes column) are written once, unchanged, into `images_dir` by
the stage that reads them, and carried as paths from there on. A row that does not fit (no caption,
images of an unknown kind, a line that is not JSON) comes out as a `BadRow` with its id and reason,
never as an exception: the stage reports it and goes on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from medvl_engine.databuild.config import InputConfig
from medvl_engine.errors import DataError

# Field spellings of the common sources, tried in order when the config names none:
# PMC-OA (`image`, `caption`), LLaVA-Med's PMC pairs (`pair_id`, `fig_caption`, `in_text_mention`),
# PMC-Inline (`inline`), and this module's own output (`id`, `images`, `caption`, `context`).
ID_FIELDS = ("id", "source_id", "pair_id", "image_id", "pmcid")
IMAGE_FIELDS = ("images", "image", "image_path", "image_file", "img_path", "image_paths")
CAPTION_FIELDS = ("caption", "fig_caption", "text")
CONTEXT_FIELDS = ("context", "inline_mentions", "in_text_mention", "mentions", "inline")
_ARROW_BATCH_ROWS = 64


class CaptionRecord(msgspec.Struct, frozen=True):
    """One image-caption row as the stages pass it on (one jsonl line)."""

    id: str
    images: list[str]  # file paths (absolute, or relative to the file the record was read from)
    caption: str
    context: str = ""  # inline mentions, one per line

    def text(self) -> str:
        """Caption and inline mentions: what the text filter counts terms in and what dedup embeds."""
        return f"{self.caption}\n{self.context}" if self.context else self.caption


@dataclass(frozen=True)
class BadRow:
    """A source row that is not an image-caption record; reported with its id, never fatal."""

    id: str
    reason: str
    detail: str


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CaptionRecord)


def encode_line(record: msgspec.Struct | dict) -> bytes:
    """One jsonl line (with its newline); the same record always gives the same bytes."""
    return _encoder.encode(record) + b"\n"


def decode_record(line: bytes | str) -> CaptionRecord:
    return _decoder.decode(line)


# -- sources ------------------------------------------------------------------------------------------


def read_records(cfg: InputConfig, *, images_dir: Path | None = None,
                 start: int = 0) -> Iterator[tuple[int, CaptionRecord | BadRow]]:
    """(row number, record or BadRow) for every row of `cfg.source` from row `start` on.

    `images_dir` is where image bytes found in the source are written (required only for such sources).
    Row numbers count every row of the source (bad ones too), so `start` resumes a stage exactly.
    """
    path = Path(cfg.source)
    base = Path(cfg.image_root) if cfg.image_root else (path if path.is_dir() else path.parent)
    stop = cfg.max_rows or None
    for position, row in _raw_rows(cfg, start):
        if stop is not None and position >= stop:
            return
        yield position, _to_record(row, position, cfg, base, images_dir)


def count_rows(cfg: InputConfig) -> int | None:
    """Rows in the source when that is cheap to know (for the progress bar), else None."""
    path = Path(cfg.source)
    total = None
    if path.suffix == ".jsonl" and path.is_file():
        with path.open("rb") as f:
            total = sum(1 for line in f if line.strip())
    elif path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        total = pq.ParquetFile(path).metadata.num_rows
    return min(total, cfg.max_rows) if total is not None and cfg.max_rows else total


def _raw_rows(cfg: InputConfig, start: int) -> Iterator[tuple[int, object]]:
    path = Path(cfg.source)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"input.source {path}: file not found")
        yield from _jsonl_rows(path, start)
        return
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"input.source {path}: file not found")
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=_ARROW_BATCH_ROWS)
        yield from _skip(((i, row) for i, row in enumerate(r for b in batches for r in b.to_pylist())), start)
        return
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise DataError(f"input.source {path}: no split {cfg.split!r} (has {sorted(loaded)})")
            loaded = loaded[cfg.split]
    elif path.suffix or str(cfg.source).startswith((".", "/", "~")):
        raise DataError(f"input.source {cfg.source}: not a .jsonl or .parquet file, a save_to_disk folder, "
                        "or a hub name")
    else:
        loaded = datasets.load_dataset(str(cfg.source), split=cfg.split)
    # The arrow view hands images over as {"bytes", "path"} dicts: a broken image stays bytes to report.
    arrow = loaded.select(range(start, len(loaded))) if start else loaded
    rows = (r for b in arrow.with_format("arrow").iter(batch_size=_ARROW_BATCH_ROWS) for r in b.to_pylist())
    yield from ((start + i, row) for i, row in enumerate(rows))


def _skip(rows, start):
    for position, row in rows:
        if position >= start:
            yield position, row


def _jsonl_rows(path: Path, start: int) -> Iterator[tuple[int, object]]:
    position = 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            if position >= start:  # rows before `start` are counted, not parsed
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    row = BadRow(f"row-{position}", "bad row", f"line is not valid JSON ({exc.msg})")
                yield position, row
            position += 1


def _pick(row: Mapping, wanted: str, spellings: tuple[str, ...]):
    if wanted:
        return row.get(wanted)
    for name in spellings:
        if row.get(name) is not None:
            return row[name]
    return None


def _to_record(row, position: int, cfg: InputConfig, base: Path, images_dir: Path | None) -> CaptionRecord | BadRow:
    if isinstance(row, BadRow):
        return row
    if not isinstance(row, Mapping):
        return BadRow(f"row-{position}", "bad row", f"expected a JSON object, got {type(row).__name__}")
    raw_id = _pick(row, cfg.id_field, ID_FIELDS)
    record_id = str(raw_id) if raw_id not in (None, "") else f"row-{position}"
    caption = _pick(row, cfg.caption_field, CAPTION_FIELDS)
    if not isinstance(caption, str) or not caption.strip():
        return BadRow(record_id, "bad row", "no caption" if caption in (None, "") else
                      f"caption is {type(caption).__name__}, expected text")
    try:
        context = _context_text(_pick(row, cfg.context_field, CONTEXT_FIELDS))
        images = _image_paths(_pick(row, cfg.image_field, IMAGE_FIELDS), record_id, base, images_dir)
    except ValueError as exc:
        return BadRow(record_id, "bad row", str(exc))
    return CaptionRecord(id=record_id, images=images, caption=caption.strip(), context=context)


def _context_text(raw) -> str:
    """Inline mentions as lines of text: a string, a list of strings, or LLaVA-Med's mention dicts."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise DataError(f"context: expected text or a list of mentions, got {type(raw).__name__}")
    lines = []
    for item in raw:
        if isinstance(item, Mapping):
            item = item.get("text") or item.get("tokens") or item.get("sentence") or ""
            if isinstance(item, list):
                item = " ".join(map(str, item))
        if not isinstance(item, str):
            raise DataError(f"context: a mention is {type(item).__name__}, expected text")
        if item.strip():
            lines.append(item.strip())
    return "\n".join(lines)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _image_paths(raw, record_id: str, base: Path, images_dir: Path | None) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    out = []
    for k, value in enumerate(raw):
        data, path = None, None
        if isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            path = value
        else:
            raise DataError(f"images[{k}]: expected a path or image bytes, got {type(value).__name__}")
        if data:
            out.append(_write_image_bytes(data, record_id, k, path, images_dir))
        elif path:
            out.append(str(Path(path) if Path(path).is_absolute() else (base / path).absolute()))
        else:
            raise DataError(f"images[{k}]: neither a path nor bytes")
    return out


def _write_image_bytes(data: bytes, record_id: str, k: int, name: str | None, images_dir: Path | None) -> str:
    """Write image bytes once, unchanged, under a name derived from the row id (stable across runs)."""
    if images_dir is None:
        raise ValueError("the source holds image bytes; this stage has no folder to write them to")
    suffix = Path(name).suffix.lower() if name else ""
    digest = hashlib.sha1(record_id.encode()).hexdigest()[:8]
    target = images_dir / f"{_SAFE.sub('_', record_id)[:80]}-{digest}-{k}{suffix or '.img'}"
    if not target.exists():
        images_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return str(target.absolute())
