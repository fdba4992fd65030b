"""Run configs: flags derived from the fields, YAML/TOML files, overrides, checks, DeepSpeed's JSON."""

from __future__ import annotations

import argparse
import logging

import pytest

from medvl_engine import config as config_lib
from medvl_engine.errors import ConfigError
from medvl_engine.trainers.config import GRPOConfig, OptimConfig, SFTConfig, deepspeed_config


def parse(cls, argv):
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, cls)  # --resume among the flags: a field of the run config
    return config_lib.from_args(cls, parser.parse_args(argv))


def test_defaults_are_medvlthinkers_recipe():
    grpo = GRPOConfig()
    assert (grpo.rollout.n, grpo.rollout.temperature, grpo.rollout.top_p) == (8, 1.0, 1.0)
    assert (grpo.optim.lr, grpo.optim.schedule, grpo.optim.weight_decay, grpo.optim.grad_clip) == (
        1e-6, "constant", 0.01, 1.0)
    assert (grpo.algo.kl_coef, grpo.algo.kl_type, grpo.algo.entropy_coef) == (0.01, "low_var_kl", 0.0)
    assert (grpo.algo.clip_low, grpo.algo.clip_high, grpo.algo.loss_agg) == (0.2, 0.2, "token-mean")
    assert grpo.algo.clip_ratio_c == 3.0  # verl's dual-clip default at the commit MedVLThinker pins
    assert (grpo.algo.prompts_per_step, grpo.algo.mini_batches) == (256, 2)
    assert (grpo.rollout.max_prompt_tokens, grpo.rollout.max_response_tokens, grpo.model.dtype) == (2048, 4096, "bf16")
    sft = SFTConfig()
    assert (sft.optim.lr, sft.optim.schedule, sft.optim.warmup_ratio, sft.epochs, sft.global_batch_size) == (
        1e-5, "cosine", 0.05, 5, 16)
    assert (sft.optim.weight_decay, sft.optim.betas) == (1e-4, (0.9, 0.95))


def test_every_field_is_a_flag_and_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 2e-6\nalgo:\n  clip_high: 0.28\n  advantage: drgrpo\nsteps: 7\n")
    cfg = parse(GRPOConfig, ["--config", str(path), "--optim.lr", "3e-6", "--rollout.n", "4",
                             "--no-model.gradient-checkpointing", "--optim.betas", "0.8", "0.9", "--resume"])
    assert cfg.optim.lr == 3e-6  # the flag wins over the file
    assert (cfg.algo.clip_high, cfg.algo.advantage, cfg.steps) == (0.28, "drgrpo", 7)  # from the file
    assert cfg.rollout.n == 4 and cfg.model.gradient_checkpointing is False and cfg.optim.betas == (0.8, 0.9)
    assert cfg.algo.kl_coef == 0.01  # untouched default
    assert cfg.resume and not cfg.overwrite


def test_a_partial_section_keeps_the_run_configs_own_defaults():
    sft = config_lib.build(SFTConfig, {"optim": {"lr": 2e-5}})
    assert (sft.optim.lr, sft.optim.schedule, sft.optim.betas) == (2e-5, "cosine", (0.9, 0.95))


def test_toml_and_round_trip(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 3\n[algo]\nkl_type = "k2"\n[rollout]\ndynamic_sampling = true\n')
    cfg = config_lib.load(GRPOConfig, path)
    assert cfg.algo.kl_type == "k2" and cfg.rollout.dynamic_sampling and cfg.steps == 3
    saved = config_lib.save(cfg, tmp_path / "out.yaml")
    assert config_lib.load(GRPOConfig, saved) == cfg


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"algo": {"kl_type": "k9"}}, "config.algo.kl_type"),
    ({"algo": {"prompts_per_step": 6, "mini_batches": 4}}, "divisible"),
    ({"rollout": {"n": "eight"}}, "config.rollout.n"),
    ({"model": {"colour": 1}}, "unknown key"),
])
def test_bad_values_name_their_place(data, message):
    with pytest.raises(ValueError, match=message):
        config_lib.build(GRPOConfig, data)


def test_unknown_choice_on_the_command_line_is_refused():
    with pytest.raises(SystemExit):
        parse(GRPOConfig, ["--algo.advantage", "ppo"])


