"""`medvl-engine report` on a training run folder: curves.png is a real image and report.md's table holds
the metrics.jsonl numbers; absent metrics are left out; an eval run folder keeps its accuracy report."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from medvl_engine.cli import main as cli
from medvl_engine.errors import RunFolderError
from medvl_engine.evals.curves import TABLE_ROWS, is_training_run, plot_training

GRPO_KEYS = ("reward", "accuracy", "format", "kl", "response_len", "clip_frac", "dual_clip_frac", "tokens_per_s",
             "loss")


def grpo_row(step: int) -> dict:
    return {"step": step, "version": step, "reward": 0.1 * step, "accuracy": 0.05 * step, "format": 0.5 + 0.01 * step,
            "kl": 1e-3 * step * step, "response_len": 100.0 + 3 * step, "clip_frac": 0.02 / step,
            "dual_clip_frac": 0.001 * step, "tokens_per_s": 1234.5 + step, "loss": -0.01 * step,
            "logp_diff_mean": float("nan"), "groups": 4}


def write_metrics(folder, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def markdown_table(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def check_png(path) -> Image.Image:
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == "PNG" and image.width > 400 and image.height > 200
    # Lines drawn, not a blank canvas: matplotlib's first line colour (tab:blue) is on it.
    assert (31, 119, 180) in {rgb for _, rgb in image.convert("RGB").getcolors(1 << 20)}
    return image


def test_report_of_a_grpo_run_draws_the_curves_and_tabulates_the_numbers(tmp_path, capsys):
    folder = tmp_path / "grpo-run"
    rows = [grpo_row(step) for step in range(1, 8)]
    write_metrics(folder, rows)
    assert is_training_run(folder)
    assert cli(["report", str(folder)]) == 0
    check_png(folder / "curves.png")
    markdown = (folder / "report.md").read_text()
    assert "![curves](curves.png)" in markdown and markdown in capsys.readouterr().out
    table = markdown_table(markdown)
    assert list(table[0]) == ["step", *GRPO_KEYS]  # logp_diff_mean (all NaN) and the counters are not plotted
    assert [int(r["step"]) for r in table] == list(range(1, 8))
    for got, row in zip(table, rows):
        for key in GRPO_KEYS:
            assert float(got[key]) == pytest.approx(row[key], rel=1e-3), (row["step"], key)


def test_an_sft_run_gets_loss_and_tokens_per_s_only(tmp_path):
    folder = tmp_path / "sft-run"
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-5, "grad_norm": 1.0, "tokens": 400 * s, "seconds": 2.0}
            for s in range(1, 4)]
    write_metrics(folder, rows)
    assert cli(["report", str(folder)]) == 0
    table = markdown_table((folder / "report.md").read_text())
    assert list(table[0]) == ["step", "tokens_per_s", "loss"]
    assert [(float(r["tokens_per_s"]), float(r["loss"])) for r in table] == [
        (200.0, 5.0), (400.0, 2.5), (600.0, pytest.approx(5 / 3, rel=1e-3))]
    check_png(folder / "curves.png")


def test_a_long_run_table_thins_the_steps_and_keeps_the_last(tmp_path):
    folder = tmp_path / "long"
    steps = 2 * TABLE_ROWS + 7
    write_metrics(folder, [grpo_row(s) for s in range(1, steps + 1)])
    assert cli(["report", str(folder)]) == 0
    shown = [int(r["step"]) for r in markdown_table((folder / "report.md").read_text())]
    every = math.ceil(steps / TABLE_ROWS)
    assert shown == list(range(1, steps + 1, every)) + [steps]


def test_a_run_with_none_of_the_metrics_is_an_error(tmp_path):
    with pytest.raises(RunFolderError, match="logged none of"):
        plot_training([{"step": 1, "lr": 1e-6}], tmp_path / "curves.png")


def test_an_eval_run_folder_keeps_its_accuracy_report(tmp_path, capsys):
    from test_report import _make_run

    folder = tmp_path / "eval-run"
    _make_run(folder, n=1, repeats=1, model="Qwen/Qwen2.5-VL-3B-Instruct")
    assert not is_training_run(folder)
    assert cli(["report", str(folder), "--no-reference"]) == 0
    assert "Accuracy (%)" in capsys.readouterr().out and (folder / "report.json").is_file()
    assert not (folder / "curves.png").exists()
