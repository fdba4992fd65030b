"""The names of the files in a run folder, in one place: every command that writes a run folder and every
command that reads one (`report`, `curate`, `--resume`, the demo) takes them from here.

A training run (`grpo`, `sft`; `output`):

    config.yaml            the run's settings (resume compares against them)
    metrics.jsonl          one object per step
    rollouts.jsonl         one object per trained answer (grpo)
    timeline.jsonl         the learner's stages and the rollout's generation spans per step (grpo)
    checkpoints/           DeepSpeed checkpoints, step_000012/ ...
    weights/               the weight versions pushed to rollout workers through disk (grpo)
    export/                the final Hugging Face folder
    rollout-worker.yaml    the configuration of a rollout worker started by hand (grpo over workers)
    rollout-K.yaml/.log    worker K's configuration and log
    tensorboard/, wandb/, wandb-id, profile/trace-rank{R}.json
    curves.png, timeline.png, report.md     drawn by `medvl-engine report`

An eval or pass-rate run (`output`):

    manifest.json          what produced the results (`medvl_engine.evals.manifest`)
    v{k}/results.jsonl     eval: one results file per repeat
    results.jsonl          passrate: one results file
    report.md, report.json eval: the accuracy tables
    histogram.png, histogram.txt           passrate: questions per pass count
"""

from __future__ import annotations

from pathlib import Path

# settings and logs
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ROLLOUTS = "rollouts.jsonl"
TIMELINE = "timeline.jsonl"
MANIFEST = "manifest.json"
RESULTS = "results.jsonl"

# folders
CHECKPOINTS = "checkpoints"
WEIGHTS = "weights"
EXPORT = "export"
PROFILE = "profile"
TENSORBOARD = "tensorboard"
WANDB_ID = "wandb-id"

# rollout workers a GRPO learner starts
ROLLOUT_WORKER_CONFIG = "rollout-worker.yaml"

# what `medvl-engine report` and `passrate` draw and write
CURVES_PNG = "curves.png"
TIMELINE_PNG = "timeline.png"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
HISTOGRAM_PNG = "histogram.png"
HISTOGRAM_TXT = "histogram.txt"

# What shows that a training run used a folder (a new run refuses it without --overwrite).
TRAINING_OUTPUTS = (METRICS, ROLLOUTS, CHECKPOINTS, WEIGHTS, EXPORT)


def rollout_worker_name(shard: int) -> str:
    """`rollout-K`: worker K's producer id, and the stem of its files."""
    return f"rollout-{shard}"


def rollout_config(run_dir: str | Path, shard: int) -> Path:
    """`rollout-K.yaml`: the configuration the learner writes for its worker K."""
    return Path(run_dir) / f"{rollout_worker_name(shard)}.yaml"


def rollout_log(run_dir: str | Path, shard: int) -> Path:
    """`rollout-K.log`: worker K's output."""
    return Path(run_dir) / f"{rollout_worker_name(shard)}.log"


def repeat_dir(output: str | Path, k: int) -> Path:
    """`v{k}`: repeat k of an eval run."""
    return Path(output) / f"v{k}"


def repeat_results(output: str | Path, k: int) -> Path:
    """`v{k}/results.jsonl`: the answers of repeat k of an eval run."""
    return repeat_dir(output, k) / RESULTS


REPEAT_RESULTS_GLOB = f"v*/{RESULTS}"
