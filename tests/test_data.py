"""Loaders of the unified Sample: jsonl, parquet and save_to_disk sources, good rows and each kind of bad row."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from medvl_engine.data import DataError, Sample, bundled_dataset_path, load_bundled, load_samples
from medvl_engine.tables import BENCHMARKS

ROW = {
    "dataset_index": 0,
    "dataset_name": "slake_closed",
    "question": "Is the heart enlarged?",
    "options": '{"A": "Yes", "B": "No"}',
    "answer_label": "A",
    "answer": "Yes",
    "reasoning": "The cardiothoracic ratio is above 0.5.",
}


def _row(**changes) -> dict:
    row = {**ROW, **changes}
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _scan(seed: int, size=(24, 20), mode="L") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


# --- the bundled set ----------------------------------------------------------------------------------


def test_bundled_set_is_complete_and_valid():
    samples = load_bundled()
    assert 30 <= len(samples) <= 40 and not samples.skipped
    assert [s.dataset_index for s in samples] == list(range(len(samples)))
    names = Counter(s.dataset_name for s in samples)
    assert {name for name, _ in BENCHMARKS} < set(names)
    assert names["GBaker/MedQA-USMLE-4-options"] >= 3
    for sample in samples:
        assert sample.reasoning and sample.reasoning == sample.reasoning.strip()
        assert sample.options[sample.answer_label] == sample.answer
        assert list(sample.options) == [chr(ord("A") + i) for i in range(len(sample.options))]
        for image in sample.images:
            image.load()
            assert max(image.size) <= 128
    with_images = [s for s in samples if s.images]
    assert len(with_images) >= 25 and any(len(s.images) == 2 for s in with_images)
    assert any(not s.images for s in samples)
    assert bundled_dataset_path().name == "questions.jsonl"


def test_bundled_images_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_images", bundled_dataset_path().parent / "make_images.py")
    make_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_images)
    drawn = make_images.images()
    folder = bundled_dataset_path().parent / "images"
    assert sorted(drawn) == sorted(p.name for p in folder.glob("*.png"))
    for name, image in drawn.items():
        with Image.open(folder / name) as committed:
            assert committed.mode == image.mode
            np.testing.assert_array_equal(np.asarray(committed), np.asarray(image), err_msg=name)


# --- jsonl --------------------------------------------------------------------------------------------


def test_jsonl_options_as_json_string_and_mapping(tmp_path):
    options = {"C": "Liver", "A": "Spleen", "B": "Kidney"}  # stored order, not sorted
    rows = [
        _row(dataset_index=3, options=json.dumps(options), answer_label="C", answer="Liver"),
        _row(dataset_index=5, options=options, answer_label="C", answer="Liver"),
    ]
    samples = load_samples(_write_jsonl(tmp_path / "q.jsonl", rows))
    assert samples.name == "q.jsonl" and len(samples) == 2
    for sample in samples:
        assert isinstance(sample, Sample)
        assert list(sample.options.items()) == list(options.items())
    assert samples.by_index()[5].answer == "Liver"


def test_jsonl_images_from_relative_paths_and_dicts(tmp_path):
    (tmp_path / "img").mkdir()
    first, second = _scan(1), _scan(2, mode="RGB")
    first.save(tmp_path / "img" / "a.png")
    second.save(tmp_path / "img" / "b.png")
    rows = [_row(images=["img/a.png", {"bytes": None, "path": "img/b.png"}]), _row(dataset_index=1, images=None)]
    samples = load_samples(_write_jsonl(tmp_path / "q.jsonl", rows))
    assert [len(s.images) for s in samples] == [2, 0]
    np.testing.assert_array_equal(_pixels(samples[0].images[0]), _pixels(first))
    np.testing.assert_array_equal(_pixels(samples[0].images[1]), _pixels(second))


def test_missing_dataset_index_defaults_to_row_position(tmp_path):
    rows = [_row(dataset_index=_DROP), "", _row(dataset_index=_DROP, dataset_name=_DROP, reasoning=_DROP)]
    samples = load_samples(_write_jsonl(tmp_path / "q.jsonl", rows))
    assert [s.dataset_index for s in samples] == [0, 1]  # the blank line is not a row
    assert samples[1].dataset_name == "" and samples[1].reasoning is None


BAD_ROWS = [
    (_row(answer=_DROP), "missing field 'answer'"),
    (_row(question=_DROP, options=_DROP), "missing field 'question' (also ['options'])"),
    (_row(answer_label="C"), "field 'answer_label': 'C' is not among the options ['A', 'B']"),
    (_row(options='{"A": "Yes", "B": "No"'), "field 'options': not valid JSON (Expecting ',' delimiter: character"),
    (_row(options='["Yes", "No"]'), "field 'options': JSON decodes to list, expected an object letter -> text"),
    (_row(options=7), "field 'options': expected a JSON object string or a mapping, got int"),
    (_row(options="{}"), "field 'options': empty"),
    (_row(options='{"A": "Yes", "B": 2}'), "field 'options': option B is int, expected str"),
    (_row(answer="No"), "field 'answer': 'No' is not the text of option A ('Yes')"),
    (_row(question="  "), "field 'question': empty"),
    (_row(dataset_index="4"), "field 'dataset_index': expected int, got str"),
    (_row(reasoning=["step"]), "field 'reasoning': expected str or None, got list"),
    (_row(images=["missing.png"]), "field 'images'[0]: image file '{dir}/missing.png' not found"),
    (_row(images=["notes.png"]), "field 'images'[0]: not a readable image (cannot identify image file"),
    (_row(images=[{"bytes": None, "path": None}]), "field 'images'[0]: image dict has neither bytes nor path"),
    (_row(images=[3]), "field 'images'[0]: expected a PIL image, an image dict or a path, got int"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"question": "truncated', "not valid JSON (Unterminated string starting at: column 14)"),
]


@pytest.mark.parametrize("bad, problem", BAD_ROWS, ids=[p.split(":")[0][:40] for _, p in BAD_ROWS])
def test_bad_row_names_dataset_row_and_problem(tmp_path, bad, problem):
    (tmp_path / "notes.png").write_text("not a picture")
    good = _row(dataset_index=10)
    path = _write_jsonl(tmp_path / "eval.jsonl", [good, "", bad])
    with pytest.raises(DataError) as raised:
        load_samples(path, name="my-eval")
    message = str(raised.value)
    assert message.startswith("my-eval: row 1 (line 3): "), message
    assert problem.format(dir=tmp_path) in message


def test_duplicate_dataset_index_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(dataset_index=4), _row(dataset_index=4)])
    with pytest.raises(DataError, match=r"q.jsonl: row 1 \(line 2\): field 'dataset_index': 4 already used by row 0"):
        load_samples(path)


def test_skip_invalid_drops_and_reports(tmp_path, caplog):
    rows = [
        _row(dataset_index=0),
        _row(dataset_index=1, answer_label="E"),
        _row(dataset_index=2),
        "not json",
        _row(dataset_index=4, answer=_DROP),
    ]
    with caplog.at_level(logging.WARNING, logger="medvl_engine.data.loaders"):
        samples = load_samples(_write_jsonl(tmp_path / "q.jsonl", rows), skip_invalid=True)
    assert [s.dataset_index for s in samples] == [0, 2]
    assert [row for row, _ in samples.skipped] == [1, 3, 4]
    assert "'E' is not among the options" in samples.skipped[0][1]
    assert samples.skipped[1][1].startswith("not valid JSON")
    assert samples.skipped[2][1] == "missing field 'answer'"
    summary = samples.skipped_summary()
    assert summary.startswith("q.jsonl: skipped 3 of 5 rows (row 1: field 'answer_label'")
    assert "row 4: missing field 'answer'" in summary
    assert summary in caplog.text
    assert samples.skipped_summary(limit=1).endswith("; ... and 2 more)")


# --- sources ------------------------------------------------------------------------------------------


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl: file not found"):
        load_samples(tmp_path / "absent.jsonl")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="not a .jsonl or .parquet file, a save_to_disk folder, or a hub name"):
        load_samples(tmp_path / "table.csv")
    with pytest.raises(DataError, match="not a folder written by save_to_disk"):
        load_samples(tmp_path)
    with pytest.raises(TypeError, match="source: expected a path"):
        load_samples(3)


def _image_dataset(rows_images):
    import datasets

    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "question": datasets.Value("string"),
            "options": datasets.Value("string"),
            "answer_label": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "reasoning": datasets.Value("string"),
            "dataset_name": datasets.Value("string"),
            "dataset_index": datasets.Value("int64"),
        }
    )
    rows = [_row(dataset_index=10 + i, images=images) for i, images in enumerate(rows_images)]
    return datasets.Dataset.from_list(rows, features=features)


def test_save_to_disk_round_trip_with_images(tmp_path):
    import datasets

    images = [[_scan(1), _scan(2, (30, 18), "RGB")], [], [_scan(3)]]
    datasets.DatasetDict({"test": _image_dataset(images)}).save_to_disk(tmp_path / "dict")
    _image_dataset(images).save_to_disk(tmp_path / "plain")
    for folder in ("dict", "plain"):
        samples = load_samples(tmp_path / folder)
        assert samples.name == folder
        assert [s.dataset_index for s in samples] == [10, 11, 12]
        for sample, expected in zip(samples, images):
            assert len(sample.images) == len(expected)
            for got, want in zip(sample.images, expected):
                assert got.size == want.size
                np.testing.assert_array_equal(_pixels(got), _pixels(want))
    with pytest.raises(DataError, match=r"no split 'validation' \(has \['test'\]\)"):
        load_samples(tmp_path / "dict", split="validation")


def test_dataset_object_with_a_bad_image_names_its_row():
    import datasets

    raw_images = datasets.List(datasets.Image(decode=False))
    dataset = _image_dataset([[_scan(1)], [_scan(2)]]).cast_column("images", raw_images)
    broken = dataset.to_list()
    broken[1]["images"][0]["bytes"] = b"\x89PNG broken"
    dataset = datasets.Dataset.from_list(broken, features=dataset.features)
    with pytest.raises(DataError, match=r"dataset: row 1: field 'images'\[0\]: not a readable image"):
        load_samples(dataset)
    samples = load_samples(dataset, skip_invalid=True)
    assert [s.dataset_index for s in samples] == [10] and samples.skipped[0][0] == 1


def test_parquet_from_datasets_round_trip(tmp_path):
    images = [[_scan(5)], [_scan(6), _scan(7, mode="RGB")]]
    _image_dataset(images).to_parquet(tmp_path / "eval.parquet")
    samples = load_samples(tmp_path / "eval.parquet")
    assert samples.name == "eval.parquet" and len(samples) == 2
    for sample, expected in zip(samples, images):
        for got, want in zip(sample.images, expected, strict=True):
            np.testing.assert_array_equal(_pixels(got), _pixels(want))


def test_parquet_options_struct_drops_arrow_padding(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    _scan(9).save(buffer, format="PNG")
    rows = [
        _row(options={"A": "Yes", "B": "No"}, images=[{"bytes": buffer.getvalue(), "path": None}]),
        _row(dataset_index=1, options={"A": "CT", "B": "MRI", "C": "X-ray"}, answer="CT", images=[]),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "struct.parquet")
    samples = load_samples(tmp_path / "struct.parquet")
    assert samples[0].options == {"A": "Yes", "B": "No"}  # the struct has a "C": None for this row
    assert samples[1].options == {"A": "CT", "B": "MRI", "C": "X-ray"}
    np.testing.assert_array_equal(_pixels(samples[0].images[0]), _pixels(_scan(9)))


def test_parquet_bad_row_and_bad_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([_row(), _row(dataset_index=1, answer_label="Z")]), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: row 1: field 'answer_label': 'Z' is not among"):
        load_samples(tmp_path / "x.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        load_samples(tmp_path / "junk.parquet")


# --- Sample itself ------------------------------------------------------------------------------------


def test_sample_checks_types():
    with pytest.raises(TypeError, match="field 'images': expected a list of PIL images, got tuple"):
        Sample((), "q", {"A": "x"}, "A", "x")
    with pytest.raises(TypeError, match=r"field 'images'\[1\]: expected a PIL image, got str"):
        Sample([_scan(1), "a.png"], "q", {"A": "x"}, "A", "x")
    with pytest.raises(DataError, match="field 'options': key ' A' is not a letter"):
        Sample([], "q", {" A": "x"}, " A", "x")
    with pytest.raises(DataError, match="field 'dataset_index': -2 is negative"):
        Sample([], "q", {"A": "x"}, "A", "x", dataset_index=-2)
    sample = Sample([], "q", {"A": "Ménière disease"}, "A", "  MÉNIÈRE DISEASE ")  # the graders' equality
    with pytest.raises(AttributeError):
        sample.question = "other"
