"""A test double: the `medvl-engine rollout-worker` command with an hf engine that raises on every request.

    python broken_engine_worker.py [medvl-engine arguments ...] rollout-worker ...

MEDVL_TEST_BROKEN_ENGINE says when: `always`, or `once:MARKER`: only in the first process (the one that
finds no file MARKER, and creates it), so that its restart has a working engine. Everything else is the
real command."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _raise(self, batch):
    raise RuntimeError("injected engine fault (test double): every request fails")


def main() -> int:
    when = os.environ.get("MEDVL_TEST_BROKEN_ENGINE", "always")
    broken = when == "always"
    if when.startswith("once:"):
        marker = Path(when[len("once:"):])
        broken = not marker.exists()
        marker.touch()
    if broken:
        from medvl_engine.rollout.hf_backend import HFBackend

        HFBackend._generate_batch = _raise
    from medvl_engine.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
