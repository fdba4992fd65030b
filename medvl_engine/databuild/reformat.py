"""`build-data reformat`: an image-text model sees each row's images and context and writes a description,
a question and an answer (PubMedVision's "unblinded" reformatting, section 3.2), through the RolloutPool.

Per row: one of the ten QA scenarios and one alignment question are drawn with a generator seeded by
(reformat.seed, row); the prompt is Figure 4's (`reformat_prompts`), rendered with the model's chat
template, images first. The reply must be one JSON object with exactly `Image_description`,
`QA-query` and `QA-answer`, each a non-empty string (`Reply`, checked by msgspec; a markdown code
fence or text around the object is tolerated). It becomes two records: an Alignment VQA (the
alignment question, answered by the description) and an Instruction-Tuning VQA (the generated
question and answer).

Attempts: attempt a of every row that needs one runs in wave a, each wave one pool stream over its
rows (wave 1: the input; wave a+1: the rows whose reply in wave a was invalid, from `retry-{a+1}.jsonl`).
Attempt a of row p samples with `derive_seed(derive_seed(rollout.seed, a), p)`: a new seed each time,
the same one on a resumed run. After `reformat.max_attempts` invalid replies a row is reported in
`failed.jsonl` with every attempt's reason and the start of each reply, as are rows whose images cannot
be read and prompts the pool gave up on (its own retries and timeouts are `rollout.retries` and
`rollout.timeout_s`).

Order and resume: the pool finishes rows out of order; outcomes wait in a reorder buffer and are
written in row order, and the pool's window (`set_window`) starts no row more than a few batches
ahead of the first unwritten one, so the buffer stays small whatever the input's length. The stage
checkpoints like the filters (`StageRun`). When every wave is done the valid replies are merged in
row order into

    sft.jsonl     two records per row in the engine's Sample layout (`load_samples` reads it): question,
                  one option "A" holding the answer, answer_label "A", the images; plus `conversations`
                  (human/gpt turns) and `kind`, `source_id`, `scenario`
    llava.json    the same records as LLaVA-style JSON: id, image (list of paths), conversations with one
                  `<image>` line per image before the question
"""

from __future__ import annotations

import heapq
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from medvl_engine.databuild.checkpoint import StageRun, reasons_table
from medvl_engine.databuild.records import BadRow, CaptionRecord, count_rows, encode_line, read_records
from medvl_engine.databuild.reformat_prompts import SCENARIOS, alignment_questions, reformat_prompt
from medvl_engine.databuild.stage import drop, input_identity
from medvl_engine.errors import ConfigError
from medvl_engine.progress import Progress
from medvl_engine.rollout.pool import run_to_end

FAILED = "failed.jsonl"
SFT, LLAVA = "sft.jsonl", "llava.json"
REPLY_HEAD = 300  # characters of an invalid reply kept in the report
# Rollout settings that change speed only, not the replies: left out of the run's identity.
VOLATILE_ROLLOUT = ("device", "max_batch", "max_in_flight", "threads", "timeout_s", "retries")


class Reply(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON reply of Figure 4, exactly these three keys."""

    image_description: str = msgspec.field(name="Image_description")
    qa_query: str = msgspec.field(name="QA-query")
    qa_answer: str = msgspec.field(name="QA-answer")


class InvalidReply(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)
_reply_decoder = msgspec.json.Decoder(Reply)
_reply_encoder = msgspec.json.Encoder()


def parse_reply(text: str) -> Reply:
    """The reply's JSON object as a `Reply`, or `InvalidReply` saying why not (`kind`: not JSON, wrong keys,
    wrong value type, empty field)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise InvalidReply("not JSON", "no JSON object in the reply")
    try:
        reply = _reply_decoder.decode(body[start:end + 1])
    except msgspec.ValidationError as exc:
        message = str(exc)
        kind = "wrong keys" if "required field" in message or "unknown field" in message else "wrong value type"
        raise InvalidReply(kind, message) from None
    except msgspec.DecodeError as exc:
        raise InvalidReply("not JSON", str(exc)) from None
    values = {f: getattr(reply, f).strip() for f in reply.__struct_fields__}
    empty = [reply.__struct_encode_fields__[i] for i, f in enumerate(reply.__struct_fields__) if not values[f]]
    if empty:
        raise InvalidReply("empty field", f"{', '.join(empty)} empty")
    return Reply(**values)


