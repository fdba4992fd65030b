"""Config values that cannot work are refused when the config is built, before DeepSpeed or a model starts,
with a message that names the key and the value given."""

from __future__ import annotations

import pytest

from medvl_engine import config as config_lib
from medvl_engine.cli import main as cli
from medvl_engine.rollout.config import RolloutConfig
from medvl_engine.trainers.config import GRPOConfig, SFTConfig


@pytest.mark.parametrize("data, message", [
    ({"algo": {"clip_low": 0.3, "clip_high": 0.2}}, r"algo.clip_high \(0.2\) is below algo.clip_low \(0.3\)"),
    ({"optim": {"lr": float("inf")}}, "optim.lr: must be a finite number, got inf"),
    ({"optim": {"lr": float("nan")}}, "optim.lr: must be a finite number, got nan"),
    ({"optim": {"grad_clip": float("nan")}}, "optim.grad_clip: must be a finite number, got nan"),
    ({"optim": {"weight_decay": float("inf")}}, "optim.weight_decay: must be a finite number, got inf"),
    ({"optim": {"eps": -1e-8}}, "optim.eps: must be > 0, got -1e-08"),
    ({"optim": {"weight_decay": -0.5}}, "optim.weight_decay: must be >= 0, got -0.5"),
    ({"algo": {"clip_low": -0.1}}, "algo.clip_low: must be >= 0, got -0.1"),
    ({"algo": {"kl_coef": -0.01}}, "algo.kl_coef: must be >= 0, got -0.01"),
    ({"algo": {"entropy_coef": float("inf")}}, "algo.entropy_coef: must be a finite number, got inf"),
    ({"algo": {"epsilon": 0.0}}, "algo.epsilon: must be > 0, got 0.0"),
    ({"algo": {"max_draw_factor": 0}}, "algo.max_draw_factor: must be >= 1, got 0"),
    ({"transport": {"endpoint": "ipc:///tmp/x", "credits": -2}}, "transport.credits: must be >= 0, got -2"),
    ({"checkpoint": {"every": -5}}, "checkpoint.every: must be >= 0, got -5"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep: must be >= 1, got 0"),
    ({"rollout": {"temperature": float("inf")}}, "rollout.temperature: must be a finite number, got inf"),
    ({"rollout": {"timeout_s": float("nan")}}, "rollout.timeout_s: must be a finite number, got nan"),
])
def test_grpo_refuses_a_value_naming_key_and_value(data, message):
    with pytest.raises(ValueError, match=message):
        config_lib.build(GRPOConfig, data)


def test_sft_names_the_key_and_value():
    with pytest.raises(ValueError, match="global_batch_size: must be >= 1, got 0"):
        config_lib.build(SFTConfig, {"global_batch_size": 0})
    with pytest.raises(ValueError, match="max_steps: must be >= 0, got -1"):
        config_lib.build(SFTConfig, {"max_steps": -1})


def test_yaml_inf_is_refused_from_a_file_before_anything_starts(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .inf\nalgo:\n  clip_high: 0.28\n")
    rc = cli(["grpo", "--config", str(path), "--model.path", "smollm2", "--output", str(tmp_path / "run")])
    assert rc == 2
    assert "optim.lr: must be a finite number, got inf" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_clip_higher_and_equal_clips_are_accepted():
    assert config_lib.build(GRPOConfig, {"algo": {"clip_high": 0.28}}).algo.clip_high == 0.28
    assert config_lib.build(GRPOConfig, {}).algo.clip_low == 0.2


def test_rollout_n_1_with_dynamic_sampling_is_refused_at_config_time():
    with pytest.raises(ValueError, match="rollout.dynamic_sampling .* needs rollout.n >= 2"):
        RolloutConfig(n=1, dynamic_sampling=True)


@pytest.mark.parametrize("rollout, keys", [
    ({"top_p": 0.9}, "rollout.top_p 0.9"),
    ({"top_k": 40}, "rollout.top_k 40"),
    ({"top_p": 0.95, "top_k": 20}, "rollout.top_p 0.95, rollout.top_k 20"),
])
def test_grpo_refuses_top_p_and_top_k_whose_logprobs_the_learner_cannot_match(rollout, keys):
    with pytest.raises(ValueError, match=f"{keys}: GRPO trains on the sampled answers.*rollout.top_p 1 and "
                                         "rollout.top_k -1"):
        config_lib.build(GRPOConfig, {"rollout": rollout})
    # The one door every training pool goes through (colocated GRPO and the rollout worker) refuses it too.
    with pytest.raises(ValueError, match=keys):
        RolloutConfig(**rollout).sampling_params(logprobs=True)


def test_eval_and_passrate_keep_top_p_and_top_k():
    from medvl_engine.evals.evaluate import EvalConfig
    from medvl_engine.evals.passrate import PassrateConfig

    run = {"model": "smollm2", "output": "out"}
    assert config_lib.build(EvalConfig, dict(run, rollout={"top_p": 0.9, "top_k": 40})).rollout.top_p == 0.9
    assert config_lib.build(PassrateConfig, dict(run, rollout={"top_p": 0.95, "top_k": 20})).rollout.top_k == 20
    params = RolloutConfig(top_p=0.9, top_k=40).sampling_params(logprobs=False)
    assert (params.top_p, params.top_k, params.return_logprobs) == (0.9, 40, False)
