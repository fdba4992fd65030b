"""The run folder is checked before anything starts: --resume needs a checkpoint, a new run refuses a folder
an earlier run used, and --overwrite removes only a folder medvl-engine wrote."""

from __future__ import annotations

import logging

import pytest
import yaml

from medvl_engine.errors import RunFolderError
from medvl_engine.trainers.checkpoint import prepare_run_dir


def test_a_new_run_refuses_a_used_folder_and_overwrite_replaces_only_ours(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False)  # nothing there yet
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, resume=False)  # a folder with other files but no run is fine
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunFolderError, match=r"earlier run \(metrics.jsonl\).*--resume.*--overwrite"):
        prepare_run_dir(run, resume=False)
    with pytest.raises(RunFolderError, match="no config.yaml"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"  # refused: nothing removed
    (run / "config.yaml").write_text("steps: 1\n")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert not run.exists()


def test_resume_needs_a_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RunFolderError, match="--resume: no complete checkpoint"):
        prepare_run_dir(run, resume=True)
    (run / "checkpoints" / "step_000002").mkdir(parents=True)  # a save cut short: no client_state.pt
    with pytest.raises(RunFolderError, match="no complete checkpoint"):
        prepare_run_dir(run, resume=True)
    (run / "checkpoints" / "step_000002" / "client_state.pt").write_bytes(b"")
    prepare_run_dir(run, resume=True)


def _resumable(run, cfg):
    """A run folder as a run of `cfg` leaves it: its config.yaml and one complete checkpoint."""
    from medvl_engine import config as config_lib

    config_lib.save(cfg, run / "config.yaml")
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "client_state.pt").write_bytes(b"")
    return run


def test_resume_with_changed_settings_names_them_and_is_refused(tmp_path, caplog):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers.config import GRPOConfig, OptimConfig

    run = _resumable(tmp_path / "run", GRPOConfig())
    changed = GRPOConfig(optim=OptimConfig(lr=2e-6), seed=3)
    changed.rollout.temperature = 0.7
    with pytest.raises(RunFolderError, match="--allow-changes") as refused:
        prepare_run_dir(run, resume=True, config=config_lib.to_dict(changed))
    message = str(refused.value)
    for change in ("optim.lr: 1e-06 -> 2e-06", "rollout.temperature: 1.0 -> 0.7", "seed: 0 -> 3"):
        assert change in message
    assert message.count("->") == 3

    with caplog.at_level(logging.WARNING, logger="medvl_engine"):
        prepare_run_dir(run, resume=True, config=config_lib.to_dict(changed), allow_changes=True)
    assert "changed settings" in caplog.text and "optim.lr: 1e-06 -> 2e-06" in caplog.text


def test_resume_may_run_longer_log_and_checkpoint_differently(tmp_path, caplog):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers.config import CheckpointConfig, GRPOConfig, LoggingConfig, SFTConfig

    run = _resumable(tmp_path / "run", GRPOConfig(steps=4))
    longer = GRPOConfig(steps=8, logging=LoggingConfig(log_every=5, rollouts=False),
                        checkpoint=CheckpointConfig(every=2, keep=3, export=False))
    longer.transport.endpoint, longer.transport.workers = "ipc:///tmp/elsewhere.sock", 2
    with caplog.at_level(logging.WARNING, logger="medvl_engine"):
        prepare_run_dir(run, resume=True, config=config_lib.to_dict(longer))
    assert caplog.records == []

    sft_run = _resumable(tmp_path / "sft", SFTConfig(max_steps=10))
    prepare_run_dir(sft_run, resume=True, config=config_lib.to_dict(SFTConfig(max_steps=20, epochs=8)))
    with pytest.raises(RunFolderError, match=r"global_batch_size: 16 -> 32"):
        prepare_run_dir(sft_run, resume=True, config=config_lib.to_dict(SFTConfig(global_batch_size=32)))