def score_replies(texts, samples):
    """The pool's score for this task: reward 1 for a valid reply; `parsed` holds the reply as canonical
    JSON, or `kind: detail` of an invalid one (the pool scores every reply once, here)."""
    from medvl_engine.rewards import ScoreResult

    ok, parsed = [], []
    for text in texts:
        try:
            parsed.append(_reply_encoder.encode(parse_reply(text)).decode())
            ok.append(True)
        except InvalidReply as exc:
            parsed.append(str(exc))
            ok.append(False)
    valid = np.array(ok, dtype=bool)
    return ScoreResult(reward=valid.astype(np.float32), correct=valid, format_ok=valid.copy(), parsed=parsed,
                       letter=[""] * len(texts))


@dataclass
class Job:
    """What a request carries for its row (the pool passes it to the score as the request's `sample`)."""

    position: int  # the row in the stage's input
    record: CaptionRecord
    attempt: int
    errors: list[str]
    scenario: int
    question: int
    seed: int
    dataset_name: str = "reformat"

    @property
    def dataset_index(self) -> int:
        return self.position


@dataclass
class Outcome:
    """A row's result in one wave: a reply, or why there is none."""

    job: Job | None
    position: int
    record: CaptionRecord | BadRow
    reply: dict | None = None
    reason: str = ""  # set when the row failed (invalid reply or no generation)
    detail: str = ""
    errors: list[str] = field(default_factory=list)


def derive_attempt_seed(seed: int, attempt: int, position: int) -> int:
    from medvl_engine.rollout.types import derive_seed

    return derive_seed(derive_seed(seed, attempt), position)


