"""build-data filter-text and filter-image, row by row, and the sources they read."""

from __future__ import annotations

import json

import pytest
from databuild_helpers import ROWS, folder_bytes, read_jsonl, write_source

from medvl_engine.databuild.config import ImageFilterConfig, InputConfig, TextFilterConfig
from medvl_engine.databuild.filter_image import ImageFilter, check_image
from medvl_engine.databuild.filter_text import TermCounter, TextFilter, read_lexicon
from medvl_engine.databuild.records import BadRow, CaptionRecord, read_records
from medvl_engine.databuild.stage import run_stage
from medvl_engine.errors import RunFolderError


def terms(counter: TermCounter, text: str) -> list[str]:
    return [counter.terms[i] for i in counter.matches(text)]


def test_term_matching_rules():
    counter = TermCounter(["CT", "lung", "lung cancer", "small cell lung cancer", "x-ray", "H&E", "effusion"])
    # Case-insensitive, multi-word, leftmost-longest without overlap; "ct" is not found inside "effect".
    assert terms(counter, "Axial CT: small cell lung cancer; lung; effect, CTs") == ["ct", "small cell lung cancer",
                                                                                       "lung"]
    # Punctuation and hyphens are spaces on both sides; adjacent terms both count.
    assert terms(counter, "X-ray/x ray (H&E) lung cancer effusion.") == ["x ray", "x ray", "h e", "lung cancer",
                                                                          "effusion"]
    assert counter.count("lung lung lung") == 3
    assert counter.count("lung lung lung", distinct=True) == 1
    assert terms(counter, "") == []


def test_lexicon_file_comments_and_tabs(tmp_path):
    path = tmp_path / "lexicon.tsv"
    path.write_text("# a comment\nmass\tC0577559\tfinding\n\nlung nodule\n")
    assert read_lexicon(path) == ["mass", "lung nodule"]
    assert len(read_lexicon()) > 300  # the bundled default


def test_sources_and_bad_rows(caption_source, tmp_path):
    rows = list(read_records(InputConfig(source=str(caption_source))))
    assert [r.id for _, r in rows] == ["r0", "r1", "r2", "r3", "r4", "no-caption", "r5", "r6", "row-8", "r7", "r8",
                                       "r9", "r10", "r11"]
    assert [p for p, _ in rows] == list(range(14))
    bad = {r.id: r for _, r in rows if isinstance(r, BadRow)}
    assert bad["no-caption"].detail == "no caption" and "not valid JSON" in bad["row-8"].detail
    r9 = dict(rows)[11]
    assert isinstance(r9, CaptionRecord) and len(r9.images) == 2 and r9.images[0].startswith("/")
    assert r9.context == "The lesion is shown in Fig 1"
    # Resuming at a row reads from there with the same numbers.
    assert [p for p, _ in read_records(InputConfig(source=str(caption_source)), start=9)] == list(range(9, 14))
    # A datasets folder with an Image column: the bytes are written once into the stage's image folder.
    import datasets

    ds = datasets.Dataset.from_dict({"pair_id": ["a", "b"], "fig_caption": ["CT of the lung.", "MRI of the brain."],
                                     "image": [str(caption_source.parent / "images/r0.png")] * 2})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    got = list(read_records(InputConfig(source=str(tmp_path / "ds")), images_dir=tmp_path / "imgs"))
    assert [r.id for _, r in got] == ["a", "b"] and got[1][1].caption == "MRI of the brain."
    assert open(got[0][1].images[0], "rb").read() == (caption_source.parent / "images/r0.png").read_bytes()


def test_filter_text_row_by_row(caption_source, tmp_path):
    summary = run_stage(TextFilter(TextFilterConfig()), tmp_path / "out", InputConfig(source=str(caption_source)),
                        show_progress=False)
    kept = read_jsonl(tmp_path / "out/kept.jsonl")
    dropped = {d["id"]: d for d in read_jsonl(tmp_path / "out/dropped.jsonl")}
    assert [k["id"] for k in kept] == [row[0] for row in ROWS if row[3] == "keep"]
    # The chart caption's one term is "lesion", in its inline mention.
    assert dropped["r1"]["reason"] == "too few medical terms" and dropped["r1"]["detail"] == "1 < 5"
    assert dropped["no-caption"]["reason"] == "bad row" and dropped["row-8"]["reason"] == "bad row"
    assert summary["kept"] == 11 and summary["dropped"] == {"bad row": 2, "too few medical terms": 1}
    assert sum(summary["term_histogram"].values()) == 12  # every record counted, bad rows are not records
    assert summary["term_histogram"]["1"] == 1
    # Kept records carry what the next stage needs, image paths made absolute.
    assert kept[0]["caption"].startswith("Axial") and kept[0]["images"][0].endswith("images/r0.png")
    assert "### medical terms per row" in (tmp_path / "out/summary.md").read_text()
    # A user's lexicon and a higher bar.
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("lung\nmri\nct\n")
    run_stage(TextFilter(TextFilterConfig(lexicon=str(lexicon), min_terms=1)), tmp_path / "out2",
              InputConfig(source=str(caption_source)), show_progress=False)
    assert [k["id"] for k in read_jsonl(tmp_path / "out2/kept.jsonl")] == ["r0", "r3", "r5", "r7", "r8", "r10", "r11"]


def test_check_image_cases(tmp_path):
    from medvl_engine.databuild.synthetic import write_image

    ok = write_image(tmp_path / "ok.jpg", 500, 400)
    assert check_image(str(ok), 336, 336).ok
    small = check_image(str(ok), 600, 336)
    assert (small.ok, small.reason, small.size) == (False, "image too small", (500, 400))
    png = write_image(tmp_path / "ok.png", 400, 400)
    png.write_bytes(png.read_bytes()[:-200])
    assert check_image(str(png), 1, 1).reason == "truncated image"
    assert check_image(str(tmp_path / "nope.png"), 1, 1).reason == "missing image file"


