"""One rollout configuration for every command: `--help` shows the defaults a run really uses, and
combinations that cannot work are refused when the config is built, naming their keys."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from medvl_engine import config as config_lib
from medvl_engine.cli import COMMANDS
from medvl_engine.cli import main as cli

# command -> (config class, the values a run must be given); every subcommand derives its flags from it.
COMMAND_CONFIGS = {
    "demo": ("medvl_engine.demo:DemoConfig", {}),
    "score-demo": ("medvl_engine.score_demo:ScoreDemoConfig", {}),
    "score": ("medvl_engine.scoring:ScoreConfig", {"answers": "answers.jsonl"}),
    "rollout-worker": ("medvl_engine.rollout.worker:WorkerConfig", {"model": "m", "connect": "ipc:///tmp/x"}),
    "sft": ("medvl_engine.trainers.config:SFTConfig", {}),
    "grpo": ("medvl_engine.trainers.config:GRPOConfig", {}),
    "eval": ("medvl_engine.evals.evaluate:EvalConfig", {"model": "m", "output": "out"}),
    "passrate": ("medvl_engine.evals.passrate:PassrateConfig", {"model": "m", "output": "out"}),
    "curate": ("medvl_engine.evals.curate:CurateConfig", {"source": "s", "pass_counts": "p", "output": "o"}),
    "report": ("medvl_engine.evals.report:ReportConfig", {"runs": ["run"]}),
    "keys": ("medvl_engine.transport.keys:KeysConfig", {"folder": "keys"}),
    "build-data": ("medvl_engine.databuild.config:BuildDataConfig",
                   {"stage": "filter-text", "output": "o", "input": {"source": "rows.jsonl"}}),
    "bench": ("medvl_engine.bench:BenchConfig", {}),
}


def given_paths(values: dict, prefix: str = "") -> set[str]:
    """The key paths of the values a test gives (`input.source`), not checked against the defaults."""
    out = set()
    for key, value in values.items():
        out |= given_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def config_class(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def leaves(cfg, prefix=""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaves(value, path + ".")
        else:
            yield path, f, value


def test_every_command_is_covered():
    assert set(COMMAND_CONFIGS) == set(COMMANDS)


def test_the_readme_commands_table_lists_every_command():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"^\| `medvl-engine ([a-z-]+)", table, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS), "README's commands table and the CLI differ"


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_help_shows_the_defaults_the_run_uses(command, capsys):
    spec, required = COMMAND_CONFIGS[command]
    resolved = config_lib.build(config_class(spec), required)  # what a run with no flags uses
    parser = argparse.ArgumentParser(allow_abbrev=False)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    helps = {action.dest: action.help or "" for action in parser._actions}
    given = given_paths(required)
    checked = 0
    for path, _, value in leaves(resolved):
        if path in given:
            continue
        assert path in helps, f"{command}: no flag for {path}"
        assert f"(default: {value!r})" in helps[path], f"{command} --{path}: help {helps[path]!r}, run uses {value!r}"
        checked += 1
    assert checked >= 1
    # The text users read is the same.
    with pytest.raises(SystemExit):
        cli([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    path, _, value = next((p, f, v) for p, f, v in leaves(resolved) if p not in given)
    assert f"(default: {value!r})" in text


def _options(command: str) -> set[str]:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return {option for action in parser._actions for option in action.option_strings}


def test_every_command_that_takes_a_config_has_a_dry_run():
    with_config = {command for command in COMMAND_CONFIGS if "--config" in _options(command)}
    assert with_config == {"grpo", "sft", "eval", "passrate", "curate", "rollout-worker", "build-data"}
    for command in COMMAND_CONFIGS:
        assert ("--dry-run" in _options(command)) == (command in with_config), command


@pytest.mark.parametrize("command", ["grpo", "sft", "eval", "passrate", "curate", "rollout-worker", "build-data"])
def test_dry_run_prints_the_resolved_config_and_starts_nothing(command, tmp_path, monkeypatch, capsys):
    import yaml

    spec, required = COMMAND_CONFIGS[command]
    config_file = tmp_path / "given.yaml"
    config_file.write_text(yaml.safe_dump(required))
    run_folder = tmp_path / "cwd"
    run_folder.mkdir()
    monkeypatch.chdir(run_folder)
    # A positional field (build-data's STAGE) is given on the command line, as argparse requires.
    positional = [str(required[f.name]) for f in dataclasses.fields(config_class(spec)) if f.metadata.get("positional")]
    with pytest.raises(SystemExit) as stop:
        cli([command, *positional, "--config", str(config_file), "--dry-run"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config_lib.to_dict(config_lib.build(config_class(spec), required))
    assert not list(run_folder.iterdir())  # no run folder, no output folder, no checkpoint


def test_sft_help_shows_sfts_optimizer_not_the_generic_one():
    parser = argparse.ArgumentParser()
    importlib.import_module("medvl_engine.trainers.sft").add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert "(default: 1e-05)" in helps["optim.lr"] and "(default: 0.0001)" in helps["optim.weight_decay"]
    assert "(default: 'cosine')" in helps["optim.schedule"] and "(default: 0.05)" in helps["optim.warmup_ratio"]


def test_eval_and_passrate_defaults_are_medvlthinkers():
    from medvl_engine.evals.evaluate import EvalConfig
    from medvl_engine.evals.passrate import PassrateConfig

    ev = EvalConfig(model="m", output="o")
    assert (ev.rollout.n, ev.rollout.temperature, ev.rollout.max_response_tokens, ev.rollout.seed) == (1, 0.0, 4096, 42)
    assert (ev.data.source, ev.data.split, ev.data.shuffle) == ("UCSC-VLAA/MedVLThinker-Eval", "test", False)
    pr = PassrateConfig(model="m", output="o")
    assert (pr.rollout.n, pr.rollout.temperature, pr.rollout.max_response_tokens) == (16, 1.0, 4096)
    assert pr.rollout.seed == 42


GRPO_REJECTED = [
    ({"transport": {"workers": 2}}, "transport.workers"),
    ({"transport": {"credits": 4}}, "transport.credits"),
    ({"transport": {"weight_sync": "disk"}}, "transport.weight_sync"),
    ({"transport": {"endpoint": "ipc:///tmp/x", "weight_sync": "memory"}}, "transport.weight_sync"),
    ({"transport": {"weight_sync": "distributed"}}, "transport.weight_sync=distributed.*transport.endpoint"),
    ({"transport": {"endpoint": "ipc:///tmp/x", "workers": 0, "weight_sync": "distributed"}}, "transport.workers"),
    ({"transport": {"endpoint": "ipc:///tmp/x", "weight_sync": "distributed"}, "rollout": {"backend": "vllm"}},
     "weight_sync=distributed.*vllm"),
    ({"transport": {"sync_port": 70000}}, "transport.sync_port"),
    ({"transport": {"endpoint": "ipc:///tmp/x", "weight_sync": "distributed", "sync_backend": "nccl"},
      "rollout": {"device": "cpu"}}, "transport.sync_backend=nccl"),
    ({"rollout": {"temperature": 0.0, "n": 1}}, "rollout.temperature|rollout.n"),
    ({"rollout": {"temperature": 0.0}}, "rollout.temperature"),
    ({"rollout": {"n": 1}}, "rollout.n"),
    ({"rollout": {"n": 1, "dynamic_sampling": True}}, "rollout.dynamic_sampling"),
    ({"rollout": {"weights_endpoint": "tcp://x:1"}}, "unknown key.*weights_endpoint"),
    ({"algo": {"dynamic_sampling": True}}, "unknown key.*dynamic_sampling"),
    ({"algo": {"clip_ratio_c": 1.0}}, "algo.clip_ratio_c"),
    ({"data": {"text_only": True, "ignore_images": True}}, "data.text_only"),
    ({"data": {"max_samples": -1}}, "data.max_samples"),
    ({"rollout": {"timeout_s": -1.0}}, "rollout.timeout_s"),
]


@pytest.mark.parametrize("data, key", GRPO_REJECTED)
def test_grpo_rejects_combinations_that_cannot_work_naming_the_key(data, key):
    from medvl_engine.trainers.config import GRPOConfig

    with pytest.raises(ValueError, match=key):
        config_lib.build(GRPOConfig, data)


@pytest.mark.parametrize("command, data, key", [
    ("eval", {"rollout": {"dynamic_sampling": True, "n": 2, "temperature": 1.0}}, "rollout.dynamic_sampling"),
    ("eval", {"data": {"shuffle": True}}, "data.shuffle"),
    ("eval", {"rollout": {"n": 4}}, "rollout.temperature"),  # greedy n times
    ("eval", {"output": ""}, "output"),
    ("passrate", {"rollout": {"temperature": 0.0, "n": 1}}, "rollout.temperature"),
    ("rollout-worker", {"rollout": {"temperature": 0.0, "n": 1}}, "rollout.temperature"),
    ("rollout-worker", {"shard_index": 2, "num_shards": 2}, "shard_index"),
    ("rollout-worker", {"rollout": {"top_p": 0.9}}, "rollout.top_p"),
    ("rollout-worker", {"connect": ""}, "connect"),
])
def test_other_commands_reject_what_cannot_work_naming_the_key(command, data, key):
    spec, required = COMMAND_CONFIGS[command]
    with pytest.raises(ValueError, match=key):
        config_lib.build(config_class(spec), config_lib.merge(required, data))


def test_a_missing_required_value_names_its_key():
    from medvl_engine.rollout.worker import WorkerConfig

    with pytest.raises(ValueError, match=r"missing required key\(s\).*config\.answers"):
        config_lib.build(config_class(COMMAND_CONFIGS["score"][0]), {})
    with pytest.raises(ValueError, match="model: is required"):
        config_lib.build(WorkerConfig, {"connect": "ipc:///tmp/x"})


def test_a_learner_hands_its_worker_the_run_config_as_a_file(tmp_path):
    from medvl_engine.rollout.worker import WorkerConfig
    from medvl_engine.trainers.config import GRPOConfig
    from medvl_engine.trainers.placement import worker_config

    cfg = config_lib.build(GRPOConfig, {
        "model": {"path": str(tmp_path)}, "transport": {"endpoint": "ipc:///tmp/x", "workers": 2},
        "data": {"max_samples": 5, "shuffle": False}, "rollout": {"n": 3, "max_response_tokens": 17, "seed": 9}})
    path = config_lib.save(worker_config(cfg, "ipc:///tmp/x", shard=1), tmp_path / "rollout-1.yaml")
    worker = config_lib.load(WorkerConfig, path)
    assert worker.data == cfg.data and worker.rollout == cfg.rollout
    assert (worker.shard_index, worker.num_shards, worker.producer_id) == (1, 2, "rollout-1")


def test_the_engine_seed_and_the_stream_seed_are_two_settings(monkeypatch):
    # rollout.seed derives each request's seed from its stream position; rollout.engine_seed is the
    # engine's own (vLLM's LLM(seed=...)); one used to set both.
    from medvl_engine.rollout import backend as backend_lib
    from medvl_engine.rollout.config import RolloutConfig, make_rollout_backend

    seen = {}
    monkeypatch.setattr(backend_lib, "make_backend", lambda name, path, **kwargs: seen.update(name=name, **kwargs))
    make_rollout_backend(RolloutConfig(backend="vllm", seed=7, engine_seed=42), "folder")
    assert seen["name"] == "vllm" and seen["seed"] == 42
    with pytest.raises(ValueError, match="rollout.engine_seed"):
        RolloutConfig(engine_seed=-1)
