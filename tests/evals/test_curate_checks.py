"""Curate refuses pass counts that do not fit: out of another sample count than its band is for, or from a
pass-rate run over another dataset than --source (read from the run's manifest)."""

from __future__ import annotations

import json

import pytest
from results_helpers import record, write_results

from medvl_engine.data import load_bundled
from medvl_engine.evals.curate import CurateConfig, curate


def _passrate_run(folder, n: int, source: str | None = "bundled", split: str = "train"):
    samples = load_bundled()
    rows = [record(s, ["<answer>A</answer>"] * n, correct=[k < (i % (n + 1)) for k in range(n)])
            for i, s in enumerate(samples)]
    write_results(folder / "results.jsonl", rows)
    if source is not None:
        manifest = {"command": "passrate", "identity": {"data": {"source": source, "split": split},
                                                        "rollout": {"n": n}}, "attempts": []}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_pass_counts_of_8_with_the_band_for_16_are_refused(tmp_path):
    run = _passrate_run(tmp_path / "passrate", n=8)
    with pytest.raises(ValueError, match=r"out of 8 samples but the band 1..7 is for --band-of 16"):
        curate(CurateConfig(source="bundled", pass_counts=str(run), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    result = curate(CurateConfig(source="bundled", pass_counts=str(run), output=str(tmp_path / "out"), band_of=8,
                                 max_pass=3))
    assert result.num_rollouts == 8 and all(1 <= c <= 3 for c in result.pass_counts) and result.kept > 0


def test_pass_counts_from_another_dataset_are_refused(tmp_path):
    run = _passrate_run(tmp_path / "passrate", n=16, source="UCSC-VLAA/MedVLThinker-m23k-tokenized")
    with pytest.raises(ValueError, match=r"measured on UCSC-VLAA/MedVLThinker-m23k-tokenized \(split train\), "
                                         r"not on --source bundled"):
        curate(CurateConfig(source="bundled", pass_counts=str(run), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_pass_counts_from_another_split_are_refused(tmp_path):
    run = _passrate_run(tmp_path / "passrate", n=16, split="test")
    with pytest.raises(ValueError, match=r"\(split test\), not on --source bundled \(split train\)"):
        curate(CurateConfig(source="bundled", pass_counts=str(run / "results.jsonl"), output=str(tmp_path / "out")))


def test_pass_counts_of_the_same_dataset_join_whatever_the_path_spelling(tmp_path, monkeypatch):
    from medvl_engine.data import bundled_dataset_path

    questions = tmp_path / "questions.jsonl"
    questions.write_bytes(bundled_dataset_path().read_bytes())
    (tmp_path / "images").symlink_to(bundled_dataset_path().parent / "images")
    run = _passrate_run(tmp_path / "passrate", n=16, source=str(questions))
    monkeypatch.chdir(tmp_path)
    result = curate(CurateConfig(source="questions.jsonl", pass_counts="passrate", output="out"))
    assert result.total == 37 and (tmp_path / "out" / "curation.json").is_file()
    assert run.is_dir()


@pytest.mark.parametrize("changes, message", [
    ({"band_of": 0}, "band_of must be >= 1, got 0"),
    ({"band_of": 6}, "max_pass 7 exceeds the 6 samples per question the band is for"),
    ({"max_pass": 17}, "max_pass 17 exceeds the 16 samples per question the band is for"),
])
def test_a_band_that_cannot_fit_its_sample_count_is_refused_before_any_work(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        CurateConfig(source="bundled", pass_counts=str(tmp_path / "none"), output=str(tmp_path / "out"), **changes)
