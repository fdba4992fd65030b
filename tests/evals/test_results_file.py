"""The results file: append-only, resumable after a torn write, never a question twice, sorted at the end."""

from __future__ import annotations

import json

import pytest
from results_helpers import record

from medvl_engine.data import load_bundled
from medvl_engine.errors import RunFolderError
from medvl_engine.evals.results import ResultsFile, encode_record, read_records


@pytest.fixture(scope="module")
def samples():
    return list(load_bundled())[:6]


def test_append_reopen_and_finalize_sorted(tmp_path, samples):
    path = tmp_path / "results.jsonl"
    order = [3, 0, 5]
    with ResultsFile(path) as results:
        for i in order:
            results.append(record(samples[i], ["<answer> A </answer>"]))
    reopened = ResultsFile(path)
    assert reopened.open() == {samples[i].dataset_index for i in order}
    reopened.append(record(samples[1], ["x", "y"]))
    reopened.finalize()
    lines = path.read_text().splitlines()
    written = [json.loads(line)["dataset_index"] for line in lines]
    assert written == sorted(samples[i].dataset_index for i in [0, 1, 3, 5])
    expected = sorted([record(samples[i], ["<answer> A </answer>"]) for i in order] + [record(samples[1], ["x", "y"])],
                      key=lambda r: r["dataset_index"])
    assert path.read_text() == "".join(encode_record(r) for r in expected)


def test_a_question_is_never_written_twice(tmp_path, samples):
    path = tmp_path / "results.jsonl"
    with ResultsFile(path) as results:
        results.append(record(samples[0], ["a"]))
        with pytest.raises(ValueError, match="already written"):
            results.append(record(samples[0], ["b"]))
    with ResultsFile(path) as results, pytest.raises(ValueError, match="already written"):
        results.append(record(samples[0], ["c"]))
    assert len(read_records(path)) == 1


def test_torn_last_line_is_cut_and_that_question_runs_again(tmp_path, samples):
    path = tmp_path / "results.jsonl"
    full = encode_record(record(samples[0], ["a"])) + encode_record(record(samples[1], ["b"]))
    torn = encode_record(record(samples[2], ["c"]))[:25]
    path.write_text(full + torn)
    results = ResultsFile(path)
    assert results.open() == {samples[0].dataset_index, samples[1].dataset_index}
    results.append(record(samples[2], ["c"]))
    results.close()
    assert path.read_text() == full + encode_record(record(samples[2], ["c"]))


def test_damage_inside_the_file_is_an_error_naming_the_line(tmp_path, samples):
    path = tmp_path / "results.jsonl"
    path.write_text(encode_record(record(samples[0], ["a"])) + "{not json\n" + encode_record(record(samples[1], ["b"])))
    with pytest.raises(RunFolderError, match=r"results.jsonl:2: not valid JSON"):
        ResultsFile(path).open()
    path.write_text(encode_record(record(samples[0], ["a"])) * 2)
    with pytest.raises(RunFolderError, match=r":2: dataset_index 0 already written on line 1"):
        read_records(path)
    bad = record(samples[0], ["a"])
    bad["num_rollouts"] = 2
    path.write_text(encode_record(bad))
    with pytest.raises(RunFolderError, match="1 parsed_outputs but num_rollouts=2"):
        read_records(path)


def test_reading_and_finalizing_hold_one_record_at_a_time(tmp_path):
    """A pass-rate run of PMC-VQA writes ~177k records of ~30 KiB: finalize once held every record parsed and
    the whole sorted file as one string (~15 GB at that size). Peak heap at 4x the records stays flat."""
    import tracemalloc

    from medvl_engine.evals.results import iter_pass_counts

    def peaks(count: int) -> tuple[int, int]:
        path = tmp_path / f"results-{count}.jsonl"
        outputs = [{"output_text": "x" * 2000, "pred_letter": "A", "is_correct": True}] * 8
        with ResultsFile(path) as results:
            for i in reversed(range(count)):  # written out of order, as a pool finishes them
                results.append({"dataset_name": "pmc_vqa", "dataset_index": i, "answer_label": "A", "answer": "a",
                                "parsed_outputs": outputs, "num_rollouts": 8, "num_correct": 8})
        tracemalloc.start()
        try:
            ResultsFile(path).finalize()
            finalize = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            assert sum(1 for _ in iter_pass_counts(path)) == count
            counts = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [json.loads(line)["dataset_index"] for line in path.read_text().splitlines()] == list(range(count))
        return finalize, counts, path.stat().st_size

    small_finalize, small_counts, _ = peaks(100)
    finalize, counts, size = peaks(400)  # a 6.6 MB file
    assert finalize < size / 8 and counts < size / 8
    assert finalize < 1.5 * small_finalize + (1 << 20) and counts < 1.5 * small_counts + (1 << 20)
