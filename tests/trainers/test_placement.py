"""One rollout path: the same GRPO config trains on the same prompts, in the same order, with the same
sample seeds and the same sampled tokens, whether the RolloutPool runs in the learner's process
(colocated) or in one or two rollout worker processes streaming over ZeroMQ (split); and a resumed
run continues the stream where it stood, in both placements. Compared through each run's rollouts.jsonl."""

from __future__ import annotations

import shutil

import pytest

from medvl_engine import config as config_lib
from medvl_engine.trainers.config import GRPOConfig

STEPS, PROMPTS, N = 3, 2, 3
MAX_SAMPLES = 5  # 3 steps x 2 prompts = 6 positions: the stream wraps into epoch 1


def placement_config(model, run_dir, *, endpoint: str = "", workers: int = 1, shuffle: bool = False) -> GRPOConfig:
    transport = {"endpoint": endpoint, "workers": workers} if endpoint else {}
    return config_lib.build(GRPOConfig, {
        "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 1e-2},
        "data": {"source": "bundled", "text_only": True, "shuffle": shuffle, "max_samples": MAX_SAMPLES},
        "rollout": {"n": N, "max_response_tokens": 8, "seed": 11, "max_staleness": 0, "max_batch": 16},
        "transport": transport,
        "algo": {"prompts_per_step": PROMPTS, "mini_batches": 1, "kl_coef": 0.0},
        "deepspeed": {"micro_batch_size": N},
        "output": str(run_dir),
        "checkpoint": {"every": 1, "keep": 5, "export": False},
        "steps": STEPS, "seed": 1,
    })


def rollouts(run_dir) -> list[tuple]:
    from medvl_engine.trainers.metrics import read_rollouts

    return [(r.step, r.position, r.dataset_index, r.seed, r.version, r.answer, r.response)
            for r in read_rollouts(run_dir / "rollouts.jsonl")]


def train(cfg: GRPOConfig, *, resume: bool = False) -> list[dict]:
    from medvl_engine.trainers import grpo

    return grpo.run(cfg, resume=resume)


@pytest.fixture(scope="module")
def runs(tiny_chat_model, tmp_path_factory):
    """The same config in three placements (and the split run's worker config as the worker read it)."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the worker processes share 2 cores with the learner
    root = tmp_path_factory.mktemp("placements")
    out = {}
    train(placement_config(tiny_chat_model, root / "colocated"))
    out["colocated"] = root / "colocated"
    for workers in (1, 2):
        name = f"split{workers}"
        train(placement_config(tiny_chat_model, root / name, endpoint=f"ipc://{root}/{name}.sock", workers=workers))
        out[name] = root / name
    return out


@pytest.mark.slow
def test_colocated_and_split_train_on_the_same_stream_with_the_same_tokens(runs):
    from medvl_engine.rollout.types import derive_seed

    colocated = rollouts(runs["colocated"])
    assert len(colocated) == STEPS * PROMPTS * N
    # Dataset order (--no-data.shuffle) and data.max_samples: positions 0..4 are samples 0..4, position 5
    # is sample 0 again (epoch 1) with its own seed; each step trains on the next positions, in order.
    positions = sorted({(step, pos, index, seed) for step, pos, index, seed, *_ in colocated})
    texts = _text_samples()[:MAX_SAMPLES]
    assert positions == [(p // PROMPTS + 1, p, texts[p % MAX_SAMPLES].dataset_index, derive_seed(11, p))
                         for p in range(STEPS * PROMPTS)]
    # On-policy (max_staleness 0): step s sampled with version s - 1.
    assert {(step, version) for step, _, _, _, version, _, _ in colocated} == {(s, s - 1) for s in range(1, STEPS + 1)}
    assert len({r[-1] for r in colocated}) > 3  # sampled answers differ: the comparison below has teeth
    for name in ("split1", "split2"):
        assert rollouts(runs[name]) == colocated, name
    # The learner handed each worker its configuration as a file; the second worker read shard 1 of 2.
    worker = (runs["split2"] / "rollout-1.yaml").read_text()
    assert "shard_index: 1" in worker and "num_shards: 2" in worker and "max_samples: 5" in worker


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["colocated", "split1"])
def test_resume_continues_the_stream_at_the_saved_position(runs, placement, tiny_chat_model, tmp_path):
    full = runs[placement]
    resumed = tmp_path / placement
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000003")
    endpoint = f"ipc://{tmp_path}/r.sock" if placement != "colocated" else ""
    (row,) = train(placement_config(tiny_chat_model, resumed, endpoint=endpoint), resume=True)
    assert row["step"] == 3
    # The logs hold each step once, and the resumed step trained on the positions, seeds and tokens the
    # uninterrupted run had.
    assert rollouts(resumed) == rollouts(full)
    assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3]


def _text_samples():
    from medvl_engine.data import load_bundled

    return [s for s in load_bundled() if not s.images]


def _metrics(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
