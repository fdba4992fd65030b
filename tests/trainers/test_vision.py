"""Images all the way to the learner, on a tiny random Qwen2.5-VL: the learner expands prompts exactly as
the engine does, images cross the wire intact, GRPO (colocated and split) recomputes the engine's
log-probs of the sampled tokens (and sees the image: swap it and the difference jumps), SFT trains on
image rows, and the exported policy reloads with identical logits on an image prompt."""

from __future__ import annotations

from contextlib import closing

import numpy as np
import pytest
import torch
from PIL import Image

from medvl_engine import config as config_lib
from medvl_engine.data import load_bundled
from medvl_engine.prompts import render_prompt
from medvl_engine.trainers.config import GRPOConfig


def image_samples(count: int) -> list:
    return [s for s in load_bundled() if s.images][:count]


def test_the_learner_expands_prompts_token_for_token_like_the_engine(tiny_vl_model):
    from dataclasses import replace

    from medvl_engine.vision import expand_image_tokens, load_processor

    processor = load_processor(str(tiny_vl_model))
    two = next(s for s in load_bundled() if len(s.images) == 2)
    # 0 to 3 images of different sizes and modes.
    three = replace(two, images=[Image.new("RGB", (60, 90), (200, 10, 10)), two.images[0].convert("L"),
                                 Image.new("RGB", (200, 120), (0, 90, 250))])
    text_only = next(s for s in load_bundled() if not s.images)
    for sample in (text_only, image_samples(1)[0], two, three):
        text = render_prompt(processor, sample)
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        expanded, vision = expand_image_tokens(ids, sample.images, processor)
        if not sample.images:
            assert expanded == ids and vision == {}
            continue
        engine = processor(text=[text], images=list(sample.images), return_tensors="pt")
        assert expanded == engine["input_ids"][0].tolist()
        assert torch.equal(vision["pixel_values"], engine["pixel_values"])
        assert torch.equal(vision["image_grid_thw"], engine["image_grid_thw"])
        assert len(vision["image_grid_thw"]) == len(sample.images)
    with pytest.raises(ValueError, match="1 image placeholder"):
        expand_image_tokens(processor.tokenizer(render_prompt(processor, image_samples(1)[0]),
                                                add_special_tokens=False)["input_ids"], two.images, processor)


@pytest.fixture(scope="module")
def processor():
    from tiny_models import qwen_vl_processor

    return qwen_vl_processor()


def _awkward_images() -> dict[str, Image.Image]:
    """The modes whose alpha or transparency key PIL's bare convert("RGB") drops, and CMYK."""
    rng = np.random.default_rng(3)
    palette = Image.fromarray(rng.integers(0, 16, (21, 34), dtype=np.uint8), "P")
    palette.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
    palette.info["transparency"] = 5
    return {"RGBA": Image.fromarray(rng.integers(0, 256, (19, 33, 4), dtype=np.uint8), "RGBA"),
            "LA": Image.fromarray(rng.integers(0, 256, (30, 17, 2), dtype=np.uint8), "LA"),
            "P": palette,
            "CMYK": Image.fromarray(rng.integers(0, 256, (25, 26, 4), dtype=np.uint8), "CMYK")}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK"])
def test_model_rgb_is_the_processors_conversion_and_survives_the_wire(processor, mode):
    from medvl_engine.transport.messages import ImageData
    from medvl_engine.vision import decoded_copy, model_rgb

    image_processor = processor.image_processor
    image = _awkward_images()[mode]
    assert image.mode == mode and (mode == "CMYK" or "A" in image.getbands() or "transparency" in image.info)
    converted = model_rgb(image)
    # The processor's own per-image conversion (do_convert_rgb), channels first: the same bytes.
    processors = np.moveaxis(image_processor.process_image(image, do_convert_rgb=True), 0, -1)
    assert converted.mode == "RGB" and converted.tobytes() == np.ascontiguousarray(processors).tobytes()
    # What the engine's processor makes of the dataset's image is what the learner's makes of the wire's.
    wire = ImageData.from_pil(decoded_copy(image)).to_pil()
    engine = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(image_processor(images=[wire], return_tensors="pt")["pixel_values"], engine)
    # And the wire's own conversion of an image no one converted before follows the same rule (once it dropped
    # the transparency of LA and P: the learner saw other pixels than the engine).
    direct = ImageData.from_pil(image).to_pil()
    assert torch.equal(image_processor(images=[direct], return_tensors="pt")["pixel_values"], engine)


