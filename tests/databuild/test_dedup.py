"""build-data dedup: the exact greedy rule against a brute-force reference, the stage row by row, resume,
and the default SmolLM2 encoder on real-looking captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from databuild_helpers import MEDICAL, NEAR_DUPLICATE, OTHER, ROWS, read_jsonl

from medvl_engine.databuild.config import DedupConfig, InputConfig
from medvl_engine.databuild.dedup import DedupFilter, Deduplicator
from medvl_engine.databuild.stage import run_stage


def brute_force(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """The rule in its plainest form: row i is kept when no earlier kept row is more similar than threshold."""
    kept: list[int] = []
    for i, v in enumerate(vectors):
        if not kept or (vectors[kept] @ v).max() <= threshold:
            kept.append(i)
    out = np.zeros(len(vectors), dtype=bool)
    out[kept] = True
    return out


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors in tight clusters (duplicates) and loose ones, in random order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 4, dim))
    spread = rng.choice([0.05, 0.5], size=(n, 1))
    x = centres[rng.integers(len(centres), size=n)] + rng.standard_normal((n, dim)) * spread
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("batch,block_rows", [(1, 4), (7, 5), (64, 16), (200, 1024)])
def test_deduplicator_equals_brute_force(batch, block_rows):
    vectors = clustered(200, 24, seed=batch)
    dedup = Deduplicator(24, 0.9, block_rows=block_rows)
    keep = np.concatenate([dedup.add(vectors[i:i + batch])[0] for i in range(0, len(vectors), batch)])
    expected = brute_force(vectors, 0.9)
    assert 20 < expected.sum() < 190  # both kinds of rows occur
    np.testing.assert_array_equal(keep, expected)
    assert dedup.count == expected.sum()


def test_deduplicator_reports_the_row_it_duplicates():
    a, b = np.eye(3, dtype=np.float32)[:2]
    dedup = Deduplicator(3, 0.99, block_rows=2)
    keep, sims, match = dedup.add(np.stack([a, b, a]))  # the third duplicates the first, inside one batch
    assert keep.tolist() == [True, True, False] and match[2] == 0 and sims[2] == pytest.approx(1.0)
    keep, sims, match = dedup.add(np.stack([b]))
    assert keep.tolist() == [False] and match[0] == 1
    with pytest.raises(ValueError, match="expected"):
        dedup.add(np.zeros((2, 4), dtype=np.float32))


def test_dedup_stage_row_by_row(caption_source, tmp_path, words_encoder):
    rows = InputConfig(source=str(caption_source))
    summary = run_stage(DedupFilter(DedupConfig(threshold=0.9), encoder=words_encoder), tmp_path / "out", rows,
                        show_progress=False)
    kept = [k["id"] for k in read_jsonl(tmp_path / "out/kept.jsonl")]
    dropped = {d["id"]: d for d in read_jsonl(tmp_path / "out/dropped.jsonl")}
    # The source's duplicates: r7 repeats r0 exactly, r8 changes one word; the MRI, chest and
    # histology captions recur in rows whose images other stages drop, so here they go too.
    assert kept == ["r0", "r1", "r2", "r3", "r4"]
    assert dropped["r7"]["detail"] == 'similarity 1.0000 to kept row "r0"'
    assert dropped["r8"]["reason"] == "near-duplicate caption" and '"r0"' in dropped["r8"]["detail"]
    assert dropped["r5"]["detail"].endswith('"r3"') and dropped["r6"]["detail"].endswith('"r2"')
    assert summary["kept_embeddings"] == 5 and summary["peak_rss_bytes"] > 0
    assert (tmp_path / "out/embeddings.f32").stat().st_size == 5 * words_encoder.dim * 4


def test_dedup_resume_reloads_its_index(caption_source, tmp_path, words_encoder):
    rows = InputConfig(source=str(caption_source))

    def stage(crash_on=None):
        s = DedupFilter(DedupConfig(threshold=0.9, batch_size=3), encoder=words_encoder)
        if crash_on:
            decide, calls = s.decide, [0]

            def crashing(records):
                calls[0] += 1
                if calls[0] == crash_on:
                    raise KeyboardInterrupt("simulated crash")
                return decide(records)

            s.decide = crashing
        return s

    run_stage(stage(), tmp_path / "once", rows, checkpoint_rows=3, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage(crash_on=4), tmp_path / "twice", rows, checkpoint_rows=3, show_progress=False)
    assert json.loads((tmp_path / "twice/state.json").read_text())["rows_done"] == 9
    # The rows after the crash duplicate rows kept before it: only the reloaded index can drop them.
    run_stage(stage(), tmp_path / "twice", rows, checkpoint_rows=3, show_progress=False)
    for name in ("kept.jsonl", "dropped.jsonl", "embeddings.f32"):
        assert (tmp_path / "twice" / name).read_bytes() == (tmp_path / "once" / name).read_bytes(), name
    once, twice = (json.loads((tmp_path / f / "summary.json").read_text()) for f in ("once", "twice"))
    once.pop("peak_rss_bytes"), twice.pop("peak_rss_bytes")
    assert once == twice


def test_default_encoder_smollm2(tmp_path):
    """The offline default (SmolLM2 mean-pooled through sentence-transformers' modules) at its default threshold."""
    source = tmp_path / "captions.jsonl"
    captions = [MEDICAL, OTHER, MEDICAL, NEAR_DUPLICATE, ROWS[3][1], ROWS[4][1]]
    source.write_text("".join(json.dumps({"id": f"c{i}", "caption": c, "image": "x.png"}) + "\n"
                              for i, c in enumerate(captions)))
    summary = run_stage(DedupFilter(DedupConfig(device="cpu")), tmp_path / "out", InputConfig(source=str(source)),
                        show_progress=False)
    assert [k["id"] for k in read_jsonl(tmp_path / "out/kept.jsonl")] == ["c0", "c1", "c4", "c5"]
    assert summary["dim"] == 576
