"""Every message that crosses a process boundary, as tagged msgspec Structs encoded with msgpack.

Token ids (int32) and log-probs (float32) travel as raw little-endian buffers (`bytes` fields),
never as lists and never pickled: a group of 8 answers of 4k tokens is ~256 KB of buffers and one
header, and decoding it is a memcpy plus `np.frombuffer`, not 32k Python ints.

Flow: a producer (rollout worker) sends `Hello`; the consumer answers with `Credit` (how many more
groups it may send, and the sequence number it expects next, so a restarted producer resumes where
the consumer is); the producer sends `RolloutGroup`s and `RolloutError`s numbered by `seq`;
`WeightVersion` announces new policy weights from the learner to the workers (a worker that received them
over torch.distributed answers `WeightsLoaded`); a producer sends a `Heartbeat` every few seconds; the
consumer ends a producer's session with `Stop`; a closing producer sends
`Goodbye` and waits for the Credit that answers it, whose `next_seq` says everything arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec
import numpy as np

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")

# Wire limits: msgspec checks them while it decodes, so a list or bytes field over its limit is refused
# (`invalid`) from its msgpack header, before its items are built. A frame is also capped as a whole (the
# receiver's max_message_bytes, 256 MiB by default), so these only have to bound what one field can cost:
MAX_NAME = 256  # characters of a producer name
MAX_ANSWERS = 1024  # answers per group (rollout.n): GRPO uses 8-64; 16x the largest
MAX_SEQUENCE_TOKENS = 1 << 17  # a prompt or a response: 131072 tokens, the longest context of the VL models served
MAX_TOKEN_BYTES = 4 * MAX_SEQUENCE_TOKENS  # int32 ids / float32 log-probs of one sequence: 4 B x 131072 = 512 KiB
MAX_TEXT_CHARS = 32 * MAX_SEQUENCE_TOKENS  # a decoded answer: <= 32 characters per token x 131072 = 4 Mi characters
MAX_IMAGES = 64  # images of one prompt
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_BYTES = 4 * MAX_IMAGE_SIDE**2  # raw pixels, RGBA (4 B) 8192 x 8192 = 256 MiB, the default frame cap
MAX_LABEL_CHARS = 64 << 10  # an id, a gold answer, an error's reason, a checkpoint path: 64 Ki characters
MAX_WORD_CHARS = 64  # a finish reason, an option letter, an image mode, a dtype name
MAX_TENSORS = 1 << 20  # tensors of one weight bucket (a 671B MoE model has ~10^5 in all)
MAX_DIMS = 16  # dimensions of one tensor's shape


def _limited(kind, max_length: int):
    return Annotated[kind, msgspec.Meta(max_length=max_length)]


Name = _limited(str, MAX_NAME)
Label = _limited(str, MAX_LABEL_CHARS)
Word = _limited(str, MAX_WORD_CHARS)
Text = _limited(str, MAX_TEXT_CHARS)
Tokens = _limited(bytes, MAX_TOKEN_BYTES)


class Hello(msgspec.Struct, tag="hello"):
    producer: Name
    pid: int
    weight_version: int = 0


class Credit(msgspec.Struct, tag="credit"):
    """Consumer -> producer: `credits` more groups may be sent; `next_seq` is the next one expected.

    The producer may send sequence numbers below `next_seq + credits`. `window` is the consumer's
    grant per producer (messages sent but not yet handed to the consumer's application), so
    `next_seq + credits - window` is how far the application has consumed. Every Credit restates the
    whole limit rather than adding to it, so a repeated or dropped Credit cannot inflate or leak credit.
    """

    producer: Name
    credits: int
    next_seq: int
    consumer_version: int = 0
    window: int = 0
    max_message_bytes: int = 0  # the largest message the consumer reads (0: not said); a larger one is refused
    # The share of the prompt stream the consumer assigned to this producer (num_shards 0: none assigned):
    # it accepts only stream positions k = shard mod num_shards, at sequence number (k - shard) / num_shards.
    shard: int = 0
    num_shards: int = 0


class Goodbye(msgspec.Struct, tag="goodbye"):
    """Producer -> consumer: the producer is closing. The consumer answers with a Credit, and the producer
    closes its socket once that Credit's `next_seq` covers everything it sent: closing a TCP socket with
    a Credit unread in it resets the connection, and the reset discards what the consumer's kernel still
    held of the stream (~17 groups of 150 KB were lost that way on loopback)."""

    producer: Name


class Heartbeat(msgspec.Struct, tag="alive"):
    """Producer -> consumer, every few seconds: the producer's process runs (a learner that started it kills
    and restarts it when its heartbeats stop: a stopped or hung process). No sequence number, no credit."""

    producer: Name


class Stop(msgspec.Struct, tag="stop"):
    """Consumer -> producer: this session is over. `finished`: the run ended, the producer exits 0;
    `session_ended`: the producer broke the protocol (its `reason` says how) and a new process of it resumes
    where the consumer stands; `unknown_producer`: the consumer has no shard for this producer id."""

    producer: Name
    kind: Word
    reason: Label = ""


class WeightBucket(msgspec.Struct):
    """One bucket of a torch.distributed weight push: the tensors the learner's rank 0 broadcasts next, in
    this order (the arguments of `Backend.update_weights_from_distributed`)."""

    names: _limited(list[Label], MAX_TENSORS)
    dtypes: _limited(list[Word], MAX_TENSORS)  # torch dtype names: "bfloat16", "float32"
    shapes: _limited(list[_limited(list[int], MAX_DIMS)], MAX_TENSORS)


class WeightVersion(msgspec.Struct, tag="weights"):
    """Learner -> workers: policy `version` is ready (at `path` when it travels through disk; broadcast
    over the torch.distributed weight group, bucket by bucket, when `buckets` is not empty), and the
    learner consumes stream positions below `window` (-1: no window): workers start no position at or
    beyond it, so nothing is generated that the learner would have to drop as too stale."""

    version: int
    path: Label = ""
    window: int = -1
    buckets: _limited(list[WeightBucket], MAX_TENSORS) = []


class WeightsLoaded(msgspec.Struct, tag="loaded"):
    """Producer -> consumer: the producer's engine now runs policy `version` (sent after a torch.distributed
    weight push, which the learner waits for before its next step)."""

    producer: Name
    version: int


class RolloutError(msgspec.Struct, tag="error"):
    """A prompt that could not be completed after its retries; it takes a sequence number like a group."""

    producer: Name
    seq: int
    prompt_id: Label
    reason: Label
    attempts: int = 0
    position: int = -1  # the prompt's position in the PromptStream


class ImageData(msgspec.Struct):
    """One image as raw pixels (PIL's `tobytes()` in `mode`): no encoder on the hot path and lossless, so
    the learner's image processor sees exactly the pixels the engine's saw. A 448x448 RGB image is 588 KB."""

    mode: Word
    width: int
    height: int
    data: _limited(bytes, MAX_IMAGE_BYTES)

    @classmethod
    def from_pil(cls, image) -> ImageData:
        if image.mode not in ("RGB", "L", "RGBA", "I;16"):
            # LA, P (with transparency), CMYK ...: the processors' one RGB rule (alpha on white), never PIL's
            # convert("RGB"), which drops alpha: the learner must see the pixels the engine saw.
            from medvl_engine.vision import model_rgb

            image = model_rgb(image)
        return cls(mode=image.mode, width=image.width, height=image.height, data=image.tobytes())

    def to_pil(self):
        from PIL import Image

        return Image.frombytes(self.mode, (self.width, self.height), self.data)


class RolloutGroup(msgspec.Struct, tag="group"):
    """The n scored answers of one prompt (one GRPO group)."""

    producer: Name
    seq: int
    prompt_id: Label
    dataset_name: Label
    dataset_index: int
    weight_version: int
    answer_label: Label
    prompt_ids: Tokens  # int32 [P]
    response_ids: _limited(list[Tokens], MAX_ANSWERS)  # n x int32 [T_i]
    logprobs: _limited(list[Tokens], MAX_ANSWERS)  # n x float32 [T_i], or empty bytes when the engine returned none
    texts: _limited(list[Text], MAX_ANSWERS)
    finish_reasons: _limited(list[Word], MAX_ANSWERS)
    rewards: _limited(bytes, 4 * MAX_ANSWERS)  # float32 [n]
    correct: _limited(bytes, MAX_ANSWERS)  # bool [n]
    format_ok: _limited(bytes, MAX_ANSWERS)  # bool [n]
    letters: _limited(list[Word], MAX_ANSWERS)  # the option letter each answer maps to ("" when none)
    parsed: _limited(list[Text], MAX_ANSWERS) = []  # the extracted answer of each answer
    position: int = -1  # the prompt's position in the PromptStream (same for every placement)
    seed: int = -1  # the sampling seed of that position (-1: none)
    images: _limited(list[ImageData], MAX_IMAGES) = []  # the prompt's images, in the order of their placeholders
    # Wall clock (time.time(), the producer's machine) when its generation started and when it was scored;
    # 0: not said. The learner's timeline.jsonl draws them.
    started: float = 0.0
    finished: float = 0.0

    @property
    def n(self) -> int:
        return len(self.response_ids)

    def prompt_array(self) -> np.ndarray:
        return np.frombuffer(self.prompt_ids, dtype=TOKEN_DTYPE)

    def response_array(self, i: int) -> np.ndarray:
        return np.frombuffer(self.response_ids[i], dtype=TOKEN_DTYPE)

    def logprob_array(self, i: int) -> np.ndarray | None:
        buf = self.logprobs[i]
        return np.frombuffer(buf, dtype=LOGPROB_DTYPE) if buf else None

    def reward_array(self) -> np.ndarray:
        return np.frombuffer(self.rewards, dtype=LOGPROB_DTYPE)

    def correct_array(self) -> np.ndarray:
        return np.frombuffer(self.correct, dtype=np.bool_)

    def format_array(self) -> np.ndarray:
        return np.frombuffer(self.format_ok, dtype=np.bool_)

    @classmethod
    def build(
        cls,
        *,
        producer: str,
        seq: int,
        prompt_id: str,
        dataset_name: str,
        dataset_index: int,
        weight_version: int,
        answer_label: str,
        prompt_ids: Sequence[int] | np.ndarray,
        response_ids: Sequence[Sequence[int] | np.ndarray],
        logprobs: Sequence[Sequence[float] | np.ndarray | None],
        texts: Sequence[str],
        finish_reasons: Sequence[str],
        rewards: Sequence[float] | np.ndarray,
        correct: Sequence[bool] | np.ndarray,
        format_ok: Sequence[bool] | np.ndarray,
        letters: Sequence[str],
        parsed: Sequence[str] | None = None,
        position: int = -1,
        seed: int | None = None,
        images: Sequence = (),
        started: float = 0.0,
        finished: float = 0.0,
    ) -> RolloutGroup:
        n = len(response_ids)
        for name, seq_ in (("logprobs", logprobs), ("texts", texts), ("finish_reasons", finish_reasons),
                           ("rewards", rewards), ("correct", correct), ("format_ok", format_ok),
                           ("letters", letters), ("parsed", parsed if parsed is not None else texts)):
            if len(seq_) != n:
                raise ValueError(f"RolloutGroup {prompt_id!r}: {name} has {len(seq_)} entries, expected {n}")
        return cls(
            producer=producer,
            seq=seq,
            prompt_id=prompt_id,
            dataset_name=dataset_name,
            dataset_index=int(dataset_index),
            weight_version=int(weight_version),
            answer_label=answer_label,
            prompt_ids=_buffer(prompt_ids, TOKEN_DTYPE),
            response_ids=[_buffer(r, TOKEN_DTYPE) for r in response_ids],
            logprobs=[b"" if lp is None else _buffer(lp, LOGPROB_DTYPE) for lp in logprobs],
            texts=list(texts),
            finish_reasons=list(finish_reasons),
            rewards=_buffer(rewards, LOGPROB_DTYPE),
            correct=_buffer(correct, np.bool_),
            format_ok=_buffer(format_ok, np.bool_),
            letters=list(letters),
            parsed=list(parsed) if parsed is not None else [""] * n,
            position=int(position),
            seed=-1 if seed is None else int(seed),
            images=[im if isinstance(im, ImageData) else ImageData.from_pil(im) for im in images],
            started=float(started),
            finished=float(finished),
        )

    def image_list(self) -> list:
        """The prompt's images as PIL images."""
        return [im.to_pil() for im in self.images]


def shape_error(msg: RolloutGroup | RolloutError) -> str | None:
    """What makes a decoded stream message unusable (a negative `seq`, per-answer lists or buffers of
    different lengths, a buffer that is not whole items), or None. msgspec checks the types; this checks
    what the types cannot say, so a learner never indexes past a buffer a peer sent short."""
    if msg.seq < 0:
        return f"seq {msg.seq} < 0"
    if isinstance(msg, RolloutError):
        return None
    n = msg.n
    for name, items in (("logprobs", msg.logprobs), ("texts", msg.texts), ("finish_reasons", msg.finish_reasons),
                        ("letters", msg.letters)):
        if len(items) != n:
            return f"{name} has {len(items)} entries for {n} answers"
    if msg.parsed and len(msg.parsed) != n:
        return f"parsed has {len(msg.parsed)} entries for {n} answers"
    if len(msg.prompt_ids) % TOKEN_DTYPE.itemsize:
        return f"prompt_ids has {len(msg.prompt_ids)} bytes, not whole int32 token ids"
    for name, buf, expected in (("rewards", msg.rewards, LOGPROB_DTYPE.itemsize * n), ("correct", msg.correct, n),
                                ("format_ok", msg.format_ok, n)):
        if len(buf) != expected:
            return f"{name} has {len(buf)} bytes for {n} answers"
    for i, (tokens, logprobs) in enumerate(zip(msg.response_ids, msg.logprobs)):
        # int32 ids and float32 log-probs: one log-prob per token is the same number of bytes
        if len(tokens) % TOKEN_DTYPE.itemsize or len(logprobs) not in (0, len(tokens)):
            return f"answer {i}: {len(tokens)} bytes of token ids and {len(logprobs)} bytes of log-probs"
    for i, image in enumerate(msg.images):
        depth = _PIXEL_BYTES.get(image.mode)
        size = image.width * image.height * (depth or 0)
        if depth is None or image.width < 1 or image.height < 1 or len(image.data) != size:
            return f"image {i}: {len(image.data)} bytes for a {image.width}x{image.height} {image.mode!r} image"
    return None


_PIXEL_BYTES = {"RGB": 3, "L": 1, "RGBA": 4, "I;16": 2}


def _buffer(values, dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(values), dtype=dtype).tobytes()


Message = (Hello | Credit | Goodbye | WeightVersion | WeightsLoaded | Heartbeat | Stop | RolloutError
           | RolloutGroup)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(buf: bytes | memoryview) -> Message:
    return _decoder.decode(buf)
