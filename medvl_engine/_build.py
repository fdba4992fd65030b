"""Loads the C++ extension and, in a source checkout, checks that it was built from the current csrc/.

An editable install does not rebuild on import (worker processes would race on one build folder);
instead the extension carries the SHA-256 of the sources it was compiled from (CMakeLists.txt computes
it) and this module recomputes it the same way, so an edit to csrc/ gives a clear request to rebuild
rather than a silently stale extension.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_REBUILD = "pip install --no-build-isolation --no-deps -e ."


def source_hash(root: Path) -> str:
    """SHA-256 over `relpath:sha256(content)` lines of csrc/ sources, sorted (as CMakeLists.txt)."""
    files = sorted(
        p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*") if p.suffix in {".cpp", ".hpp", ".h"}
    )
    lines = "".join(f"{f}:{hashlib.sha256((root / f).read_bytes()).hexdigest()}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


@functools.cache
def load_native():
    """Import `medvl_engine._native` (checked once per process); raise ImportError naming the fix when it is
    missing or stale."""
    try:
        from medvl_engine import _native
    except ImportError as exc:
        raise ImportError(f"medvl_engine._native is not built: run `{_REBUILD}` in the source tree") from exc
    root = Path(__file__).resolve().parent.parent
    if (root / "csrc").is_dir() and (root / "CMakeLists.txt").is_file():
        current = source_hash(root)
        if current != _native.SOURCE_HASH:
            raise ImportError(
                f"medvl_engine._native was built from other sources than {root / 'csrc'} holds now: "
                f"rebuild it with `{_REBUILD}`"
            )
    return _native
