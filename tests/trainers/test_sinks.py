"""Metric sinks: a tiny SFT run's TensorBoard scalars equal its metrics.jsonl, a resumed log purges the
steps after its checkpoint, W&B writes an offline run holding the same values, and a missing package is
a config error naming the extra."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest

from medvl_engine import config as config_lib
from medvl_engine.trainers.config import GRPOConfig, SFTConfig
from medvl_engine.trainers.metrics import MetricsLog


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard reads from `folder`: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def jsonl_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sinks_flag_is_checked_when_the_config_is_built(monkeypatch):
    cfg = config_lib.build(GRPOConfig, {"logging": {"sinks": "jsonl"}})
    assert cfg.logging.sink_names == ("jsonl",)
    with pytest.raises(ValueError, match=r"unknown sink\(s\) \['mlflow'\]"):
        config_lib.build(SFTConfig, {"logging": {"sinks": "jsonl,mlflow"}})

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"wandb needs the `wandb` package.*pip install 'medvl-engine\[wandb\]'"):
        config_lib.build(GRPOConfig, {"logging": {"sinks": "jsonl,wandb"}})


@pytest.mark.slow
def test_a_tiny_sft_run_writes_tensorboard_scalars_equal_to_its_metrics_jsonl(tiny_chat_model, tmp_path):
    pytest.importorskip("tensorboard")
    from medvl_engine.trainers import sft

    run_dir = tmp_path / "run"
    cfg = config_lib.build(SFTConfig, {
        "model": {"path": str(tiny_chat_model), "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"text_only": True},
        "output": str(run_dir), "logging": {"sinks": "jsonl,tensorboard"},
        "checkpoint": {"export": False},
        "epochs": 1, "global_batch_size": 2, "max_steps": 3,
    })
    sft.run(cfg)
    rows = jsonl_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert set(scalars) == {k for k, v in rows[0].items() if k != "step" and isinstance(v, (int, float))}
    for key, by_step in scalars.items():
        # TensorBoard stores float32: each value is the jsonl value rounded to float32, exactly.
        assert by_step == {r["step"]: float(np.float32(r[key])) for r in rows}, key
    assert scalars["loss"][1] > 0


def test_a_resumed_log_purges_the_tensorboard_steps_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config_lib.build(SFTConfig, {"output": str(tmp_path), "logging": {"sinks": "tensorboard"}})
    with MetricsLog(tmp_path, 0, config=cfg) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 10.0 + step, "note": "text is not plotted", "ok": True})
    # The run stopped after step 3 but its checkpoint is step 2: the resumed run writes steps 3 and 4 anew.
    with MetricsLog(tmp_path, 0, resume_step=2, config=cfg) as log:
        for step in (3, 4):
            log.write({"step": step, "loss": 20.0 + step})
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"loss": {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0}}
    assert [(r["step"], r["loss"]) for r in jsonl_rows(tmp_path / "metrics.jsonl")] == [
        (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_only_rank_0_writes(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config_lib.build(SFTConfig, {"output": str(tmp_path), "logging": {"sinks": "tensorboard"}})
    with MetricsLog(tmp_path, 1, config=cfg) as log:
        log.write({"step": 1, "loss": 1.0})
    assert not any(tmp_path.iterdir())


def wandb_records(path):
    """The protobuf records of a `.wandb` file: W&B's transaction log uses LevelDB's log format (a 7-byte
    file header, 32 KiB blocks, each chunk a 7-byte header: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break  # a record still being written
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_writes_an_offline_run_under_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))
    run_dir = tmp_path / "run"
    cfg = config_lib.build(GRPOConfig, {"output": str(run_dir), "logging": {"sinks": "wandb",
                                                    "wandb_project": "medvl-test", "wandb_name": "tiny"}})
    rows = [{"step": 1, "reward": 0.25, "kl": 0.0, "groups": 4}, {"step": 2, "reward": 0.5, "kl": 1e-3, "groups": 4}]
    with MetricsLog(run_dir, 0, config=cfg) as log:
        for row in rows:
            log.write(row)
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # W&B's service process may still be writing when finish() returns: wait for the run's exit record.
    deadline = time.monotonic() + 60
    while True:
        records = wandb_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, "the offline run was never closed"
        time.sleep(0.1)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("medvl-test", "tiny")
    assert run.run_id == (run_dir / "wandb-id").read_text().strip()
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algo"]["clip_ratio_c"] == cfg.algo.clip_ratio_c and config["logging"]["sinks"] == "wandb"
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [{k: h[k] for k in ("_step", "reward", "kl", "groups")} for h in history] == [
        {"_step": r["step"], **{k: r[k] for k in ("reward", "kl", "groups")}} for r in rows]


@pytest.mark.slow
def test_a_toy_grpo_run_writes_tensorboard_scalars_equal_to_its_metrics_jsonl_and_a_report(toy_model, tmp_path):
    pytest.importorskip("tensorboard")
    from test_grpo import run_toy, toy_config

    from medvl_engine.evals.curves import write_training_report

    run_dir = tmp_path / "run"
    cfg = toy_config(toy_model, run_dir)
    cfg.logging.sinks, cfg.steps = "tensorboard", 2
    history, _ = run_toy(cfg)
    rows = jsonl_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows == json.loads(json.dumps(history))
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for key in ("reward", "accuracy", "format", "kl", "clip_frac", "dual_clip_frac", "response_len", "tokens_per_s"):
        assert scalars[key] == {r["step"]: float(np.float32(r[key])) for r in rows}, key
    markdown = write_training_report(run_dir)
    assert (run_dir / "curves.png").stat().st_size > 10_000 and "| 2 |" in markdown
