"""Curation by pass count: counts on a hand-made pass-count file, orders, and a dataset training reads."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from results_helpers import record, write_results

from medvl_engine.cli import main as cli
from medvl_engine.data import bundled_dataset_path, load_bundled, load_samples
from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.evals.curate import CurateConfig, curate, read_pass_counts, select

# Hand-made pass counts (of 16) for the bundled questions 0..36: index -> count. Indices 30..36 get no
# count (not evaluated), 100 and 101 are not in the dataset.
PASS = {i: c for i, c in enumerate([0, 1, 2, 7, 8, 16, 3, 3, 3, 3, 3, 3, 0, 5, 9, 1, 1, 4, 6, 7,
                                    12, 0, 2, 2, 15, 7, 3, 0, 1, 10])}
PASS.update({100: 3, 101: 9})


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


@pytest.fixture()
def pass_file(tmp_path, bundled):
    by_index = bundled.by_index()
    rows = []
    for index, count in PASS.items():
        sample = by_index.get(index) or by_index[0]
        r = record(sample, ["<think>t</think><answer>A</answer>"] * 16, correct=[k < count for k in range(16)])
        r["dataset_index"] = index
        rows.append(r)
    return write_results(tmp_path / "passrate" / "results.jsonl", rows)


def test_counts_at_each_end_and_missing(bundled, pass_file):
    counts, n = read_pass_counts(pass_file.parent)
    assert n == 16 and counts == PASS
    result = select([s.dataset_index for s in bundled], counts)
    in_dataset = [c for i, c in PASS.items() if i < len(bundled)]
    assert result.total == len(bundled) == 37
    assert result.dropped_below == sum(c < 1 for c in in_dataset) == 4
    assert result.dropped_above == sum(c > 7 for c in in_dataset) == 6
    assert result.missing == 7
    assert result.unknown == 2
    assert result.kept == 37 - 4 - 6 - 7 == 20
    assert sorted(result.pass_counts) == sorted(c for c in in_dataset if 1 <= c <= 7)
    assert all(PASS[bundled[row].dataset_index] == c for row, c in zip(result.rows, result.pass_counts))


def test_orders_and_seeded_tie_shuffle(bundled):
    indices = [s.dataset_index for s in bundled]
    easy = select(indices, PASS, order="easy_to_hard", seed=42)
    assert easy.pass_counts == sorted(easy.pass_counts, reverse=True)
    hard = select(indices, PASS, order="hard_to_easy", seed=42)
    assert hard.pass_counts == sorted(hard.pass_counts)
    shuffled = select(indices, PASS, order="shuffled", seed=42)
    assert sorted(shuffled.rows) == sorted(easy.rows) and shuffled.rows != sorted(shuffled.rows)
    # Seven rows share pass count 3: their order is the seed's, the same every time for one seed.
    ties = [row for row, c in zip(easy.rows, easy.pass_counts) if c == 3]
    assert len(ties) == 7
    assert ties == [row for row, c in zip(select(indices, PASS, seed=42).rows, easy.pass_counts) if c == 3]
    other = select(indices, PASS, seed=7)
    assert [row for row, c in zip(other.rows, other.pass_counts) if c == 3] != ties
    narrow = select(indices, PASS, min_pass=3, max_pass=3)
    assert narrow.kept == 7 and narrow.dropped_below == Counter(
        c < 3 for i, c in PASS.items() if i < 37)[True]


def test_pass_counts_of_different_n_are_refused(tmp_path, bundled):
    rows = [record(bundled[0], ["a"] * 16), record(bundled[1], ["a"] * 8)]
    write_results(tmp_path / "results.jsonl", rows)
    with pytest.raises(RunFolderError, match=r"different sample counts \[8, 16\]"):
        read_pass_counts(tmp_path / "results.jsonl")


def test_curate_command_writes_a_dataset_training_reads(tmp_path, bundled, pass_file, capsys):
    out = tmp_path / "curated"
    assert cli(["curate", "--source", "bundled", "--pass-counts", str(pass_file.parent), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dropped, pass < 1     4" in printed and "no pass count          7" in printed
    summary = json.loads((out / "curation.json").read_text())
    assert (summary["kept"], summary["dropped_below"], summary["dropped_above"], summary["missing"]) == (20, 4, 6, 7)

    expected = select([s.dataset_index for s in bundled], PASS)
    by_index = bundled.by_index()
    for source in (out / "dataset", out / "data.parquet"):
        curated = load_samples(source, split="train")
        assert [s.dataset_index for s in curated] == [bundled[r].dataset_index for r in expected.rows]
        for s in curated:
            original = by_index[s.dataset_index]
            assert (s.question, s.options, s.answer_label, s.answer, s.reasoning, s.dataset_name) == (
                original.question, original.options, original.answer_label, original.answer, original.reasoning,
                original.dataset_name)
            assert len(s.images) == len(original.images)
            for a, b in zip(s.images, original.images):
                assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    import datasets

    saved = datasets.load_from_disk(str(out / "dataset"))
    assert saved["pass_count"] == expected.pass_counts
    # The images are the bundled files' own bytes, not a re-encoding.
    raw = saved.cast_column("images", datasets.List(datasets.Image(decode=False)))
    questions = {json.loads(line)["dataset_index"]: json.loads(line) for line in
                 bundled_dataset_path().read_text().splitlines() if line.strip()}
    checked = 0
    for row in raw:
        files = questions[row["dataset_index"]].get("images") or []
        for image, name in zip(row["images"], files):
            assert image["bytes"] == (bundled_dataset_path().parent / name).read_bytes()
            checked += 1
    assert checked >= 10

    assert cli(["curate", "--source", "bundled", "--pass-counts", str(pass_file), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["curate", "--source", "bundled", "--pass-counts", str(pass_file), "--output", str(tmp_path / "x"),
                "--max-pass", "20"]) == 2
    assert "max_pass 20 exceeds the 16 samples" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_band_that_keeps_no_row_writes_an_empty_dataset(tmp_path, bundled):
    import datasets

    rows = [record(s, ["a"] * 16) for s in bundled]  # no sample solves any question: every count is 0
    write_results(tmp_path / "passrate" / "results.jsonl", rows)
    out = tmp_path / "curated"
    result = curate(CurateConfig(source="bundled", pass_counts=str(tmp_path / "passrate"), output=str(out)))
    assert (result.kept, result.dropped_below) == (0, 37)
    assert json.loads((out / "curation.json").read_text())["kept"] == 0
    saved = datasets.load_from_disk(str(out / "dataset"))
    assert len(saved) == 0 and "pass_count" in saved.column_names
    assert len(load_samples(out / "data.parquet", split="train")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated", "passrate"]  # nothing left beside it


def test_a_failed_write_leaves_the_earlier_curation_whole(tmp_path, bundled, pass_file, monkeypatch):
    import datasets

    out = tmp_path / "curated"
    cfg = CurateConfig(source="bundled", pass_counts=str(pass_file.parent), output=str(out))
    curate(cfg)
    before = _tree(out)

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    with pytest.raises(OSError, match="No space left"):
        curate(CurateConfig(source="bundled", pass_counts=str(pass_file.parent), output=str(out), overwrite=True,
                            max_pass=3))
    assert _tree(out) == before
    with pytest.raises(OSError, match="No space left"):
        curate(CurateConfig(source="bundled", pass_counts=str(pass_file.parent), output=str(tmp_path / "new")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated", "passrate"]
    monkeypatch.undo()

    result = curate(CurateConfig(source="bundled", pass_counts=str(pass_file.parent), output=str(out), overwrite=True,
                                 max_pass=3))
    assert json.loads((out / "curation.json").read_text())["kept"] == result.kept == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated", "passrate"]


def test_overwrite_never_removes_an_input_or_a_folder_curate_did_not_write(tmp_path, bundled, pass_file):
    counts = _tree(pass_file.parent)
    for output in (pass_file.parent, tmp_path):  # the pass-counts folder, and a folder holding it
        with pytest.raises(ConfigError, match=r"--output .* (is|holds) the input"):
            curate(CurateConfig(source="bundled", pass_counts=str(pass_file.parent), output=str(output),
                                overwrite=True))
        assert _tree(pass_file.parent) == counts
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of notes")
    with pytest.raises(RunFolderError, match=r"no curation.json, so curate did not write it"):
        curate(CurateConfig(source="bundled", pass_counts=str(pass_file.parent), output=str(mine), overwrite=True))
    assert (mine / "notes.txt").read_text() == "a week of notes"
