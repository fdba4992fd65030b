"""The run's logs, written by rank 0 only: `metrics.jsonl` (one object per step) and `rollouts.jsonl`
(one object per trained answer: what the model wrote, for which prompt, with which seed and reward)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec


def truncate_to_step(path: Path, step: int) -> None:
    """Keep the lines of a per-step jsonl log up to `step` (a resumed run rewrites the steps after its
    checkpoint; without this they would appear twice)."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and line.endswith(b"\n") and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        tmp.replace(path)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step. `resume_step` (a resumed run) keeps the log up to that step."""

    def __init__(self, run_dir: str | Path, rank: int, *, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rank = rank
        self.file = None
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_to_step(self.path, resume_step)
            self.file = self.path.open("a" if resume_step is not None else "w")

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


class RolloutLog:
    """Appends every answer of every trained group to `run_dir/rollouts.jsonl` (rank 0; off with `enabled`).
    `resume_step` (a resumed run) keeps the log up to that step."""

    def __init__(self, run_dir: str | Path, rank: int, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "rollouts.jsonl"
        self.file = None
        self._encoder = msgspec.json.Encoder()
        if rank == 0 and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_to_step(self.path, resume_step)
            self.file = self.path.open("ab" if resume_step is not None else "wb")

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
        self.file.write(b"\n".join(lines) + b"\n")
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def __enter__(self) -> RolloutLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rollouts(path: str | Path) -> list[RolloutRecord]:
    """The records of a `rollouts.jsonl`."""
    decoder = msgspec.json.Decoder(RolloutRecord)
    with Path(path).open("rb") as f:
        return [decoder.decode(line) for line in f if line.strip()]
