"""build-data reformat: reply validation, attempts with new seeds, outputs SFT and LLaVA read, resume; and end
to end with the hf backend and a tiny random Qwen2.5-VL.

The replies of the first tests are scripted by `ScriptedBackend` (tests/rollout/scripted_backend.py), a
test double of the Backend interface: a random tiny model cannot be made to write a chosen JSON reply.
The pool, the prompts, the validation and the files are the real ones.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from databuild_helpers import read_jsonl

from medvl_engine.databuild.config import BuildDataConfig, InputConfig
from medvl_engine.databuild.reformat import InvalidReply, Reformatter, derive_attempt_seed, parse_reply
from medvl_engine.databuild.reformat_prompts import MULTI_IMAGE_QUESTIONS, SCENARIOS, SINGLE_IMAGE_QUESTIONS


def scripted_backend_class():
    if "scripted_backend" not in sys.modules:
        spec = importlib.util.spec_from_file_location("scripted_backend",
                                                      Path(__file__).parents[1] / "rollout/scripted_backend.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["scripted_backend"] = module  # before running it: its dataclasses look themselves up
        spec.loader.exec_module(module)
    return sys.modules["scripted_backend"].ScriptedBackend


def valid(row_id: str, attempt: int) -> str:
    return json.dumps({"Image_description": f"description of {row_id}", "QA-query": f"question about {row_id}?",
                       "QA-answer": f"answer for {row_id} (attempt {attempt})"})


# row id -> the reply of each attempt (1, 2, 3)
SCRIPT = {
    "r0": ["```json\n" + valid("r0", 1) + "\n```"],  # a code fence is tolerated
    "r2": ["Sure! I cannot produce JSON today.", valid("r2", 2)],
    "r3": ['{"Image_description": "x", "QA-query": "y", "QA-answer": "z", "Extra": "no"}',
           '{"Image_description": "", "QA-query": "y", "QA-answer": "z"}', "Here it is: " + valid("r3", 3) + " Done."],
    "r8": ['{"Description": "x", "Question": "y", "Answer": "z"}'] * 3,  # wrong keys every time
    "r9": ['{"Image_description": 3, "QA-query": "y", "QA-answer": "z"}', valid("r9", 2)],
}


def scripted_answer(request, k):
    job = request.sample
    replies = SCRIPT.get(job.record.id, [valid(job.record.id, job.attempt)])
    return replies[min(job.attempt, len(replies)) - 1]


@pytest.fixture(scope="module")
def renderer():
    from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer

    return image_only_qwen2_5_vl_processor(qwen_tokenizer())


def config(source: Path, output: Path) -> BuildDataConfig:
    from dataclasses import replace

    from medvl_engine.databuild.config import ReformatConfig, reformat_rollout

    return BuildDataConfig(stage="reformat", output=str(output), input=InputConfig(source=str(source)),
                           reformat=ReformatConfig(model="scripted", max_attempts=3),
                           rollout=replace(reformat_rollout(), max_in_flight=3), checkpoint_rows=2, progress=False)


def test_parse_reply_kinds():
    reply = parse_reply('  {"Image_description": " d ", "QA-query": "q", "QA-answer": "a"}\n')
    assert (reply.image_description, reply.qa_query, reply.qa_answer) == ("d", "q", "a")
    cases = {"no json here": "not JSON", '{"Image_description": "d", "QA-query": "q"': "not JSON",
             '{"Image_description": "d", "QA-query": "q"}': "wrong keys",
             '{"Image_description": "d", "QA-query": "q", "QA-answer": "a", "More": 1}': "wrong keys",
             '{"Image_description": "d", "QA-query": ["q"], "QA-answer": "a"}': "wrong value type",
             '{"Image_description": "d", "QA-query": "  ", "QA-answer": "a"}': "empty field"}
    for text, kind in cases.items():
        with pytest.raises(InvalidReply) as info:
            parse_reply(text)
        assert info.value.kind == kind, text


def run_reformat(source, output, renderer, *, crash_after_commits=None):
    backend = scripted_backend_class()("scripted", answer=scripted_answer)
    reformatter = Reformatter(config(source, output), output, InputConfig(source=str(source)), backends=[backend],
                              renderer=renderer)
    if crash_after_commits:
        commit, seen = reformatter._commit, [0]

        def crashing(wave, outcome):
            seen[0] += 1
            if seen[0] > crash_after_commits:
                raise KeyboardInterrupt("simulated crash")
            commit(wave, outcome)

        reformatter._commit = crashing
    return reformatter(), backend


def test_reformat_row_by_row(caption_source, tmp_path, renderer):
    from medvl_engine.data import load_samples

    out = tmp_path / "out"
    summary, backend = run_reformat(caption_source, out, renderer)
    # Rows with unreadable images never reach the model; r8 fails all three attempts.
    failed = {f["id"]: f for f in read_jsonl(out / "failed.jsonl")}
    assert {k: f["reason"] for k, f in failed.items()} == {
        "no-caption": "bad row", "row-8": "bad row", "r4": "truncated image", "r5": "missing image file",
        "r6": "undecodable image", "r8": "invalid reply"}
    assert failed["r8"]["attempts"] == 3 and len(failed["r8"]["errors"]) == 3
    assert all("wrong keys" in e and "Description" in e for e in failed["r8"]["errors"])
    assert summary["kept"] == 8 and summary["records"] == 16
    assert summary["kept_at_attempt"] == {"1": 5, "2": 2, "3": 1}
    assert summary["invalid_replies"] == {"empty field": 1, "not JSON": 1, "wrong keys": 4, "wrong value type": 1}
    # Every attempt of a row had its own seed, the same a rerun derives.
    seeds = {}
    for call in backend.calls:
        row, attempt = call.prompt_id.split("#")
        seeds.setdefault(row, []).append(int(attempt))
    assert seeds["r3@3"] == [1, 2, 3] and seeds["r0@0"] == [1]
    records = read_jsonl(out / "sft.jsonl")
    assert [r["source_id"] for r in records[::2]] == ["r0", "r1", "r2", "r3", "r7", "r9", "r10", "r11"]
    by_kind = {(r["source_id"], r["kind"]): r for r in records}
    alignment, instruction = by_kind[("r2", "alignment")], by_kind[("r2", "instruction")]
    assert alignment["answer"] == "description of r2" and alignment["question"] in SINGLE_IMAGE_QUESTIONS
    assert instruction["question"] == "question about r2?" and instruction["answer"] == "answer for r2 (attempt 2)"
    assert instruction["scenario"] in {s.name for s in SCENARIOS}
    assert by_kind[("r3", "instruction")]["answer"] == "answer for r3 (attempt 3)"
    r9 = by_kind[("r9", "alignment")]
    assert r9["question"] in MULTI_IMAGE_QUESTIONS and len(r9["images"]) == 2
    assert r9["conversations"][0]["value"].startswith("<image>\n<image>\n")
    # What the engine's loaders read: the Sample layout, images included.
    samples = load_samples(out / "sft.jsonl")
    assert len(samples) == 16 and len(samples[0].images) == 1 and samples[1].question == "question about r0?"
    assert samples[1].options == {"A": "answer for r0 (attempt 1)"} and samples[1].answer_label == "A"
    llava = json.loads((out / "llava.json").read_text())
    assert len(llava) == 16 and llava[0]["id"] == "r0-alignment"
    assert llava[1]["conversations"] == [{"from": "human", "value": "<image>\nquestion about r0?"},
                                         {"from": "gpt", "value": "answer for r0 (attempt 1)"}]
    assert "invalid replies" in (out / "summary.md").read_text()
    assert derive_attempt_seed(42, 1, 0) != derive_attempt_seed(42, 2, 0)

    # `medvl-engine sft --target answer` trains on these rows: the question and its images as the prompt
    # (no multiple-choice instruction, no options), the answer text as the only loss-carrying tokens.
    from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer

    from medvl_engine.trainers.sft import encode_example

    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    example = encode_example(tokenizer, samples[1], max_tokens=4096, processor=processor, target="answer")
    prompt = tokenizer.decode(example.ids[: example.loss_start])
    assert tokenizer.decode(example.ids[example.loss_start :]) == "answer for r0 (attempt 1)<|im_end|>"
    assert "question about r0?" in prompt and "Options:" not in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert example.ids.count(processor.image_token_id) > 1 and example.vision["image_grid_thw"].shape[0] == 1


@pytest.mark.parametrize("crash_after", [3, 15])  # in the first wave (14 rows); in the second
def test_reformat_resume_equals_uninterrupted(caption_source, tmp_path, renderer, crash_after):
    run_reformat(caption_source, tmp_path / "once", renderer)
    with pytest.raises(KeyboardInterrupt):
        run_reformat(caption_source, tmp_path / "twice", renderer, crash_after_commits=crash_after)
    with (tmp_path / "twice/replies-1.jsonl").open("ab") as f:
        f.write(b'{"position": 99, "torn')
    summary, backend = run_reformat(caption_source, tmp_path / "twice", renderer)
    for name in ("sft.jsonl", "llava.json", "failed.jsonl", "summary.json"):
        assert (tmp_path / "twice" / name).read_bytes() == (tmp_path / "once" / name).read_bytes(), name
    assert len(backend.calls) < 14  # the resumed run asked only what the checkpoint did not hold


@pytest.fixture(scope="module")
def tiny_vl_folder(tmp_path_factory) -> Path:
    from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer, tiny_qwen2_5_vl

    folder = tmp_path_factory.mktemp("tiny-vl")
    tokenizer = qwen_tokenizer()
    tiny_qwen2_5_vl(tokenizer).save_pretrained(folder)
    image_only_qwen2_5_vl_processor(tokenizer).save_pretrained(folder)
    return folder


def test_reformat_end_to_end_hf_backend_tiny_qwen2_5_vl(caption_source, tmp_path, tiny_vl_folder):
    """The real path: the command, the hf backend, a tiny random Qwen2.5-VL. Its replies are noise, so every
    row is reported after its attempts, each with the reason and the start of the reply."""
    from medvl_engine.cli import main

    out = tmp_path / "out"
    assert main(["build-data", "reformat", "--input.source", str(caption_source), "--input.max-rows", "4",
                 "--output", str(out), "--reformat.model", str(tiny_vl_folder), "--reformat.max-attempts", "2",
                 "--rollout.max-response-tokens", "12", "--rollout.device", "cpu", "--no-progress"]) == 0
    failed = {f["id"]: f for f in read_jsonl(out / "failed.jsonl")}
    assert set(failed) == {"r0", "r1", "r2", "r3"}
    for row in failed.values():
        assert row["reason"] == "invalid reply" and row["attempts"] == 2 and len(row["errors"]) == 2
        assert row["errors"][0].startswith("attempt 1: not JSON") and "(reply: " in row["errors"][0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 0 and summary["invalid_replies"] == {"not JSON": 8}
    assert (out / "sft.jsonl").read_bytes() == b"" and json.loads((out / "llava.json").read_text()) == []


def test_build_data_all_with_one_config(caption_source, tmp_path, tiny_vl_folder):
    """`build-data all --config FILE`: every stage in order, each reading the previous one's kept rows."""
    import yaml
    from tiny_models import save_tiny_llama

    from medvl_engine.cli import main

    encoder = save_tiny_llama(tmp_path / "encoder")  # any text model folder embeds, mean-pooled
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "run"), "progress": False, "input": {"source": str(caption_source)},
        "dedup": {"model": str(encoder), "threshold": 0.99999, "device": "cpu"},
        "reformat": {"model": str(tiny_vl_folder), "max_attempts": 1},
        "rollout": {"max_response_tokens": 8, "device": "cpu"}}))
    assert main(["build-data", "all", "--config", str(config)]) == 0
    run = tmp_path / "run"
    kept = {stage: [r["id"] for r in read_jsonl(run / stage / "kept.jsonl")]
            for stage in ("filter-text", "filter-image", "dedup")}
    assert kept["filter-image"] == ["r0", "r2", "r7", "r8", "r9", "r11"]
    assert "r7" not in kept["dedup"] and "r0" in kept["dedup"]  # r7 repeats r0's caption exactly
    failed = read_jsonl(run / "reformat/failed.jsonl")
    assert [f["id"] for f in failed] == kept["dedup"]  # the tiny model's replies are noise
    manifest = json.loads((run / "reformat/manifest.json").read_text())
    assert manifest["identity"]["input"]["source"] == str(run / "dedup/kept.jsonl")
    before = (run / "reformat/summary.json").read_bytes()
    assert main(["build-data", "all", "--config", str(config)]) == 0  # finished stages only report
    assert (run / "reformat/summary.json").read_bytes() == before