def test_expanded_length_counts_image_tokens_from_sizes_as_the_expansion_does(processor):
    from medvl_engine.vision import expand_image_tokens, expanded_length

    sizes = [(1, 1), (27, 29), (56, 56), (57, 113), (448, 448), (1000, 37), (37, 1000), (1500, 1100)]
    pad = processor.image_token_id
    for count in range(4):
        for first in range(len(sizes) - count + 1):
            images = [Image.new("RGB", size) for size in sizes[first:first + count]]
            ids = [5, *[pad] * count, 6, 7]
            expanded, _ = expand_image_tokens(ids, images, processor)
            assert expanded_length(ids, images, processor) == len(expanded), [im.size for im in images]
    with pytest.raises(ValueError, match="2 image placeholder"):
        expanded_length([pad, pad], [Image.new("RGB", (28, 28))], processor)


def test_placeholders_without_images_are_counted_too(processor):
    from medvl_engine.vision import expand_image_tokens

    assert expand_image_tokens([5, 6], [], processor) == ([5, 6], {})
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) for 0 image\(s\)"):
        expand_image_tokens([5, processor.image_token_id, 6], [], processor)


def test_the_learner_processes_a_prompts_images_once_for_its_n_answers(processor):
    """RolloutBatch runs the image processor once per group and its n answers share the result."""
    from medvl_engine.trainers.rollout_batch import RolloutBatch
    from medvl_engine.transport.messages import RolloutGroup

    n = 4
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    group = RolloutGroup.build(
        producer="w0", seq=0, prompt_id="q0", dataset_name="slake", dataset_index=0, weight_version=0,
        answer_label="A", prompt_ids=[5, processor.image_token_id, 6], response_ids=[[7, 8]] * n,
        logprobs=[[-0.5, -0.5]] * n, texts=["A"] * n, finish_reasons=["stop"] * n, rewards=[1.0] * n,
        correct=[True] * n, format_ok=[True] * n, letters=["A"] * n, position=0, images=[image])
    seen = []
    preprocess = processor.image_processor.preprocess

    def counting(images, *args, **kwargs):
        seen.append(images)
        return preprocess(images, *args, **kwargs)

    processor.image_processor.preprocess = counting  # what the image processor's __call__ runs
    try:
        batch = RolloutBatch.from_groups([group], max_prompt_tokens=4096, max_response_tokens=8, processor=processor)
    finally:
        del processor.image_processor.preprocess
    assert len(seen) == 1 and len(batch) == n
    assert all(batch.vision[i]["pixel_values"] is batch.vision[0]["pixel_values"] for i in range(n))


def test_images_cross_the_wire_pixel_exact():
    from medvl_engine.transport.messages import RolloutGroup, decode, encode, shape_error

    images = [Image.new("RGB", (31, 17), (1, 2, 3)), image_samples(1)[0].images[0]]
    images.append(Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 10), dtype=np.uint8), "L"))
    group = RolloutGroup.build(producer="w", seq=0, prompt_id="p", dataset_name="d", dataset_index=0,
                               weight_version=0, answer_label="A", prompt_ids=[1, 2], response_ids=[[3]],
                               logprobs=[None], texts=["x"], finish_reasons=["stop"], rewards=[0.0],
                               correct=[False], format_ok=[False], letters=[""], images=images)
    decoded = decode(encode(group))
    assert shape_error(decoded) is None
    for sent, got in zip(images, decoded.image_list()):
        assert (got.mode, got.size) == (sent.mode, sent.size) and got.tobytes() == sent.tobytes()
    decoded.images[0].data = decoded.images[0].data[:-1]
    assert "image 0" in shape_error(decoded)


