"""Run folders of `eval` and `passrate` never lose data: `--overwrite` removes only an earlier run of the
same command, only once the model and data have been checked, and never a folder holding an input; a
resumed hf run refuses another `--rollout.max-batch`. Every refusal here happens before a model loads."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.evals.evaluate import VOLATILE, EvalConfig, eval_data, evaluate, sections
from medvl_engine.evals.manifest import open_run
from medvl_engine.evals.passrate import PassrateConfig, estimate, passrate_data


def _eval_cfg(model, output, **kwargs) -> EvalConfig:
    data = replace(eval_data(), source="bundled", ignore_images=True, max_samples=2)
    return EvalConfig(model=str(model), output=str(output), data=data, **kwargs)


def _passrate_cfg(model, output, **kwargs) -> PassrateConfig:
    data = replace(passrate_data(), source="bundled", ignore_images=True, max_samples=2)
    return PassrateConfig(model=str(model), output=str(output), data=data, **kwargs)


@pytest.fixture()
def model_dir(tmp_path):
    """A folder standing for a model: the checks before a run only need it to exist."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def _earlier_run(folder, command: str = "eval"):
    """A finished run of `command` in `folder`: its manifest and one results file."""
    open_run(folder, command, {"run": {"model": "old"}})
    (folder / "v0").mkdir()
    (folder / "v0" / "results.jsonl").write_text('{"dataset_index": 0}\n')
    return folder


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_with_a_missing_model_keeps_the_earlier_run(tmp_path):
    run = _earlier_run(tmp_path / "run")
    before = _tree(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(_eval_cfg(tmp_path / "typo", run, overwrite=True))
    assert _tree(run) == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        estimate(_passrate_cfg(tmp_path / "typo", tmp_path / "run", overwrite=True))
    assert _tree(run) == before


def test_overwrite_with_a_missing_source_keeps_the_earlier_run(tmp_path, model_dir):
    run = _earlier_run(tmp_path / "run")
    before = _tree(run)
    cfg = _eval_cfg(model_dir, run, overwrite=True)
    cfg.data = replace(cfg.data, source=str(tmp_path / "typo.jsonl"))
    with pytest.raises(Exception, match="typo.jsonl"):
        evaluate(cfg)
    assert _tree(run) == before


def test_overwrite_refuses_a_folder_medvl_engine_did_not_write(tmp_path, model_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of notes")
    with pytest.raises(RunFolderError, match=r"no manifest.json, so medvl-engine did not write it"):
        evaluate(_eval_cfg(model_dir, mine, overwrite=True))
    assert (mine / "notes.txt").read_text() == "a week of notes"
    with pytest.raises(RunFolderError, match=r"no manifest.json"):
        estimate(_passrate_cfg(model_dir, mine, overwrite=True))
    assert (mine / "notes.txt").read_text() == "a week of notes"


def test_overwrite_refuses_another_commands_run(tmp_path, model_dir):
    run = _earlier_run(tmp_path / "passrate-run", "passrate")
    before = _tree(run)
    with pytest.raises(RunFolderError, match=r"holds a 'passrate' run, not 'eval'"):
        evaluate(_eval_cfg(model_dir, run, overwrite=True))
    assert _tree(run) == before


@pytest.mark.parametrize("where", ["is", "holds", "lies inside"])
def test_an_output_folder_that_is_an_input_is_refused(tmp_path, model_dir, where):
    before = _tree(model_dir)
    output = {"is": model_dir, "holds": model_dir.parent, "lies inside": model_dir / "eval"}[where]
    with pytest.raises(ConfigError, match=rf"--output .* {where} the input {model_dir}"):
        evaluate(_eval_cfg(model_dir, output, overwrite=True))
    assert _tree(model_dir) == before and not (model_dir / "eval").exists()
    with pytest.raises(ConfigError, match=rf"{where} the input"):
        estimate(_passrate_cfg(model_dir, output, overwrite=True))
    assert _tree(model_dir) == before


def test_overwrite_replaces_an_earlier_run_of_the_same_command(tmp_path):
    run = _earlier_run(tmp_path / "run")
    open_run(run, "eval", {"run": {"model": "new"}}, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"] == {"run": {"model": "new"}} and len(manifest["attempts"]) == 1


def test_a_resumed_hf_run_refuses_another_max_batch(tmp_path, model_dir):
    out = tmp_path / "run"
    cfg = _eval_cfg(model_dir, out)
    cfg.rollout = replace(cfg.rollout, max_batch=16)
    open_run(out, "eval", sections(cfg), volatile=VOLATILE)  # an earlier attempt that answered a question
    (out / "v0").mkdir()
    (out / "v0" / "results.jsonl").write_text('{"dataset_index": 0}\n')
    # hf pads a batch's prompts together: greedy answers depend on which questions share a generate call.
    cfg.rollout = replace(cfg.rollout, max_batch=4)
    with pytest.raises(RunFolderError, match=r"rollout.max_batch: 16 in the folder, 4 now"):
        evaluate(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["settings"]["rollout"]["max_batch"] for a in manifest["attempts"]] == [16]


def test_max_batch_is_volatile_for_backends_that_do_not_read_it(tmp_path):
    from medvl_engine.evals.evaluate import volatile_settings

    cfg = _eval_cfg("model", tmp_path / "run")
    cfg.rollout = replace(cfg.rollout, backend="vllm")
    assert "rollout.max_batch" in volatile_settings(cfg, VOLATILE)
    cfg.rollout = replace(cfg.rollout, backend="hf")
    assert "rollout.max_batch" not in volatile_settings(cfg, VOLATILE)


def test_a_folder_written_when_max_batch_was_volatile_resumes_with_the_same_value(tmp_path):
    """Folders from before max_batch counted: the identity lacks it, the last attempt's settings hold it."""
    from medvl_engine.evals.evaluate import volatile_settings

    out = tmp_path / "run"
    cfg = _eval_cfg("model", out)
    cfg.rollout = replace(cfg.rollout, max_batch=8)
    open_run(out, "eval", sections(cfg), volatile=(*VOLATILE, "rollout.max_batch"))
    (out / "v0").mkdir()
    (out / "v0" / "results.jsonl").write_text('{"dataset_index": 0}\n')  # it answered before
    assert "max_batch" not in json.loads((out / "manifest.json").read_text())["identity"]["rollout"]
    manifest = open_run(out, "eval", sections(cfg), volatile=volatile_settings(cfg, VOLATILE))
    assert manifest["identity"]["rollout"]["max_batch"] == 8  # recorded from now on
    cfg.rollout = replace(cfg.rollout, max_batch=2)
    with pytest.raises(RunFolderError, match=r"rollout.max_batch: 8 in the folder, 2 now"):
        open_run(out, "eval", sections(cfg), volatile=volatile_settings(cfg, VOLATILE))


def test_an_attempt_that_stopped_before_its_first_answer_does_not_block_the_corrected_command(tmp_path):
    """A wrong flag fails after the manifest is written (e.g. images for a text-only model): the corrected
    command starts the run afresh instead of being refused as a run with other settings."""
    run = tmp_path / "run"
    open_run(run, "eval", {"data": {"ignore_images": False}})
    (run / "v0").mkdir()
    (run / "v0" / "results.jsonl").write_text("")  # opened, nothing answered
    manifest = open_run(run, "eval", {"data": {"ignore_images": True}})
    assert manifest["identity"] == {"data": {"ignore_images": True}} and len(manifest["attempts"]) == 1
    (run / "v0" / "results.jsonl").write_text('{"dataset_index": 0}\n')  # now it holds an answer
    with pytest.raises(RunFolderError, match=r"data.ignore_images: True in the folder, False now"):
        open_run(run, "eval", {"data": {"ignore_images": False}})