class Reformatter:
    """The reformat stage over one run folder (see the module docstring)."""

    def __init__(self, cfg, folder: Path, input_cfg, *, backends=None, renderer=None):
        self.cfg = cfg
        self.folder = Path(folder)
        self.input_cfg = input_cfg
        self.backends = backends
        self.renderer = renderer
        self.attempts = cfg.reformat.max_attempts
        self.files = (*(f"replies-{a}.jsonl" for a in range(1, self.attempts + 1)),
                      *(f"retry-{a}.jsonl" for a in range(2, self.attempts + 1)), FAILED)
        self.run = StageRun(self.folder, "reformat", identity=self.identity(), files=self.files,
                            checkpoint_rows=cfg.checkpoint_rows, overwrite=cfg.overwrite)
        self.counters: dict = {}

    def identity(self) -> dict:
        from medvl_engine.config import to_dict

        rollout = {k: v for k, v in to_dict(self.cfg.rollout).items() if k not in VOLATILE_ROLLOUT}
        model = self.cfg.reformat.model
        if Path(model).exists():
            model = str(Path(model).absolute())
        return {"input": input_identity(self.input_cfg), "reformat": {**to_dict(self.cfg.reformat), "model": model},
                "rollout": rollout}

    # -- the stage ----------------------------------------------------------------------------------

    def __call__(self) -> dict:
        state = self.run.open()
        if state.complete:
            self.run.close()
            return json.loads((self.folder / "summary.json").read_text())
        self.counters = state.counters or {"kept": 0, "dropped": {}, "invalid_replies": {}, "kept_at_attempt": {}}
        try:
            wave = state.extra.get("wave", 1)
            if wave <= self.attempts:
                wave = run_to_end(self._generate(wave, state.rows_done))
            records = self._merge()
            summary, text = self._summary(records)
            self.run.finish(0, self.counters, summary, text, {"wave": wave})
        finally:
            self.run.close()
        return summary

    async def _generate(self, wave: int, rows_done: int) -> int:
        """Waves `wave`.. in turn (the first resumed at `rows_done`); returns the wave after the last."""
        owned = self.backends is None
        if owned:
            self.backends, self.renderer = self._build_backends()
        try:
            while wave <= self.attempts:
                await self._wave(wave, rows_done)
                wave, rows_done = wave + 1, 0
                self.run.checkpoint(0, self.counters, {"wave": wave})
        finally:
            if owned:
                await _shutdown(self.backends)
                self.backends = None
        return wave

    def _build_backends(self):
        from medvl_engine.rollout.config import open_rollout

        backend, renderer, _ = open_rollout(self.cfg.rollout, self.cfg.reformat.model)
        if not hasattr(renderer, "image_processor"):
            raise ConfigError(f"reformat.model {self.cfg.reformat.model}: not an image-text model (its processor has "
                              "no image processor); reformat shows the model the images")
        return [backend], renderer

    # -- one wave -----------------------------------------------------------------------------------

    def _items(self, wave: int, start: int) -> Iterator[tuple[int, int, CaptionRecord | BadRow, list[str]]]:
        """(k, row, record, earlier errors) of wave `wave` from its k-th row on."""
        if wave == 1:
            for position, record in read_records(self.input_cfg, images_dir=self.folder / "images", start=start):
                yield position, position, record, []
            return
        with (self.folder / f"retry-{wave}.jsonl").open("rb") as f:
            for k, line in enumerate(f):
                if k >= start:
                    item = json.loads(line)
                    yield k, item["position"], msgspec.convert(item["record"], CaptionRecord), item["errors"]

    def _wave_rows(self, wave: int) -> int | None:
        if wave == 1:
            return count_rows(self.input_cfg)
        with (self.folder / f"retry-{wave}.jsonl").open("rb") as f:
            return sum(1 for _ in f)

    async def _wave(self, wave: int, start: int) -> None:
        from medvl_engine.rollout.groups import FailedPrompt
        from medvl_engine.rollout.pool import RolloutPool

        total = self._wave_rows(wave)
        if total == 0:
            return
        rollout = self.cfg.rollout
        pending: dict[int, Outcome] = {}
        cursor = [start]
        # Rows started ahead of the first unwritten one: enough to keep every backend's slots full.
        window = 2 * rollout.max_in_flight * len(self.backends)
        pool_holder: list = []

        def drain():
            while cursor[0] in pending:
                self._commit(wave, pending.pop(cursor[0]))
                cursor[0] += 1
                bar.update(1)
                if self.run.due(cursor[0]):
                    self.run.checkpoint(cursor[0], self.counters, {"wave": wave})
            if pool_holder:
                pool_holder[0].set_window(cursor[0] + window)

        def requests():
            for k, position, record, errors in self._items(wave, start):
                prepared = self._prepare(k, position, record, errors, wave)
                if isinstance(prepared, Outcome):
                    pending[k] = prepared
                    drain()
                else:
                    yield prepared

        with Progress(total, f"reformat (attempt {wave})", unit="row", initial=start, enabled=self.cfg.progress) as bar:
            pool = RolloutPool.from_config(self.backends, requests(), rollout, logprobs=False, score=score_replies)
            pool_holder.append(pool)
            pool.set_window(cursor[0] + window)
            async for item in pool.stream():
                job = item.request.sample
                if isinstance(item, FailedPrompt):
                    pending[item.request.position] = Outcome(job, job.position, job.record, reason="generation failed",
                                                             detail=item.reason, errors=[*job.errors, *item.errors])
                elif item.rewards[0] > 0:
                    pending[item.request.position] = Outcome(job, job.position, job.record,
                                                             reply=json.loads(item.parsed[0]))
                else:
                    head = item.completions[0].text[:REPLY_HEAD]
                    error = f"attempt {wave}: {item.parsed[0]} (reply: {head!r})"
                    pending[item.request.position] = Outcome(job, job.position, job.record, reason="invalid reply",
                                                             detail=item.parsed[0], errors=[*job.errors, error])
                drain()
            drain()
        if pending:
            raise RuntimeError(f"reformat wave {wave}: rows {sorted(pending)[:5]} were never written")
        self.run.checkpoint(cursor[0], self.counters, {"wave": wave})

    def _prepare(self, k: int, position: int, record, errors: list[str], wave: int):
        """The row's request, or its Outcome when it cannot be asked (bad row, unreadable image, long prompt)."""
        from medvl_engine.databuild.filter_image import check_image
        from medvl_engine.rollout.types import PromptRequest

        if isinstance(record, BadRow):
            return Outcome(None, position, record, reason=record.reason, detail=record.detail)
        if not record.images:
            return Outcome(None, position, record, reason="no images", detail="the row has no image")
        images = []
        for path in record.images:
            check = check_image(path, 1, 1, keep_image=True)
            if not check.ok:
                return Outcome(None, position, record, reason=check.reason, detail=check.detail)
            images.append(check.image)
        rng = np.random.default_rng([self.cfg.reformat.seed, position])
        scenario = int(rng.integers(len(SCENARIOS)))
        question = int(rng.integers(len(alignment_questions(len(images)))))
        text = reformat_prompt(SCENARIOS[scenario].prompt, record.text())
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
        prompt = self.renderer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)
        tokenizer = getattr(self.renderer, "tokenizer", self.renderer)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.cfg.rollout.max_prompt_tokens:
            return Outcome(None, position, record, reason="prompt too long",
                           detail=f"{len(ids)} tokens > rollout.max_prompt_tokens {self.cfg.rollout.max_prompt_tokens}")
        seed = derive_attempt_seed(self.cfg.rollout.seed, wave, position)
        job = Job(position, record, wave, list(errors), scenario, question, seed)
        return PromptRequest(f"{record.id}@{position}#{wave}", input_ids=ids, text=prompt, images=images, sample=job,
                             seed=seed, position=k)

    def _commit(self, wave: int, outcome: Outcome) -> None:
        files, counters, job = self.run.files, self.counters, outcome.job
        if outcome.reply is not None:
            files[f"replies-{wave}.jsonl"].write(encode_line({
                "position": job.position, "record": job.record, "attempt": wave, "seed": job.seed,
                "scenario": SCENARIOS[job.scenario].name, "question": job.question, "reply": outcome.reply}))
            counters["kept"] += 1
            counters["kept_at_attempt"][str(wave)] = counters["kept_at_attempt"].get(str(wave), 0) + 1
            return
        if outcome.reason == "invalid reply":
            kind = outcome.detail.split(":", 1)[0]
            counters["invalid_replies"][kind] = counters["invalid_replies"].get(kind, 0) + 1
            if wave < self.attempts:
                files[f"retry-{wave + 1}.jsonl"].write(encode_line({
                    "position": job.position, "record": job.record, "errors": outcome.errors}))
                return
        files[FAILED].write(encode_line({"id": outcome.record.id, "reason": outcome.reason, "detail": outcome.detail,
                                         "attempts": wave if job is not None else 0, "errors": outcome.errors}))
        drop(counters, outcome.reason)

    # -- outputs ------------------------------------------------------------------------------------

    def _merge(self) -> int:
        """Every wave's valid replies in row order -> sft.jsonl and llava.json (written whole, then renamed)."""
        waves = [self._replies(a) for a in range(1, self.attempts + 1)]
        sft_tmp, llava_tmp = self.folder / (SFT + ".tmp"), self.folder / (LLAVA + ".tmp")
        written = 0
        with sft_tmp.open("wb") as sft, llava_tmp.open("w", encoding="utf-8") as llava:
            llava.write("[")
            for item in heapq.merge(*waves, key=lambda item: item["position"]):
                for record in self._vqa_records(item, written):
                    sft.write(encode_line(record))
                    entry = {"id": f"{record['source_id']}-{record['kind']}", "image": record["images"],
                             "conversations": record["conversations"]}
                    llava.write(("\n" if written == 0 else ",\n") + json.dumps(entry, ensure_ascii=False))
                    written += 1
            llava.write("\n]\n")
        os.replace(sft_tmp, self.folder / SFT)
        os.replace(llava_tmp, self.folder / LLAVA)
        return written

    def _replies(self, wave: int):
        with (self.folder / f"replies-{wave}.jsonl").open("rb") as f:
            for line in f:
                yield json.loads(line)

    def _vqa_records(self, item: dict, index: int) -> list[dict]:
        record, reply = item["record"], item["reply"]
        images = record["images"]
        questions = alignment_questions(len(images))
        name = self.cfg.reformat.dataset_name
        pairs = (("alignment", questions[item["question"]], reply["Image_description"]),
                 ("instruction", reply["QA-query"], reply["QA-answer"]))
        out = []
        for offset, (kind, question, answer) in enumerate(pairs):
            human = "<image>\n" * len(images) + question
            out.append({
                "dataset_name": f"{name}-{kind}", "dataset_index": index + offset, "images": images,
                "question": question, "options": {"A": answer}, "answer_label": "A", "answer": answer,
                "reasoning": None, "kind": kind, "source_id": record["id"], "scenario": item["scenario"],
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]})
        return out

    def _summary(self, records: int) -> tuple[dict, str]:
        c = self.counters
        summary = {"stage": "reformat", "rows": c["kept"] + sum(c["dropped"].values()), "kept": c["kept"],
                   "dropped": dict(sorted(c["dropped"].items())), "records": records,
                   "invalid_replies": dict(sorted(c["invalid_replies"].items())),
                   "kept_at_attempt": dict(sorted(c["kept_at_attempt"].items()))}
        text = reasons_table(c["kept"], c["dropped"], "reformat")
        text += (f"\n{records} VQA records ({c['kept']} alignment + {c['kept']} instruction-tuning) "
                 f"in {SFT} and {LLAVA}\n")
        if c["invalid_replies"]:
            text += "invalid replies (every attempt): " + ", ".join(
                f"{k} {v}" for k, v in sorted(c["invalid_replies"].items())) + "\n"
        if c["kept_at_attempt"]:
            text += "rows kept at attempt: " + ", ".join(
                f"{k}: {v}" for k, v in sorted(c["kept_at_attempt"].items())) + "\n"
        return summary, text


async def _shutdown(backends) -> None:
    for backend in backends:
        await backend.shutdown()


def reformat(cfg, folder, input_cfg, *, backends=None, renderer=None) -> dict:
    """Run (or resume) the reformat stage; `backends` and `renderer` may be given (else built from cfg)."""
    return Reformatter(cfg, folder, input_cfg, backends=backends, renderer=renderer)()