def vl_config(model, run_dir, *, endpoint: str = "", steps: int = 2) -> GRPOConfig:
    return config_lib.build(GRPOConfig, {
        "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 1e-3},
        # The first bundled rows: one image each, one with two; the stream wraps after 6.
        "data": {"source": "bundled", "shuffle": False, "max_samples": 6},
        "rollout": {"n": 2, "max_response_tokens": 6, "seed": 1, "max_staleness": 0},
        "transport": {"endpoint": endpoint} if endpoint else {},
        "algo": {"prompts_per_step": 2, "mini_batches": 1, "kl_coef": 0.01},
        "deepspeed": {"micro_batch_size": 2},
        "output": str(run_dir),
        "checkpoint": {"export": True},
        "steps": steps,
    })


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["colocated", "split"])
def test_grpo_on_images_recomputes_the_engines_logprobs(tiny_vl_model, tmp_path, placement):
    from medvl_engine.trainers import grpo

    endpoint = f"ipc://{tmp_path}/vl.sock" if placement == "split" else ""
    rows = grpo.run(vl_config(tiny_vl_model, tmp_path / "run", endpoint=endpoint))
    assert [r["images"] for r in rows] == [2, 2] and all(r["groups"] == 2 for r in rows)
    # fp32 engine and learner on the same weights: measured ~1e-6 (the batch shapes differ).
    assert all(r["logp_diff_max"] < 1e-4 and r["logp_diff_mean"] < 1e-5 for r in rows), rows


@pytest.mark.slow
def test_the_learner_sees_the_image(tiny_vl_model, tmp_path):
    """The same run with each group's image replaced after sampling: the learner's log-probs move away."""
    from medvl_engine.trainers import grpo, sources

    recv = sources.LocalFeed.recv

    def swapped(self, timeout=None):
        msg = recv(self, timeout)
        for image in msg.images:  # same size and mode, so the same number of image tokens
            image.data = bytes(255 - b for b in image.data)
        return msg

    sources.LocalFeed.recv = swapped
    try:
        rows = grpo.run(vl_config(tiny_vl_model, tmp_path / "run", steps=1))
    finally:
        sources.LocalFeed.recv = recv
    # Measured ~1e-6 with the right image (above); an inverted image moves the log-probs by far more.
    assert rows[0]["logp_diff_max"] > 1e-3, rows


@pytest.mark.slow
def test_sft_on_image_rows_lowers_the_loss_and_the_export_reloads_with_identical_logits(tiny_vl_model, tmp_path):
    from transformers import AutoModelForImageTextToText

    from medvl_engine.trainers.checkpoint import export_hf
    from medvl_engine.trainers.config import SFTConfig
    from medvl_engine.trainers.learner import Learner
    from medvl_engine.trainers.model import load_processor as policy_processor
    from medvl_engine.trainers.model import load_tokenizer
    from medvl_engine.trainers.sft import SFTTrainer, load_rows, total_steps
    from medvl_engine.vision import expand_image_tokens, load_processor

    cfg = config_lib.build(SFTConfig, {
        "model": {"path": str(tiny_vl_model), "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 1e-2},
        "data": {"source": "bundled", "max_samples": 4, "shuffle": False},
        "deepspeed": {"micro_batch_size": 2},
        "output": str(tmp_path / "run"),
        "epochs": 4, "global_batch_size": 2,
    })
    rows = load_rows(cfg, load_tokenizer(cfg.model.path), policy_processor(cfg.model.path))
    assert all(r.sample.images for r in rows)  # the first bundled rows all have images
    learner = Learner.build(cfg.model, cfg.optim, cfg.deepspeed, train_batch_size=2,
                            total_steps=total_steps(cfg, len(rows)))
    trainer = SFTTrainer(cfg, learner, rows)
    with closing(trainer):
        losses = [trainer.train_step(step)["loss"] for step in range(trainer.total_steps)]
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses

    export = export_hf(learner, tmp_path / "export")
    processor = load_processor(str(export))  # the export carries the image processor and chat template
    sample = image_samples(1)[0]
    ids = processor.tokenizer(render_prompt(processor, sample), add_special_tokens=False)["input_ids"]
    ids, vision = expand_image_tokens(ids, sample.images, processor)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "mm_token_type_ids": (torch.tensor([ids]) == processor.image_token_id).long(), **vision}
    reloaded = AutoModelForImageTextToText.from_pretrained(export).eval()
    initial = AutoModelForImageTextToText.from_pretrained(tiny_vl_model).eval()
    learner.module.eval()
    with torch.no_grad():
        live = learner.module(**inputs).logits
        assert torch.equal(reloaded(**inputs).logits, live)
        assert not torch.allclose(initial(**inputs).logits, live)  # it trained
