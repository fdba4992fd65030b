"""`medvl-engine report` on a run's timeline.jsonl: the overlap of generation with training is computed
exactly on a hand-made timeline, timeline.png is a real picture with the learner's stages and each
producer's generation, and a malformed span is an error naming it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medvl_engine.cli import main as cli
from medvl_engine.evals.timeline import covered_seconds, merge_intervals, plot_timeline, read_timeline, timeline_overlap

# Two steps; training (collate, logprobs, update) is [1, 4] and [4.6, 8]; rollout-0 generates in [0, 1]
# (two groups) and [3, 6], rollout-1 in [7, 9]: 1 s of step 1's 3 s and 2.4 s of step 2's 3.4 s overlap.
LEARNER = [(1, "rollout_wait", 0.0, 1.0), (1, "collate", 1.0, 1.5), (1, "logprobs", 1.5, 2.0), (1, "update", 2.0, 4.0),
           (1, "weight_sync", 4.0, 4.5), (2, "rollout_wait", 4.5, 4.6), (2, "collate", 4.6, 5.0),
           (2, "logprobs", 5.0, 5.5), (2, "update", 5.5, 8.0), (2, "weight_sync", 8.0, 8.5)]
GENERATION = [(1, "rollout-0", 0.0, 1.0), (1, "rollout-0", 0.5, 1.0), (2, "rollout-0", 3.0, 6.0),
              (2, "rollout-1", 7.0, 9.0)]


def spans() -> list[dict]:
    rows = [{"step": step, "who": "learner", "stage": stage, "start": a, "end": b} for step, stage, a, b in LEARNER]
    rows += [{"step": step, "who": who, "stage": "generate", "start": a, "end": b} for step, who, a, b in GENERATION]
    return rows


def write_run(folder, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s, "loss": 0.5}) + "\n"
                                                  for s in (1, 2)))
    (folder / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_intervals_merge_and_cover():
    assert merge_intervals([(3, 6), (0, 1), (0.5, 1), (1, 2), (7, 9)]) == [(0, 2), (3, 6), (7, 9)]
    assert covered_seconds([(1, 4), (4.6, 8)], [(0, 1), (3, 6), (7, 9)]) == pytest.approx(1 + 1.4 + 1)
    assert covered_seconds([(1, 2)], []) == 0.0


def test_overlap_is_the_share_of_training_time_with_generation_running():
    overlap = timeline_overlap(spans())
    assert overlap.train_s == pytest.approx(3.0 + 3.4)
    assert overlap.overlap_s == pytest.approx(1.0 + 2.4)
    assert overlap.fraction == pytest.approx(3.4 / 6.4)
    assert overlap.generate_s == pytest.approx(1.0 + 3.0 + 2.0)
    assert overlap.per_step == pytest.approx({1: 1 / 3, 2: 2.4 / 3.4})


def test_report_draws_the_timeline_next_to_the_curves(tmp_path, capsys):
    folder = tmp_path / "run"
    write_run(folder, spans())
    assert cli(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "timeline.png" in out and "Generation ran during 53% of the learner's training time" in out
    markdown = (folder / "report.md").read_text()
    assert "![timeline](timeline.png)" in markdown and "3.40 of 6.40 s" in markdown
    with Image.open(folder / "timeline.png") as image:
        image.verify()
    image = Image.open(folder / "timeline.png").convert("RGB")
    assert image.width > 800 and image.height > 200
    colors = {rgb for _, rgb in image.getcolors(1 << 20)}
    # The learner's update bars (tab:blue) and weight sync (tab:red) are drawn; generation is translucent
    # tab:green over white: (44, 160, 44) at alpha 0.35 is (180, 222, 180) (two groups at once: darker).
    assert (31, 119, 180) in colors and (214, 39, 40) in colors
    greens = [c for c in colors if c[1] > c[0] + 30 and c[1] > c[2] + 30]
    assert len(greens) >= 2


def test_a_run_without_a_timeline_gets_only_its_curves(tmp_path):
    folder = tmp_path / "run"
    write_run(folder, [])
    (folder / "timeline.jsonl").unlink()
    assert cli(["report", str(folder)]) == 0
    assert (folder / "curves.png").is_file() and not (folder / "timeline.png").exists()
    assert "timeline" not in (folder / "report.md").read_text()


def test_a_span_that_ends_before_it_starts_is_named(tmp_path):
    rows = spans()
    rows[3] = {**rows[3], "start": 5.0}
    write_run(tmp_path, rows)
    with pytest.raises(ValueError, match=r"timeline.jsonl: step 1 learner update ends before it starts"):
        read_timeline(tmp_path)


def test_a_timeline_of_the_learner_alone_has_no_overlap(tmp_path):
    learner = [s for s in spans() if s["who"] == "learner"]
    overlap = plot_timeline(learner, tmp_path / "timeline.png")
    assert overlap.fraction == 0.0 and overlap.train_s == pytest.approx(6.4)
    assert (tmp_path / "timeline.png").stat().st_size > 0