def test_resume_without_the_saved_settings_is_refused(tmp_path):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers.config import GRPOConfig

    run = _resumable(tmp_path / "run", GRPOConfig())
    (run / "config.yaml").unlink()
    with pytest.raises(RunFolderError, match=r"config.yaml is missing"):
        prepare_run_dir(run, resume=True, config=config_lib.to_dict(GRPOConfig()))
    prepare_run_dir(run, resume=True, config=config_lib.to_dict(GRPOConfig()), allow_changes=True)


@pytest.mark.parametrize("command", ["grpo", "sft"])
def test_the_commands_check_the_settings_before_anything_starts(tmp_path, command):
    """`grpo`/`sft --resume` refuse a changed lr before a model loads; `--allow-changes` is a flag of both."""
    import argparse
    import dataclasses
    import importlib

    from medvl_engine import config as config_lib

    module = importlib.import_module(f"medvl_engine.trainers.{command}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    cls = module.GRPOConfig if command == "grpo" else module.SFTConfig
    run = tmp_path / "run"
    args = ["--model", str(tmp_path / "no-model"), "--output", str(run)]
    cfg = config_lib.from_args(cls, parser.parse_args(args))
    _resumable(run, cfg)
    changed = config_lib.from_args(cls, parser.parse_args([*args, "--optim.lr", "0.5", "--resume"]))
    assert changed.resume and not changed.allow_changes
    with pytest.raises(RunFolderError, match=r"optim.lr: .* -> 0.5"):
        module.run(changed)  # --resume is read from the config
    with pytest.raises(RunFolderError, match=r"optim.lr: .* -> 0.5"):
        # run()'s keywords override the config's switches
        module.run(dataclasses.replace(changed, resume=False, allow_changes=True), resume=True, allow_changes=False)
    allowed = config_lib.from_args(cls, parser.parse_args([*args, "--resume", "--allow-changes"]))
    assert allowed.allow_changes and "--allow-changes" in parser.format_help()


@pytest.mark.parametrize("command", ["grpo", "sft"])
def test_the_config_of_a_finished_run_starts_no_resume_by_itself(tmp_path, capsys, command):
    """`resume`, `overwrite`, `allow_changes` are never saved into config.yaml: `--config RUN/config.yaml`
    of a finished (even a resumed) run is refused as a new run in a used folder, not silently continued."""
    from medvl_engine import config as config_lib
    from medvl_engine.cli import main as cli
    from medvl_engine.trainers.config import GRPOConfig, SFTConfig

    run = tmp_path / "run"
    cls = GRPOConfig if command == "grpo" else SFTConfig
    cfg = config_lib.build(cls, {"model": str(tmp_path / "no-model"), "output": str(run), "resume": True,
                                 "overwrite": True, "allow_changes": True})
    _resumable(run, cfg)
    saved = (run / "config.yaml").read_text()
    assert not {"resume", "overwrite", "allow_changes"} & set(yaml.safe_load(saved))
    assert cli([command, "--config", str(run / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume continues it" in err
    assert (run / "checkpoints" / "step_000002").is_dir()  # nothing resumed, nothing removed


def test_a_run_folder_of_the_old_spelling_resumes_without_allow_changes(tmp_path, caplog):
    """A config.yaml written before `output` (the folder under `logging.run_dir`) is the same run."""
    from medvl_engine import config as config_lib
    from medvl_engine.trainers.config import GRPOConfig

    run = _resumable(tmp_path / "run", GRPOConfig(output=str(tmp_path / "run")))
    old = yaml.safe_load((run / "config.yaml").read_text())
    old["logging"]["run_dir"] = old.pop("output")
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = config_lib.load(GRPOConfig, run / "config.yaml", overrides={"resume": True})  # warns: old spelling
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medvl_engine"):
        prepare_run_dir(run, resume=True, config=config_lib.to_dict(cfg))
    assert caplog.records == []  # no refusal, no "changed settings"
