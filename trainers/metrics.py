"""The run's logs, written by rank 0 only: `metrics.jsonl` (one object per step, also sent to TensorBoard
and W&B when `--logging.sinks` names them) and `rollouts.jsonl` (one object per trained answer: what the
model wrote, for which prompt, with which seed and reward)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec

from medvl_engine import run_folder
from medvl_engine.files import StepLog


def scalars(row: dict) -> dict[str, float]:
    """The numeric values of a metrics row, the ones TensorBoard and W&B can plot (`step` is their x axis)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardSink:
    """Scalars under `run_dir/tensorboard`, one tag per metrics key. A resumed run purges the events after
    its checkpoint step, as `truncate_to_step` does for the jsonl, so TensorBoard shows no step twice."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / run_folder.TENSORBOARD),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a step takes seconds or more: a watching TensorBoard sees every one

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run under `run_dir/wandb`: offline (`wandb sync` uploads it later) unless the
    user configured an account with WANDB_API_KEY or chose a mode with WANDB_MODE. The run's id is kept in
    `run_dir/wandb-id`, so a resumed run continues the same W&B run (which keeps the steps it already had)."""

    def __init__(self, run_dir: Path, config, *, resume_step: int | None = None):
        import wandb

        from medvl_engine import config as config_lib

        id_file = run_dir / run_folder.WANDB_ID
        resumed = resume_step is not None and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        configured = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
        logging = config.logging
        self.run = wandb.init(project=logging.wandb_project, name=logging.wandb_name or run_dir.resolve().name,
                              dir=str(run_dir), id=run_id, resume="allow", config=config_lib.to_dict(config),
                              mode=None if configured else "offline",
                              settings=wandb.Settings(console="off", silent=True))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog(StepLog):
    """`metrics.jsonl`: one JSON object per step, and the same rows to the sinks `config.logging.sinks`
    names (TensorBoard, W&B; `config` is the run config, GRPOConfig or SFTConfig). Only rank 0 writes.
    `resume_step` (a resumed run) keeps the log up to that step."""

    def __init__(self, run_dir: str | Path, rank: int, *, resume_step: int | None = None, config=None):
        super().__init__(Path(run_dir) / run_folder.METRICS, enabled=rank == 0, resume_step=resume_step)
        self.rank = rank
        self.sinks: list = []
        if rank == 0:
            names = config.logging.sink_names if config is not None else ()
            try:
                if "tensorboard" in names:
                    self.sinks.append(TensorBoardSink(self.path.parent, resume_step=resume_step))
                if "wandb" in names:
                    self.sinks.append(WandbSink(self.path.parent, config, resume_step=resume_step))
            except BaseException:
                self.close()
                raise

    def write(self, row: dict) -> None:
        self.append_rows([row])
        if self.sinks:
            values = scalars(row)
            for sink in self.sinks:
                sink.write(int(row["step"]), values)

    def close(self) -> None:
        super().close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


class RolloutRecord(msgspec.Struct):
    """One trained answer, as `rollouts.jsonl` holds it (verl's rollout-data dump, one line per answer)."""

    step: int  # the GRPO step that trained on it (1-based)
    version: int  # the policy version that generated its group
    dataset_name: str
    dataset_index: int
    prompt_id: str
    position: int  # the prompt's position in the stream
    seed: int  # the position's sampling seed
    answer: int  # which of the group's n answers
    response: str
    reward: float
    correct: bool
    format_ok: bool
    parsed: str  # the extracted answer
    letter: str  # the option letter it maps to ("" when none)
    finish_reason: str
    response_tokens: int


class RolloutLog(StepLog):
    """Appends every answer of every trained group to `run_dir/rollouts.jsonl` (rank 0; off with `enabled`).
    `resume_step` (a resumed run) keeps the log up to that step."""

    def __init__(self, run_dir: str | Path, rank: int, *, enabled: bool = True, resume_step: int | None = None):
        super().__init__(Path(run_dir) / run_folder.ROLLOUTS, enabled=rank == 0 and enabled, resume_step=resume_step)
        self._encoder = msgspec.json.Encoder()

    def write(self, step: int, groups) -> None:
        if not self.file:
            return
        lines = []
        for g in groups:
            rewards, correct, format_ok = g.reward_array(), g.correct_array(), g.format_array()
            for i in range(g.n):
                lines.append(self._encoder.encode(RolloutRecord(
                    step=step, version=g.weight_version, dataset_name=g.dataset_name, dataset_index=g.dataset_index,
                    prompt_id=g.prompt_id, position=g.position, seed=g.seed, answer=i, response=g.texts[i],
                    reward=float(rewards[i]), correct=bool(correct[i]), format_ok=bool(format_ok[i]),
                    parsed=g.parsed[i] if g.parsed else "", letter=g.letters[i], finish_reason=g.finish_reasons[i],
                    response_tokens=int(g.response_array(i).size))))
        self.append(b"\n".join(lines) + b"\n")


def read_rollouts(path: str | Path) -> list[RolloutRecord]:
    """The records of a `rollouts.jsonl`."""
    decoder = msgspec.json.Decoder(RolloutRecord)
    with Path(path).open("rb") as f:
        return [decoder.decode(line) for line in f if line.strip()]
