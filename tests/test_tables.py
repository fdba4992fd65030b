"""The accuracy table: MedVLThinker's column order, the unweighted Avg., extras, rendering and bad records."""

from __future__ import annotations

import json

import pytest

from medvl_engine.tables import BENCHMARKS, accuracy_table, comparison_markdown


def _records(spec: dict[str, list]) -> list[dict]:
    return [{"dataset_name": name, "correct": c} for name, values in spec.items() for c in values]


def test_columns_follow_medvlthinker_order_whatever_the_record_order():
    names = [name for name, _ in BENCHMARKS]
    records = _records({name: [True] for name in reversed(names)} | {"zeta": [False], "alpha": [True]})
    table = accuracy_table(records)
    expected = ["PMC", "MMMU", "MedX-M", "PathVQA", "SLAKE", "VQA-Rad", "alpha", "zeta"]
    assert [c.column for c in table.columns] == expected
    assert table.averaged == tuple(names)  # extras are not averaged when a benchmark is present
    assert table.average == 1.0


def test_average_is_unweighted_over_datasets():
    # 1/4 on 4 PMC questions and 1/1 on SLAKE: the mean of 25% and 100%, not 2 of 5 questions.
    table = accuracy_table(_records({"pmc_vqa": [1, 0, 0, 0], "slake_closed": [True], "GBaker/MedQA": [0]}))
    assert table["pmc_vqa"].accuracy == 0.25 and table["pmc_vqa"].count == 4
    assert table.average == pytest.approx(0.625)
    assert table.averaged == ("pmc_vqa", "slake_closed")
    assert table.questions == 6


def test_extras_only_are_averaged():
    table = accuracy_table([("GBaker/MedQA", True), ("medmcqa", False), ("medmcqa", True)])
    assert [c.column for c in table.columns] == ["GBaker/MedQA", "medmcqa"]
    assert table.average == pytest.approx((1.0 + 0.5) / 2)


def test_fractional_correctness_of_several_rollouts():
    # MedVLThinker's average_num_correct: 3 of 5 rollouts right on one question, 0 of 5 on another.
    table = accuracy_table(_records({"MMMU-medical": [0.6, 0.0]}))
    assert table["MMMU-medical"].accuracy == pytest.approx(0.3)


def test_markdown_and_dict():
    table = accuracy_table(_records({"vqa_rad_closed": [True, False, True], "pmc_vqa": [True, True], "x": [False]}))
    assert table.to_markdown() == "\n".join(
        [
            "|              | PMC    | VQA-Rad | x    | Avg.  |",
            "|--------------|--------|---------|------|-------|",
            "| accuracy (%) | 100.00 |   66.67 | 0.00 | 83.33 |",
            "| questions    |      2 |       3 |    1 |     6 |",
        ]
    )
    data = json.loads(json.dumps(table.to_dict()))
    assert data["columns"] == ["PMC", "VQA-Rad", "x", "Avg."]
    assert data["datasets"]["vqa_rad_closed"] == {"column": "VQA-Rad", "count": 3, "correct": 2.0, "accuracy": 2 / 3}
    assert data["average"] == pytest.approx(5 / 6) and data["averaged"] == ["pmc_vqa", "vqa_rad_closed"]


def test_comparison_over_the_union_of_columns():
    first = accuracy_table(_records({"pmc_vqa": [True], "slake_closed": [False]}))
    second = accuracy_table(_records({"slake_closed": [True], "MMMU-medical": [True, False]}))
    lines = comparison_markdown({"base": first, "rl": second}).splitlines()
    assert lines[0] == "|      | PMC    | MMMU  | SLAKE  | Avg.  |"
    assert lines[2] == "| base | 100.00 |     - |   0.00 | 50.00 |"
    assert lines[3] == "| rl   |      - | 50.00 | 100.00 | 75.00 |"


def test_empty_table():
    table = accuracy_table([])
    assert table.columns == () and table.average is None
    assert table.to_markdown().splitlines()[2] == "| accuracy (%) |    - |"


@pytest.mark.parametrize(
    "record, error, message",
    [
        ({"dataset_name": "x"}, ValueError, r"\[0\]: needs 'dataset_name' and 'correct', has \['dataset_name'\]"),
        (("pmc_vqa", "yes"), TypeError, r"records\[0\]: correct must be a bool or a number, got 'yes'"),
        (("pmc_vqa", 1.5), ValueError, r"records\[0\]: correct must lie in \[0, 1\], got 1.5"),
        ((3, True), TypeError, r"records\[0\]: dataset_name must be str, got int"),
        ("pmc_vqa", TypeError, r"records\[0\]: expected a mapping or a \(dataset_name, correct\) pair"),
    ],
)
def test_bad_records(record, error, message):
    with pytest.raises(error, match=message):
        accuracy_table([record])
