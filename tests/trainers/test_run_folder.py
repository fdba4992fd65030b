"""The run folder is checked before anything starts: --resume needs a checkpoint, a new run refuses a folder
an earlier run used, and --overwrite removes only a folder medvl-engine wrote."""

from __future__ import annotations

import pytest

from medvl_engine.trainers.checkpoint import prepare_run_dir


def test_a_new_run_refuses_a_used_folder_and_overwrite_replaces_only_ours(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False)  # nothing there yet
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, resume=False)  # a folder with other files but no run is fine
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError, match=r"earlier run \(metrics.jsonl\).*--resume.*--overwrite"):
        prepare_run_dir(run, resume=False)
    with pytest.raises(FileExistsError, match="no config.yaml"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"  # refused: nothing removed
    (run / "config.yaml").write_text("steps: 1\n")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert not run.exists()


def test_resume_needs_a_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="--resume: no complete checkpoint"):
        prepare_run_dir(run, resume=True)
    (run / "checkpoints" / "step_000002").mkdir(parents=True)  # a save cut short: no client_state.pt
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        prepare_run_dir(run, resume=True)
    (run / "checkpoints" / "step_000002" / "client_state.pt").write_bytes(b"")
    prepare_run_dir(run, resume=True)
