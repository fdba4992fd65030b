"""The learner's fused log-probs (answer rows of the final hidden states through `linear_token_logprobs`)
against the plain path (full logits, then `token_logprobs`): values, entropy and the gradients of every
parameter, on a tiny Llama (tied and untied), a tiny Qwen2.5-VL with images, and a learner built by
`Learner.build` under ZeRO stages 0-3 with its reference model; and `BlockwiseLinearLogprobs` (the
head's op off CUDA) against the kernel's reference. Tolerances are the fp32 ones of tests/kernels
(1e-5), scaled by the gradient's size for whole-model gradients (`assert_grads_close`).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # As tests/kernels/conftest.py: the one Triton test below runs the kernel under the interpreter,
    # which Triton only offers when this is set before it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer, tiny_qwen2_5_vl  # noqa: E402

from medvl_engine.kernels.reference import linear_token_logprobs_reference  # noqa: E402
from medvl_engine.trainers.fused_head import (  # noqa: E402
    BlockwiseLinearLogprobs,
    FusedLogprobHead,
    fused_head,
    install_fused_head,
    masked_linear_logprobs,
)
from medvl_engine.trainers.learner import Learner, MicroBatch, pad_sequences  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}  # the fp32 rows of tests/kernels


def assert_grads_close(grads: dict, ref_grads: dict) -> None:
    """Per parameter, the fp32 tolerance scaled by the gradient's size.

    A parameter's gradient sums the whole model's backward: on the tiny Llama (max |g| 12-23) the two
    paths differ by up to 2.3e-5 while each is 2.5e-5 to 7.4e-5 from a float64 run, so an absolute
    1e-5 would test rounding, not the path.
    """
    assert grads.keys() == ref_grads.keys() and grads
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        assert scale > 0, name  # never compare zeros
        torch.testing.assert_close(grads[name], ref, atol=TOL["atol"] * max(1.0, scale), rtol=TOL["rtol"],
                                   msg=lambda m, n=name: f"{n}: {m}")


def tiny_llama(vocab: int, *, tied: bool, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied, initializer_range=0.2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def plain_learner(model, *, fused: bool = True) -> Learner:
    """A Learner around a bare model (no DeepSpeed): the same `response_logprobs` code path."""
    return Learner(model, None, None, None, None, 0, 1, fused_logprobs=fused)


def llama_micro(vocab: int) -> MicroBatch:
    gen = torch.Generator().manual_seed(1)
    lengths, starts = (23, 11, 6), (9, 3, 6)  # the last row carries no loss at all
    seqs = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]
    return pad_sequences(seqs, list(starts), pad_id=0)


def run(learner: Learner, micro: MicroBatch, *, temperature: float, entropy: bool):
    """Log-probs, entropy and every parameter's gradient of a loss that weighs each position differently."""
    model = learner.engine
    model.zero_grad(set_to_none=True)
    out = learner.response_logprobs(micro, temperature=temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    scale = torch.linspace(0.5, 1.5, logp.numel(), device=logp.device).view(logp.shape)
    loss = (logp * scale).sum() + (0.3 * ent.sum() if entropy else 0.0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), (ent.detach() if entropy else None), grads


def assert_paths_agree(fused, plain, micro: MicroBatch):
    (logp, ent, grads), (ref_logp, ref_ent, ref_grads) = fused, plain
    torch.testing.assert_close(logp, ref_logp, **TOL)
    assert torch.all(logp[~micro.mask] == 0) and logp[micro.mask].ne(0).all()
    if ref_ent is not None:
        torch.testing.assert_close(ent, ref_ent, **TOL)
        assert torch.all(ent[~micro.mask] == 0) and ent[micro.mask].gt(0).all()
    assert_grads_close(grads, ref_grads)


# -- the blockwise op (the head's path off CUDA) against the kernel's reference -----------------------


def blockwise_inputs(rows, hidden_size, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    if rows > 1:
        tokens[0], tokens[-1] = 0, vocab - 1
    return hidden, weight, tokens


def grads_of(fn, hidden, weight, *, entropy_weight=0.5, need_weight=True):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(need_weight)
    logp, entropy = fn(h, w)
    scale = torch.linspace(0.5, 1.5, logp.numel())
    ((logp.float() * scale).sum() + entropy_weight * entropy.float().sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


# Blocks that do not divide the rows; one row; no rows; a vocabulary that is no power of two.
@pytest.mark.parametrize("rows,vocab,block", [(37, 70, 4), (9, 301, 100), (1, 100, 16), (0, 50, 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
def test_blockwise_matches_the_reference_fp32(rows, vocab, block, temperature, entropy):
    hidden, weight, tokens = blockwise_inputs(rows, 24, vocab, torch.float32)

    def blockwise(h, w):
        logp, ent = BlockwiseLinearLogprobs.apply(h, w, tokens, temperature, block, entropy)
        return logp, ent if entropy else torch.zeros_like(logp)

    def reference(h, w):
        out = linear_token_logprobs_reference(h, w, tokens, temperature, entropy)
        return out if entropy else (out, torch.zeros_like(out))

    ours, ref = grads_of(blockwise, hidden, weight), grads_of(reference, hidden, weight)
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    if rows:
        assert ours[3].abs().max() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_blockwise_fp32_at_qwen_vocabulary_is_at_least_as_close_to_float64_as_the_reference(threads):
    # 151,936-term sums: a batched dot product for the entropy measured 1.4e-3 from float64 here, the
    # reference's torch.sum 5e-5. grad_hidden sums float32 GEMMs of 1,024 vocabulary rows in float64:
    # 1.1e-6 from float64 against the reference's single GEMM at 3.1e-6 (AVX-512) to 8.1e-6 (AVX2),
    # measured with ATEN_CPU_CAPABILITY=avx2|avx512|default and 1 or 2 threads; one float32 GEMM
    # measured 2.2e-5 (it passed on AVX2 machines only because the reference was as far off there).
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_blockwise_fp32_at_qwen_vocabulary()
    finally:
        torch.set_num_threads(saved)


def _check_blockwise_fp32_at_qwen_vocabulary():
    hidden, weight, tokens = blockwise_inputs(16, 64, 151_936, torch.float32, seed=3)
    weight = weight * 0.6  # logits of a few units, like a trained model's
    ours = grads_of(lambda h, w: BlockwiseLinearLogprobs.apply(h, w, tokens, 0.9, 5, True), hidden, weight)
    ref = grads_of(lambda h, w: linear_token_logprobs_reference(h, w, tokens, 0.9, True), hidden, weight)
    oracle = grads_of(lambda h, w: linear_token_logprobs_reference(h, w, tokens, 0.9, True), hidden.double(),
                      weight.double())
    for name, a, r, o in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, ref, oracle):
        ours_err, ref_err = (a.double() - o).abs().max().item(), (r.double() - o).abs().max().item()
        assert ours_err <= ref_err, (name, ours_err, ref_err)


def test_blockwise_bf16_is_at_least_as_close_to_float64_as_eager_bf16():
    hidden, weight, tokens = blockwise_inputs(24, 32, 300, torch.bfloat16, seed=2)
    ours = grads_of(lambda h, w: BlockwiseLinearLogprobs.apply(h, w, tokens, 1.0, 5, True), hidden, weight)
    oracle = grads_of(lambda h, w: linear_token_logprobs_reference(h, w, tokens, 1.0, True), hidden.double(),
                      weight.double())

    def eager(h, w):
        logq = torch.log_softmax(h @ w.T, -1)
        return logq.gather(1, tokens[:, None])[:, 0], -(logq.exp() * logq).sum(-1)

    eager_out = grads_of(eager, hidden, weight)
    for name, a, e, o in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, eager_out, oracle):
        ours_err = (a.double() - o).abs().max().item()
        eager_err = (e.double() - o).abs().max().item()
        assert ours_err <= eager_err, (name, ours_err, eager_err)


def test_blockwise_frozen_weight_gets_no_gradient():
    hidden, weight, tokens = blockwise_inputs(9, 16, 70, torch.float32)
    ours = grads_of(lambda h, w: BlockwiseLinearLogprobs.apply(h, w, tokens, 1.0, 2, True), hidden, weight,
                    need_weight=False)
    ref = grads_of(lambda h, w: linear_token_logprobs_reference(h, w, tokens, 1.0, True), hidden, weight,
                   need_weight=False)
    assert ours[3] is None
    torch.testing.assert_close(ours[2], ref[2], **TOL)


# -- the head -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_shares_the_parameter_and_is_a_plain_linear_outside_a_request(tied):
    import copy

    model = tiny_llama(300, tied=tied)
    linear = model.lm_head
    keys = list(model.state_dict())
    hidden = torch.randn(2, 5, 64)
    expected = linear(hidden)
    head = install_fused_head(model)
    assert model.lm_head is head and isinstance(head, torch.nn.Linear) and install_fused_head(model) is head
    assert head.weight is linear.weight and (head.weight is model.model.embed_tokens.weight) == tied
    assert list(model.state_dict()) == keys  # `lm_head.weight` where it was, nothing added
    assert torch.equal(head(hidden), expected)
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
    # The reference is a deepcopy of the policy: it gets its own head, and a tie survives the copy.
    ref = copy.deepcopy(model)
    assert isinstance(ref.lm_head, FusedLogprobHead) and ref.lm_head.weight is not head.weight
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied
    assert fused_head(model) is head


def test_a_request_yields_zeros_off_the_mask_and_an_empty_mask_still_backpropagates():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 3))
    logp, entropy = masked_linear_logprobs(hidden, weight, targets, torch.zeros(2, 3, dtype=torch.bool), 1.0, True)
    assert logp.shape == entropy.shape == (2, 3) and not logp.any() and not entropy.any()
    (logp.sum() + entropy.sum()).backward()
    assert not hidden.grad.any() and not weight.grad.any()


def test_the_head_refuses_what_it_cannot_compute():
    model = tiny_llama(300, tied=False)
    with pytest.raises(ValueError, match="bias"):
        FusedLogprobHead(torch.nn.Linear(8, 20, bias=True))
    with pytest.raises(RuntimeError, match="install_fused_head"):
        plain_learner(model).response_logprobs(llama_micro(300))
    head = install_fused_head(model)
    micro = llama_micro(300)
    with head.logprobs(micro.targets, micro.mask):
        with pytest.raises(RuntimeError, match="already open"), head.logprobs(micro.targets, micro.mask):
            pass
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(input_ids=micro.input_ids, logits_to_keep=1)
    assert head._request is None


# -- fused == logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
def test_fused_equals_logits_on_a_tiny_llama(tied, temperature, entropy):
    vocab = 300
    model = tiny_llama(vocab, tied=tied)
    install_fused_head(model, chunk=32)  # 32 * 32 // 300 = 3 answer rows per block: 10 blocks, recomputed
    micro = llama_micro(vocab)
    fused = run(plain_learner(model, fused=True), micro, temperature=temperature, entropy=entropy)
    plain = run(plain_learner(model, fused=False), micro, temperature=temperature, entropy=entropy)
    assert_paths_agree(fused, plain, micro)


def test_fused_equals_logits_through_the_triton_kernel():
    from medvl_engine.kernels.dispatch import interpreter_active

    if not torch.cuda.is_available() and not interpreter_active():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: no Triton launches on CPU tensors")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_llama(120, tied=True).to(device)
    install_fused_head(model, chunk=64)  # 2 vocabulary tiles, rows in one
    micro = llama_micro(120).to(device)
    os.environ["MEDVL_KERNEL_IMPL"] = "triton"
    try:
        fused = run(plain_learner(model, fused=True), micro, temperature=0.8, entropy=True)
    finally:
        del os.environ["MEDVL_KERNEL_IMPL"]
    plain = run(plain_learner(model, fused=False), micro, temperature=0.8, entropy=True)
    assert_paths_agree(fused, plain, micro)


@pytest.fixture(scope="module")
def qwen_vl():
    tokenizer = qwen_tokenizer()
    return tokenizer, image_only_qwen2_5_vl_processor(tokenizer), tiny_qwen2_5_vl(tokenizer)


def vl_micro(tokenizer, processor) -> MicroBatch:
    """Two image rows: one 56x56 image, and two images (28x84, 84x56); prompt by the chat template."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    rows = [([image(56, 56)], "Which organ is shown?", "The liver.<|im_end|>"),
            ([image(28, 84), image(84, 56)], "Compare the two scans.",
             "The second shows a lesion in the lung.<|im_end|>")]
    seqs, starts, pixels, grids = [], [], [], []
    for images, question, answer in rows:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = processor(text=[prompt], images=[images], return_tensors="pt")["input_ids"][0]
        full = processor(text=[prompt + answer], images=[images], return_tensors="pt")
        assert torch.equal(full["input_ids"][0, : len(prompt_ids)], prompt_ids)
        seqs.append(full["input_ids"][0].tolist())
        starts.append(len(prompt_ids))
        pixels.append(full["pixel_values"])
        grids.append(full["image_grid_thw"])
    micro = pad_sequences(seqs, starts, tokenizer.pad_token_id)
    micro.vision = {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}
    return micro


@pytest.mark.slow  # ~10 s: the real Qwen tokenizer and a 151,665-token vocabulary
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_fused_equals_logits_on_a_tiny_qwen2_5_vl_with_images(qwen_vl, temperature, entropy):
    import copy

    tokenizer, processor, base = qwen_vl
    model = copy.deepcopy(base).train()
    install_fused_head(model)  # tied: the head is the text embedding of 151,665 x 64
    micro = vl_micro(tokenizer, processor)
    image_tokens = int(micro.vision["image_grid_thw"].prod(-1).sum()) // 4  # 2 x 2 patches merge into one token
    assert (micro.input_ids == model.config.image_token_id).sum() == image_tokens == 4 + 8 + 6
    fused = run(plain_learner(model, fused=True), micro, temperature=temperature, entropy=entropy)
    plain = run(plain_learner(model, fused=False), micro, temperature=temperature, entropy=entropy)
    assert_paths_agree(fused, plain, micro)
    assert any(name.startswith("model.visual.") for name in fused[2])  # the images reached the gradient
    # Other pixels, other log-probs: the head saw the image-conditioned hidden states.
    other = MicroBatch(micro.input_ids, micro.attention_mask, micro.targets, micro.mask,
                       vision={**micro.vision, "pixel_values": micro.vision["pixel_values"].flip(0)})
    with torch.no_grad():
        changed = plain_learner(model).response_logprobs(other, temperature=temperature)
    assert (changed - fused[0]).abs().max() > 1e-4


# -- through Learner.build (DeepSpeed) ------------------------------------------------------------


def save_llama_folder(folder, *, tied: bool):
    """A Llama whose embedding (2048 x 64 = 131k > ZeRO-3's 100k persistence threshold) is really partitioned."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = 2048
    tiny_llama(vocab, tied=tied).save_pretrained(folder)
    words = {"<pad>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(vocab - 2)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                            eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    return folder


def build(folder, zero_stage: int, **kwargs) -> Learner:
    from medvl_engine.trainers.config import DeepSpeedConfig, ModelConfig, OptimConfig

    return Learner.build(ModelConfig(path=str(folder), dtype="fp32", gradient_checkpointing=False),
                         OptimConfig(lr=1e-3), DeepSpeedConfig(zero_stage=zero_stage), train_batch_size=1,
                         total_steps=1, reference=True, **kwargs)


def learner_step(learner: Learner, micro: MicroBatch):
    """Policy log-probs and entropy, reference log-probs, and each parameter's full gradient after backward."""
    from deepspeed.utils import safe_get_full_grad

    logp, entropy = learner.response_logprobs(micro, temperature=0.7, return_entropy=True)
    with torch.no_grad():
        ref = learner.response_logprobs(micro, temperature=0.7, reference=True)
    scale = torch.linspace(0.5, 1.5, logp.numel()).view(logp.shape)
    learner.backward((logp * scale).sum() + 0.3 * entropy.sum())
    grads = {name: safe_get_full_grad(p).clone() for name, p in learner.module.named_parameters()}
    return logp.detach(), entropy.detach(), ref, grads


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_built_learner_is_fused_by_default_and_matches_the_logits_path(tmp_path, zero_stage):
    folder = save_llama_folder(tmp_path / "llama", tied=zero_stage % 2 == 1)
    micro = llama_micro(2048)
    fused = build(folder, zero_stage)
    assert fused.fused_logprobs and isinstance(fused.module.lm_head, FusedLogprobHead)
    assert fused_head(fused.reference) is not None  # the reference (DeepSpeed-wrapped under ZeRO-3) too
    if zero_stage == 3:  # the head's weight is partitioned outside its forward: the gather story is exercised
        weight = fused.module.lm_head.weight
        assert weight.numel() == 0 and weight.ds_numel == 2048 * 64
    plain = build(folder, zero_stage, fused_logprobs=False)
    assert type(plain.module.lm_head) is torch.nn.Linear
    (logp, entropy, ref, grads), (p_logp, p_entropy, p_ref, p_grads) = learner_step(fused, micro), learner_step(
        plain, micro)
    for a, b in ((logp, p_logp), (entropy, p_entropy), (ref, p_ref)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ref, logp, **TOL)  # no step yet: the reference is the policy
    assert_grads_close(grads, p_grads)
    # The export reads the same state dict as before the swap: transformers loads it back.
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_the_export_of_a_fused_zero3_learner_reloads_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from medvl_engine.trainers.checkpoint import export_hf

    learner = build(save_llama_folder(tmp_path / "llama", tied=False), 3)
    export = AutoModelForCausalLM.from_pretrained(export_hf(learner, tmp_path / "export"))
    assert type(export.lm_head) is torch.nn.Linear
    micro = llama_micro(2048)
    with torch.no_grad():
        expected = export(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits[:, :-1]
        learner.fused_logprobs = False
        assert torch.equal(learner.logits(learner.engine, micro), expected)
        learner.fused_logprobs = True
        logp = learner.response_logprobs(micro)
    want = torch.log_softmax(expected, -1).gather(-1, micro.targets[..., None])[..., 0] * micro.mask
    torch.testing.assert_close(logp, want, **TOL)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_bf16_reference_with_the_policys_weights_gives_the_same_logprobs(tmp_path, zero_stage):
    """KL of the first mini-batch is exactly 0: the reference is cast like DeepSpeed casts the policy
    (parameters only; the rotary `inv_freq` buffer stays float32 in both)."""
    from medvl_engine.trainers.config import DeepSpeedConfig, ModelConfig, OptimConfig

    folder = save_llama_folder(tmp_path / "llama", tied=True)
    learner = Learner.build(ModelConfig(path=str(folder), dtype="bf16", gradient_checkpointing=False),
                            OptimConfig(lr=1e-3), DeepSpeedConfig(zero_stage=zero_stage), train_batch_size=1,
                            total_steps=1, reference=True)
    policy_buffers = dict(learner.module.named_buffers())
    reference = learner.reference.module if zero_stage == 3 else learner.reference
    for name, buf in reference.named_buffers():
        assert buf.dtype == policy_buffers[name].dtype, name
    micro = llama_micro(2048).to(learner.device)
    with torch.no_grad():
        logp = learner.response_logprobs(micro)
        ref = learner.response_logprobs(micro, reference=True)
    assert torch.equal(logp, ref)
