"""A run killed while DeepSpeed compiled an op leaves torch's build lock behind, and every later build of the
op waits on it forever: the learner clears a lock no process holds before DeepSpeed starts, and keeps one
a live build holds."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from torch.utils.file_baton import FileBaton

from medvl_engine.trainers import distributed
from medvl_engine.trainers.distributed import check_build_locks


def _lock(root, age_s: float, name: str = "deepspeed_shm_comm"):
    folder = root / "py311_cpu" / name
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see which process holds a lock")
def test_a_stale_lock_is_removed_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, age_s=600)
    assert not FileBaton(str(lock)).try_acquire()  # what every later build meets: it would wait forever
    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        assert check_build_locks() == [lock]
    assert not lock.exists()
    assert f"removed the stale build lock {lock}" in caplog.text and "deepspeed_shm_comm" in caplog.text
    baton = FileBaton(str(lock))
    assert baton.try_acquire()  # the next build goes ahead
    baton.release()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see which process holds a lock")
def test_a_lock_a_live_build_holds_open_is_kept(tmp_path):
    lock = _lock(tmp_path, age_s=600, name="cpu_adam")
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; os.open({str(lock)!r}, os.O_RDONLY); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert check_build_locks(tmp_path) == []
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert check_build_locks(tmp_path) == [lock]


def test_a_fresh_lock_is_left_to_its_build(tmp_path):
    lock = _lock(tmp_path, age_s=1)
    assert check_build_locks(tmp_path) == []
    assert lock.exists()


def test_without_proc_a_stale_lock_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from medvl_engine.errors import UserError

    lock = _lock(tmp_path, age_s=600)
    monkeypatch.setattr(distributed, "_held_open", lambda path: None)
    with pytest.raises(UserError, match=f"{lock}: a build lock 600 s old that may be stale"):
        check_build_locks(tmp_path)
    assert lock.exists()


def test_init_distributed_clears_stale_locks_before_deepspeed_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "check_build_locks", lambda: calls.append("checked") or [])
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it now fails: the check came first
    with pytest.raises(ImportError):
        distributed.init_distributed()
    assert calls == ["checked"]
