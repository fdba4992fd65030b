"""Process-group set-up and tear-down for the learner, under torchrun, the deepspeed launcher or plain python.

A plain `python` run gets a one-rank group (DeepSpeed otherwise looks for MPI); every run ends with
`shutdown()`: a barrier before `destroy_process_group` avoids the abort at exit seen in about one in
three 2-rank gloo runs without it.

Before anything is built, `check_build_locks()` clears the lock a run killed while DeepSpeed compiled
an op left in the torch extensions folder (every later build of that op would wait on it forever,
without a word).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
from pathlib import Path

from medvl_engine.errors import UserError

logger = logging.getLogger(__name__)

# torch builds an op under a `lock` file (torch.utils.file_baton) that the builder creates and holds open
# until the build ends (DeepSpeed's CPU comm op: ~35 s, cpu_adam ~60 s on 2 cores). A lock nobody holds
# open is stale; the grace period covers the microseconds between a builder closing and deleting it.
STALE_LOCK_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extensions_root() -> Path:
    """Where torch builds and caches compiled ops: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _held_open(path: Path) -> bool | None:
    """Whether a process of this user holds `path` open (Linux /proc); None where that cannot be told."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = str(path.resolve())
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # another user's process, or one that has just ended
            continue
    return False


def check_build_locks(root: Path | None = None, *, stale_after_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove, with a warning, the op build locks under `root` (default: the torch extensions folder) that
    no process holds; returns them. A stale lock this process cannot remove safely (another user's, or no
    /proc to tell whether a build holds it) is a `UserError` naming the file."""
    root = extensions_root() if root is None else Path(root)
    removed = []
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        try:
            info = lock.stat()
        except FileNotFoundError:  # a build just finished
            continue
        age = time.time() - info.st_mtime
        if age < stale_after_s:
            continue
        held = _held_open(lock)
        if held:
            continue
        if held is None or info.st_uid != os.getuid():
            raise UserError(f"{lock}: a build lock {age:.0f} s old that may be stale (a run killed while it "
                            f"compiled {lock.parent.name}); every build of that op waits on it forever. If no "
                            "build is running, remove it and start again")
        lock.unlink(missing_ok=True)
        logger.warning("removed the stale build lock %s (%.0f s old, no process holds it): a run was killed "
                       "while it compiled %s", lock, age, lock.parent.name)
        removed.append(lock)
    return removed


def init_distributed(backend: str = "") -> tuple[int, int]:
    """Join (or create) the default process group; returns (rank, world_size). Stale op build locks are
    cleared first: DeepSpeed builds its CPU comm op on the way."""
    check_build_locks()
    import deepspeed
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        # DeepSpeed prints "DeepSpeed ... built successfully" when it loads its CPU comm op: on stdout, between
        # a command's result rows. It goes to the log instead (debug).
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        for line in printed.getvalue().splitlines():
            logger.debug("deepspeed: %s", line)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the learner's own randomness; sampling seeds come
    from the prompt stream)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