def write_classifier(tmp_path, body: str):
    path = tmp_path / "classifier.py"
    path.write_text(body)
    return f"{path}:classify"


def test_filter_image_row_by_row(caption_source, tmp_path):
    text = tmp_path / "text"
    run_stage(TextFilter(TextFilterConfig()), text, InputConfig(source=str(caption_source)), show_progress=False)
    summary = run_stage(ImageFilter(ImageFilterConfig()), tmp_path / "img",
                        InputConfig(source=str(text / "kept.jsonl")), show_progress=False)
    kept = [k["id"] for k in read_jsonl(tmp_path / "img/kept.jsonl")]
    dropped = {d["id"]: d for d in read_jsonl(tmp_path / "img/dropped.jsonl")}
    for row_id, _, _, text_outcome, image_outcome, _ in ROWS:
        if text_outcome != "keep":
            continue
        if image_outcome == "keep":
            assert row_id in kept
        else:
            assert dropped[row_id]["reason"] == image_outcome, row_id
    assert "r10b.png: 100x100 < 336x336" in dropped["r10"]["detail"]  # the failing image of a two-image row
    assert "r3.png: 200x400" in dropped["r3"]["detail"]
    assert summary["dropped"] == {"image too small": 2, "missing image file": 1, "truncated image": 1,
                                  "undecodable image": 1}
    # The classifier hook: a function in a file, given RGB images, returning scores.
    spec = write_classifier(tmp_path, "def classify(images):\n"
                                      "    assert all(im.mode == 'RGB' for im in images)\n"
                                      "    return [0.9 if im.width < 600 else 0.1 for im in images]\n")
    run_stage(ImageFilter(ImageFilterConfig(classifier=spec, classifier_batch=2)), tmp_path / "cls",
              InputConfig(source=str(text / "kept.jsonl")), show_progress=False)
    dropped = {d["id"]: d for d in read_jsonl(tmp_path / "cls/dropped.jsonl")}
    # The classifier sees every image whole (no JPEG draft decoding): r7 (640 wide) and r11 (800) go.
    assert [k["id"] for k in read_jsonl(tmp_path / "cls/kept.jsonl")] == ["r0", "r2", "r8", "r9"]
    assert dropped["r7"]["reason"] == "rejected by classifier" and "0.1" in dropped["r11"]["detail"]


def crash_after(stage, calls: int):
    """Make `stage.decide` raise on its `calls`-th call, as a crash in the middle of a run would."""
    decide, seen = stage.decide, [0]

    def crashing(records):
        seen[0] += 1
        if seen[0] == calls:
            raise KeyboardInterrupt("simulated crash")
        return decide(records)

    stage.decide = crashing
    return stage


@pytest.mark.parametrize("make", [lambda: TextFilter(TextFilterConfig()), lambda: ImageFilter(ImageFilterConfig())],
                         ids=["filter-text", "filter-image"])
def test_resume_after_crash_equals_uninterrupted(caption_source, tmp_path, make):
    source = InputConfig(source=str(caption_source))

    def stage(crash=None):
        s = make()
        s.batch_size = 3
        return crash_after(s, crash) if crash else s

    run_stage(stage(), tmp_path / "once", source, checkpoint_rows=2, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage(crash=4), tmp_path / "twice", source, checkpoint_rows=2, show_progress=False)
    state = json.loads((tmp_path / "twice/state.json").read_text())
    assert state["rows_done"] == 9 and not state["complete"]
    with (tmp_path / "twice/kept.jsonl").open("ab") as f:
        f.write(b'{"id": "torn')  # a line cut by the crash
    run_stage(stage(), tmp_path / "twice", source, checkpoint_rows=2, show_progress=False)
    assert folder_bytes(tmp_path / "twice") == folder_bytes(tmp_path / "once")
    manifest = json.loads((tmp_path / "twice/manifest.json").read_text())
    assert len(manifest["attempts"]) == 2
    # A finished stage reports without redoing; other settings are refused.
    run_stage(stage(), tmp_path / "twice", source, show_progress=False)
    with pytest.raises(RunFolderError, match="other settings"):
        run_stage(TextFilter(TextFilterConfig(min_terms=2)) if "text" in make().name else
                  ImageFilter(ImageFilterConfig(min_width=10)), tmp_path / "twice", source, show_progress=False)


def test_sigkill_then_resume_via_cli(tmp_path):
    """A real kill -9 of `medvl-engine build-data filter-image` in the middle, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [(f"k{i}", ROWS[0][1], [(f"k{i}.png", 340 + i, 340)], "keep", "keep", "keep") for i in range(24)]
    source = write_source(tmp_path / "src", rows, bad_rows=False)
    # A slow classifier (50 ms an image) keeps the run going long enough to be killed in the middle.
    spec = write_classifier(tmp_path, "import time\ndef classify(images):\n    time.sleep(0.05 * len(images))\n"
                                      "    return [im.width % 3 != 0 for im in images]\n")

    def command(out):
        return [sys.executable, "-m", "medvl_engine.cli", "build-data", "filter-image", "--input.source", str(source),
                "--output", str(out), "--image.classifier", spec, "--image.classifier-batch", "2",
                "--checkpoint-rows", "2", "--no-progress"]

    subprocess.run(command(tmp_path / "once"), check=True, capture_output=True)
    process = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed/state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["rows_done"] >= 6:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not json.loads(state.read_text())["complete"]
    subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True)
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "once")
    assert len(read_jsonl(tmp_path / "once/kept.jsonl")) == 16