def test_deepspeed_config_from_components():
    cfg = GRPOConfig()
    cfg.deepspeed.zero_stage, cfg.deepspeed.micro_batch_size = 3, 4
    ds = deepspeed_config(cfg.optim, cfg.deepspeed, "bf16", train_batch_size=128 * 8, world_size=8, total_steps=10)
    assert ds["gradient_accumulation_steps"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 1e-6 and ds["gradient_clipping"] == 1.0
    assert "scheduler" not in ds  # constant lr, no warmup: DeepSpeed's WarmupLR would start at 0
    cosine = deepspeed_config(OptimConfig(schedule="cosine", warmup_ratio=0.1), cfg.deepspeed, "fp32",
                              train_batch_size=16, world_size=2, total_steps=50)
    assert cosine["scheduler"]["type"] == "WarmupCosineLR"
    assert cosine["scheduler"]["params"]["warmup_num_steps"] == 5
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config(cfg.optim, cfg.deepspeed, "bf16", train_batch_size=10, world_size=8, total_steps=1)


# -- one spelling of the run folder and the model in every command; the old ones for one release ------------

DEPRECATED = "is deprecated and will be removed in the next release: use `output` (--output)"


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
def test_the_old_run_folder_key_in_a_file_still_works_with_a_warning(cls, tmp_path, caplog):
    path = tmp_path / "run.yaml"
    path.write_text("logging:\n  run_dir: runs/old\n  log_every: 3\n")
    with caplog.at_level(logging.WARNING, logger="medvl_engine"):
        cfg = config_lib.load(cls, path)
    assert cfg.output == "runs/old" and cfg.logging.log_every == 3
    assert f"`logging.run_dir` (--logging.run-dir) {DEPRECATED}" in caplog.text and str(path) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medvl_engine"):  # the new spelling: no warning
        assert config_lib.build(cls, {"output": "runs/new"}).output == "runs/new"
    assert caplog.records == []


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
def test_the_old_run_folder_flag_still_works_with_a_warning(cls, caplog):
    with caplog.at_level(logging.WARNING, logger="medvl_engine"):
        cfg = parse(cls, ["--logging.run-dir", "runs/old", "--logging.log-every", "2"])
    assert cfg.output == "runs/old" and cfg.logging.log_every == 2
    assert f"command line: `logging.run_dir` (--logging.run-dir) {DEPRECATED}" in caplog.text
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, cls)
    assert "--logging.run-dir" not in parser.format_help() and "--output" in parser.format_help()


def test_an_old_and_a_new_key_that_differ_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"`logging.run_dir` \(--logging.run-dir\) is the old spelling of `output` "
                                          r"\(--output\).*logging.run_dir='a', output='b'"):
        config_lib.build(GRPOConfig, {"logging": {"run_dir": "a"}, "output": "b"})
    with pytest.raises(ConfigError, match="old spelling of `output`"):
        parse(SFTConfig, ["--logging.run-dir", "a", "--output", "b"])
    path = tmp_path / "run.yaml"
    path.write_text("output: a\nlogging:\n  run_dir: b\n")
    with pytest.raises(ConfigError, match=f"{path}: .*old spelling of `output`"):
        config_lib.load(GRPOConfig, path)
    # The same value twice is no conflict; a flag in the new spelling overrides a file in the old one.
    assert config_lib.build(GRPOConfig, {"logging": {"run_dir": "a"}, "output": "a"}).output == "a"
    path.write_text("logging:\n  run_dir: a\n")
    assert parse(GRPOConfig, ["--config", str(path), "--output", "b"]).output == "b"


@pytest.mark.parametrize("command", ["grpo", "sft"])
def test_the_dry_run_prints_only_the_new_spelling(command, tmp_path, capsys):
    import yaml

    from medvl_engine.cli import main as cli

    path = tmp_path / "old.yaml"
    path.write_text("logging:\n  run_dir: runs/old\n")
    with pytest.raises(SystemExit) as stop:
        cli([command, "--config", str(path), "--model", "smollm2", "--resume", "--dry-run"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output"] == "runs/old" and printed["model"]["path"] == "smollm2"
    assert "run_dir" not in printed["logging"]
    assert not {"resume", "overwrite", "allow_changes"} & set(printed)  # switches, not settings


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
def test_a_plain_model_value_is_the_model_path(cls, tmp_path):
    assert parse(cls, ["--model", "m1", "--model.dtype", "fp32"]).model.path == "m1"
    assert parse(cls, ["--model.path", "m2"]).model.path == "m2"
    path = tmp_path / "run.yaml"
    path.write_text("model: m3\n")
    cfg = parse(cls, ["--config", str(path), "--no-model.gradient-checkpointing"])
    assert (cfg.model.path, cfg.model.gradient_checkpointing, cfg.model.dtype) == ("m3", False, "bf16")
    assert config_lib.to_dict(config_lib.build(cls, {"model": "m4"}))["model"]["path"] == "m4"


def test_the_run_switches_are_never_saved(tmp_path):
    cfg = config_lib.build(GRPOConfig, {"output": str(tmp_path), "resume": True, "overwrite": True,
                                        "allow_changes": True})
    assert cfg.resume and cfg.overwrite and cfg.allow_changes
    saved = config_lib.load(GRPOConfig, config_lib.save(cfg, tmp_path / "config.yaml"))
    assert not (saved.resume or saved.overwrite or saved.allow_changes) and saved.output == str(tmp_path)
    assert "resume" not in (tmp_path / "config.yaml").read_text()
    assert config_lib.build(GRPOConfig, config_lib.to_dict(cfg, switches=True)) == cfg  # a whole copy keeps them


def test_the_demo_takes_output_and_its_old_run_dir(caplog):
    from medvl_engine import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with caplog.at_level(logging.WARNING, logger="medvl_engine"):
        cfg = config_lib.from_args(demo.DemoConfig, parser.parse_args(["--run-dir", "runs/d"]))
    assert cfg.output == "runs/d" and "`run_dir` (--run-dir) is deprecated" in caplog.text
    assert config_lib.from_args(demo.DemoConfig, parser.parse_args(["--output", "runs/e"])).output == "runs/e"
    assert demo.grpo_config(cfg, "m", cfg.output, "ipc:///tmp/x").output == "runs/d"
