"""`model.freeze_vision` / `model.freeze_merger`: the frozen parts of a tiny Qwen2.5-VL get no update and no
optimizer state under every ZeRO stage, the rest trains on image rows, and the export still carries them.

(Once every parameter of the vision tower trained, with its fp32 master copy and Adam moments, and no switch
turned it off.)"""

from __future__ import annotations

from contextlib import closing

import pytest
import torch

from medvl_engine import config as config_lib
from medvl_engine.errors import ConfigError
from medvl_engine.trainers.config import SFTConfig

pytestmark = pytest.mark.slow


def sft_config(model, run_dir, *, zero: int, tower: bool, merger: bool) -> SFTConfig:
    return config_lib.build(SFTConfig, {
        "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": False, "freeze_vision": tower,
                  "freeze_merger": merger},
        "optim": {"lr": 1e-2},
        "data": {"source": "bundled", "max_samples": 2, "shuffle": False},
        "deepspeed": {"micro_batch_size": 2, "zero_stage": zero},
        "output": str(run_dir), "epochs": 2, "global_batch_size": 2,
    })


def weights(learner) -> dict[str, torch.Tensor]:
    return {name: tensor.float().clone() for bucket in learner.full_parameters() for name, tensor in bucket}


def optimizer_numel(learner) -> int:
    """Elements the optimizer keeps state for: its (flat, under ZeRO) fp32 parameter groups."""
    optimizer = learner.engine.optimizer
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: its inner groups fill at the first step
        return sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat)
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(p.numel() for group in inner.param_groups for p in group["params"])


def one_step(model, run_dir, *, export=None, **switches) -> tuple[dict, dict, int]:
    from medvl_engine.trainers.learner import Learner
    from medvl_engine.trainers.model import load_processor, load_tokenizer
    from medvl_engine.trainers.sft import SFTTrainer, load_rows, total_steps

    cfg = sft_config(model, run_dir, **switches)
    rows = load_rows(cfg, load_tokenizer(cfg.model.path), load_processor(cfg.model.path))
    assert all(r.sample.images for r in rows)
    learner = Learner.build(cfg.model, cfg.optim, cfg.deepspeed, train_batch_size=2,
                            total_steps=total_steps(cfg, len(rows)))
    before = weights(learner)
    held = optimizer_numel(learner)
    with closing(SFTTrainer(cfg, learner, rows)) as trainer:
        for step in range(trainer.total_steps):  # 2: the first runs at the scheduler's warmup learning rate, 0
            trainer.train_step(step)
    if export is not None:
        from medvl_engine.trainers.checkpoint import export_hf

        export_hf(learner, export)
    return before, weights(learner), held


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_frozen_parts_get_no_update_and_no_optimizer_state(tiny_vl_model, tmp_path, zero):
    from medvl_engine.trainers.model import load_policy, vision_parameters

    tower, merger = (set(part) for part in vision_parameters(load_policy(str(tiny_vl_model))))
    assert tower and merger
    base_before, base_after, base_held = one_step(tiny_vl_model, tmp_path / "all", zero=zero, tower=False,
                                                  merger=False)
    sizes = {name: t.numel() for name, t in base_before.items()}
    changed = {name for name in base_before if not torch.equal(base_before[name], base_after[name])}
    assert changed & tower and changed & merger  # unfrozen, both parts train on image rows

    for freeze_merger in (False, True):
        export = tmp_path / "export" if freeze_merger else None
        before, after, held = one_step(tiny_vl_model, tmp_path / f"frozen{freeze_merger}", zero=zero, tower=True,
                                       merger=freeze_merger, export=export)
        frozen = tower | (merger if freeze_merger else set())
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert not changed & frozen
        assert (changed & merger) if not freeze_merger else changed  # the rest still trains
        # ZeRO pads its flat partitions a little; the frozen elements are gone from the optimizer's state.
        saved = base_held - held
        assert abs(saved - sum(sizes[name] for name in frozen)) <= 64, (saved, zero)
    # The export carries the frozen parts as loaded, and the trained rest.
    from transformers import AutoModelForImageTextToText

    exported = dict(AutoModelForImageTextToText.from_pretrained(export).named_parameters())
    assert all(torch.equal(exported[name].float(), before[name]) for name in tower | merger)
    assert all(torch.equal(exported[name].float(), after[name]) for name in after)


def test_a_text_model_cannot_freeze_a_vision_tower(tiny_chat_model):
    from medvl_engine.trainers.model import freeze_vision, load_policy

    with pytest.raises(ConfigError, match="has no vision tower"):
        freeze_vision(load_policy(str(tiny_chat_model)), tower=True, merger=False)
