"""The shipped recipes (`configs/*.yaml`): each loads, validates and prints its resolved config with
`--dry-run` (starting nothing, writing nothing), the printed values are the file's, and the numbers are
MedVLThinker's (its train/ and eval/ scripts, verl 54b2677's defaults)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_run_config import COMMAND_CONFIGS, config_class

from medvl_engine import config as config_lib
from medvl_engine.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def command_of(path: Path) -> str:
    """The command a recipe is for: its file name up to the first dash (`grpo-m23k-3b.yaml` -> grpo)."""
    return path.stem.split("-")[0]


def leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def dry_run(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_recipes_for_every_stage():
    assert {command_of(p) for p in RECIPES} == {"passrate", "curate", "grpo", "sft", "eval"}
    assert len(RECIPES) >= 12


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_run_prints_the_files_values(path, tmp_path, monkeypatch, capsys):
    command = command_of(path)
    monkeypatch.chdir(tmp_path)  # the recipes' run folders are relative: a dry run must create none
    printed = dry_run([command, "--config", str(path), "--dry-run"], capsys)
    cls = config_class(COMMAND_CONFIGS[command][0])
    assert printed == config_lib.to_dict(config_lib.load(cls, path))  # the whole resolved config
    assert config_lib.build(cls, printed) == config_lib.load(cls, path)  # and it reads back the same
    written = dict(leaves(config_lib.read_file(path)))
    shown = dict(leaves(printed))
    for key, value in written.items():
        assert shown[key] == value, f"{path.name}: {key} is {shown[key]!r}, the file says {value!r}"
    assert not list(tmp_path.iterdir())


def test_flags_override_a_recipe_in_a_dry_run(capsys):
    path = ROOT / "configs" / "grpo-m23k-7b.yaml"
    printed = dry_run(["grpo", "--config", str(path), "--optim.lr", "2e-6", "--rollout.n", "16", "--dry-run"], capsys)
    assert (printed["optim"]["lr"], printed["rollout"]["n"]) == (2e-6, 16)
    assert printed["algo"]["kl_coef"] == 0.01 and printed["model"]["path"] == "models/Qwen2.5-VL-7B-Instruct"


def test_a_dry_run_of_a_config_that_cannot_work_is_an_error_naming_the_key(capsys):
    import argparse

    from medvl_engine.trainers import grpo

    parser = argparse.ArgumentParser()
    grpo.add_arguments(parser)
    args = parser.parse_args(["--config", str(ROOT / "configs" / "grpo-m23k-3b.yaml"), "--rollout.n", "1",
                              "--dry-run"])
    with pytest.raises(ValueError, match="rollout.n"):
        config_lib.from_args(config_class(COMMAND_CONFIGS["grpo"][0]), args)
    assert capsys.readouterr().out == ""


def test_a_dry_run_loads_no_model_and_no_deepspeed():
    code = ("import sys\nfrom medvl_engine.cli import main\n"
            "try:\n    main(['grpo', '--config', 'configs/grpo-m23k-32b.yaml', '--dry-run'])\n"
            "except SystemExit as stop:\n    assert stop.code == 0\n"
            "print(sorted(m for m in ('deepspeed', 'transformers', 'vllm', 'sglang') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def recipe(name: str) -> dict:
    return dict(leaves(config_lib.read_file(ROOT / "configs" / name)))


# The numbers each recipe must hold, from MedVLThinker's scripts (train/*.sh, train/sft/*.sh,
# eval/eval_commands.sh, eval/estimate_pass_rate.sh) and verl 54b2677's defaults.
GRPO_COMMON = {
    "optim.lr": 1e-6, "optim.weight_decay": 0.01, "optim.grad_clip": 1.0, "optim.schedule": "constant",
    "optim.warmup_ratio": 0.0, "rollout.backend": "vllm", "rollout.n": 8, "rollout.temperature": 1.0,
    "rollout.top_p": 1.0, "rollout.top_k": -1, "rollout.max_prompt_tokens": 2048, "rollout.max_response_tokens": 4096,
    "rollout.max_staleness": 0, "rollout.mem_fraction_static": 0.6, "algo.mini_batches": 2, "algo.advantage": "grpo",
    "algo.clip_low": 0.2, "algo.clip_high": 0.2, "algo.clip_ratio_c": 3.0, "algo.kl_coef": 0.01,
    "algo.kl_type": "low_var_kl", "algo.entropy_coef": 0.0, "algo.loss_agg": "token-mean", "data.shuffle": True,
    "checkpoint.every": 50, "model.gradient_checkpointing": True,
}
SFT_COMMON = {
    "optim.lr": 1e-5, "optim.weight_decay": 1e-4, "optim.betas": [0.9, 0.95], "optim.schedule": "cosine",
    "optim.warmup_ratio": 0.05, "epochs": 5, "global_batch_size": 16, "deepspeed.micro_batch_size": 1,
    "model.gradient_checkpointing": False, "target": "reasoning",
    "data.source": "UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized",
}
EXPECTED = {
    "grpo-m23k-3b.yaml": {**GRPO_COMMON, "algo.prompts_per_step": 256, "deepspeed.micro_batch_size": 32,
                          "steps": 320, "model.path": "models/Qwen2.5-VL-3B-Instruct"},
    "grpo-m23k-7b.yaml": {**GRPO_COMMON, "algo.prompts_per_step": 256, "deepspeed.micro_batch_size": 32,
                          "steps": 320, "model.path": "models/Qwen2.5-VL-7B-Instruct"},
    "grpo-m23k-32b.yaml": {**GRPO_COMMON, "algo.prompts_per_step": 128, "deepspeed.micro_batch_size": 16,
                           "steps": 645, "checkpoint.keep": 2, "model.path": "models/Qwen2.5-VL-32B-Instruct"},
    "grpo-pmc_vqa-3b.yaml": {**GRPO_COMMON, "algo.prompts_per_step": 256, "steps": 451,
                             "data.source": "data/pmc_vqa-3b-filtered/dataset"},
    "grpo-pmc_vqa-7b.yaml": {**GRPO_COMMON, "algo.prompts_per_step": 256, "steps": 451,
                             "data.source": "data/pmc_vqa-3b-filtered/dataset"},
    "sft-pmc_vqa-3b.yaml": {**SFT_COMMON, "model.path": "models/Qwen2.5-VL-3B-Instruct"},
    "sft-pmc_vqa-7b.yaml": {**SFT_COMMON, "model.path": "models/Qwen2.5-VL-7B-Instruct"},
    "eval.yaml": {"repeats": 3, "data.source": "UCSC-VLAA/MedVLThinker-Eval", "data.split": "test",
                  "rollout.n": 1, "rollout.temperature": 0.0, "rollout.top_p": 1.0,
                  "rollout.max_response_tokens": 4096, "rollout.seed": 42, "rollout.dtype": "bf16"},
    "passrate-m23k-3b.yaml": {"data.source": "UCSC-VLAA/MedVLThinker-m23k-tokenized", "data.split": "train",
                              "rollout.n": 16, "rollout.temperature": 1.0, "rollout.max_response_tokens": 4096,
                              "rollout.seed": 42, "model": "models/Qwen2.5-VL-3B-Instruct"},
    "passrate-pmc_vqa-3b.yaml": {"data.source": "UCSC-VLAA/MedVLThinker-pmc_vqa", "rollout.n": 16,
                                 "rollout.temperature": 1.0, "model": "models/Qwen2.5-VL-3B-Instruct"},
    "curate-m23k.yaml": {"min_pass": 1, "max_pass": 7, "order": "easy_to_hard", "seed": 42,
                         "pass_counts": "runs/passrate-m23k-3b"},
    "curate-pmc_vqa.yaml": {"min_pass": 1, "max_pass": 7, "order": "easy_to_hard", "seed": 42,
                            "pass_counts": "runs/passrate-pmc_vqa-3b"},
}


def test_every_recipe_has_its_numbers_checked():
    assert set(EXPECTED) == {p.name for p in RECIPES}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_values_are_medvlthinkers(name):
    values = recipe(name)
    for key, expected in EXPECTED[name].items():
        assert values.get(key) == expected, f"{name}: {key} is {values.get(key)!r}, MedVLThinker's is {expected!r}"


def test_the_recipes_chain_into_each_other():
    """passrate's output is curate's pass counts; curate's dataset is what GRPO reads."""
    for data in ("m23k", "pmc_vqa"):
        passrate, curate = recipe(f"passrate-{data}-3b.yaml"), recipe(f"curate-{data}.yaml")
        assert curate["pass_counts"] == passrate["output"] and curate["source"] == passrate["data.source"]
        for path in (ROOT / "configs").glob(f"grpo-{data}-*.yaml"):
            assert recipe(path.name)["data.source"] == f"{curate['output']}/dataset"


def test_the_readme_points_at_real_recipes():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"configs/[\w.-]+\.yaml", text))
    assert named, "the README names no recipe"
    for name in named:
        assert (ROOT / name).is_file(), f"README names {name}, which does not exist"
    # The command examples name files under configs/, not a `grpo.yaml` nobody ships.
    assert not re.search(r"--config (grpo|sft)\.yaml", text)
    assert {p.name for p in RECIPES} <= {Path(n).name for n in named}, "the README's recipe list is incomplete"
