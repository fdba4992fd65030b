"""SGLangBackend's translation of our requests and weight updates into sglang calls.

A RecordingEngine (test double of `sglang.Engine`; its engine needs a GPU) records every call. The
recorded keyword arguments are checked against the installed sglang: its `Engine.async_generate`
signature, its SamplingParams and io_struct request fields, the TokenizerManager coroutines we call.
With sglang importable they come from `inspect`; with sglang installed without its dependencies
(`pip install --no-deps sglang`, it then fails to import) they are read from its source files with
`ast`; without sglang those checks skip.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
from dataclasses import replace
from functools import cache, lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medvl_engine.rollout.sglang_backend import (
    REQUEST_TYPES,
    SGLangBackend,
    completion_from_output,
    generate_kwargs,
    sampling_params_for,
)
from medvl_engine.rollout.types import PromptRequest, SamplingParams

# -- the installed sglang's real API ---------------------------------------------------------------------


@cache
def _sglang_root() -> Path | None:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require_sglang() -> Path:
    root = _sglang_root()
    if root is None:
        pytest.skip("sglang is not installed")
    return root


@cache
def _classes(relpath: str) -> dict[str, ast.ClassDef]:
    tree = ast.parse((_require_sglang() / relpath).read_text())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _method_params(relpath: str, class_name: str, method: str) -> tuple[bool, list[str]]:
    """(is async, parameter names) of `class_name.method` read from the source."""
    for node in _classes(relpath)[class_name].body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == method:
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            return isinstance(node, ast.AsyncFunctionDef), names
    raise AssertionError(f"sglang's {class_name} has no method {method} ({relpath})")


def _struct_fields(relpath: str, class_name: str) -> set[str]:
    """Annotated fields of a class and of its bases defined in the same file."""
    classes = _classes(relpath)
    node = classes[class_name]
    fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields |= _struct_fields(relpath, base.id)
    return fields


@lru_cache(maxsize=1)
def _imported_sglang() -> SimpleNamespace | None:
    """sglang's Engine, SamplingParams and io_struct when they import (tried once: a failed import leaves
    half-initialised modules behind), else None and the checks read the source."""
    _require_sglang()
    try:
        from sglang.srt.entrypoints.engine import Engine
        from sglang.srt.managers import io_struct
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams
    except Exception:  # noqa: BLE001 - missing dependencies or no GPU: fall back to the source
        return None
    return SimpleNamespace(Engine=Engine, io_struct=io_struct, SamplingParams=SGLangSamplingParams)


def async_generate_params() -> set[str]:
    if (sglang := _imported_sglang()) is not None:
        return set(inspect.signature(sglang.Engine.async_generate).parameters)
    return set(_method_params("srt/entrypoints/engine.py", "Engine", "async_generate")[1])


def sampling_param_fields() -> set[str]:
    if (sglang := _imported_sglang()) is not None:
        return set(sglang.SamplingParams.__struct_fields__)
    return _struct_fields("srt/sampling/sampling_params.py", "SamplingParams")


def request_fields(name: str) -> set[str]:
    if (sglang := _imported_sglang()) is not None:
        return set(getattr(sglang.io_struct, name).__struct_fields__)
    return _struct_fields("srt/managers/io_struct.py", name)


def server_arg_fields() -> set[str]:
    fields: set[str] = set()
    for path in sorted((_require_sglang() / "srt/arg_groups/fields").glob("*.py")):
        relpath = path.relative_to(_require_sglang()).as_posix()
        for name in _classes(relpath):
            fields |= _struct_fields(relpath, name)
    return fields


def tokenizer_manager_coroutine(method: str) -> list[str]:
    """Parameter names of the TokenizerManager coroutine `method` (defined on the class or a mixin)."""
    for relpath, class_name in (("srt/managers/tokenizer_manager.py", "TokenizerManager"),
                                ("srt/managers/tokenizer_control_mixin.py", "TokenizerControlMixin")):
        try:
            is_async, params = _method_params(relpath, class_name, method)
        except (AssertionError, KeyError):
            continue
        assert is_async, f"TokenizerManager.{method} is not a coroutine"
        return params
    raise AssertionError(f"sglang's TokenizerManager has no {method}")


# -- the test double -------------------------------------------------------------------------------------


class RecordedRequest(SimpleNamespace):
    """Stands in for an io_struct request struct: keeps the type name and the keyword arguments."""

    def __init__(self, type_name: str, **kwargs):
        super().__init__(type_name=type_name, kwargs=kwargs, **kwargs)


def recording_request_types() -> SimpleNamespace:
    return SimpleNamespace(**{name: (lambda n: lambda **kw: RecordedRequest(n, **kw))(name) for name in REQUEST_TYPES})


class RecordingTokenizerManager:
    def __init__(self, calls: list, fail: set[str]):
        self.calls, self.fail = calls, fail

    def __getattr__(self, method):
        async def record(*args):
            self.calls.append((method, args))
            if method == "flush_cache":
                return SimpleNamespace(success=method not in self.fail)
            return (method not in self.fail, f"{method} refused" if method in self.fail else "ok")

        return record


class RecordingEngine:
    """Test double of sglang.Engine: records calls; async_generate answers `outputs`."""

    def __init__(self, outputs=None, fail: set[str] = frozenset(), per_call: list | None = None, dp_size: int = 1):
        self.calls: list = []
        self.outputs = outputs
        self.per_call = list(per_call or [])  # answers of successive async_generate calls, when given
        self.server_args = SimpleNamespace(dp_size=dp_size)
        self.tokenizer_manager = RecordingTokenizerManager(self.calls, set(fail))

    async def async_generate(self, **kwargs):
        self.calls.append(("async_generate", kwargs))
        return self.per_call.pop(0) if self.per_call else self.outputs

    def _serialize_tensors_per_rank(self, tensors, load_format):
        self.calls.append(("_serialize_tensors_per_rank", (tensors, load_format)))
        return [b"rank0-payload"]

    def shutdown(self):
        self.calls.append(("shutdown", ()))


def output(token_ids, logprobs, finish="stop", version="0", text="t"):
    meta = {"finish_reason": {"type": finish}, "weight_version": version,
            "output_token_logprobs": [(lp, t, None) for lp, t in zip(logprobs, token_ids)]}
    return {"text": text, "output_ids": list(token_ids), "meta_info": meta}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


# -- generation ------------------------------------------------------------------------------------------

PARAMS = SamplingParams(n=2, temperature=0.8, top_p=0.95, top_k=-1, max_new_tokens=64, stop=("</answer>",), seed=7)


UNSEEDED = replace(PARAMS, seed=None)


def test_an_unseeded_prompt_is_one_request_with_n_and_its_images_per_prompt():
    image = Image.new("RGB", (28, 28))
    request = PromptRequest("q1", input_ids=[151644, 151655, 30], text="ignored", images=[image])
    engine = RecordingEngine(outputs=[output([5, 6, 7], [-0.1, -0.2, -0.3]),
                                      output([8], [-1.5], finish="length", version="4")])
    completions = run(SGLangBackend(engine, request_types=recording_request_types()).generate(request, UNSEEDED))
    [(name, kwargs)] = engine.calls
    assert name == "async_generate"
    assert kwargs == {
        "input_ids": [151644, 151655, 30],
        "image_data": [[image]],  # n > 1: SGLang makes a batch of one, so images go per prompt
        "return_logprob": True,
        "sampling_params": {"n": 2, "temperature": 0.8, "top_p": 0.95, "top_k": -1, "max_new_tokens": 64,
                            "stop": ["</answer>"]},
    }
    assert [c.token_ids.tolist() for c in completions] == [[5, 6, 7], [8]]
    np.testing.assert_array_equal(completions[0].logprobs, np.float32([-0.1, -0.2, -0.3]))
    assert [c.finish_reason for c in completions] == ["stop", "length"]
    assert [c.weight_version for c in completions] == [0, 4]


def test_a_seeded_prompt_is_one_request_per_sample_with_its_own_seed():
    from medvl_engine.rollout.types import derive_seed

    images = [Image.new("RGB", (28, 28)), Image.new("RGB", (56, 28))]
    request = PromptRequest("q1", input_ids=[151644, 151655, 151655, 30], images=images, seed=99)
    engine = RecordingEngine(per_call=[output([5], [-0.1]), output([8, 9], [-1.5, -0.5])])
    completions = run(SGLangBackend(engine, request_types=recording_request_types()).generate(request, PARAMS))
    calls = [kwargs for name, kwargs in engine.calls]
    assert [c["sampling_params"]["n"] for c in calls] == [1, 1]
    assert [c["sampling_params"]["sampling_seed"] for c in calls] == [derive_seed(99, 0), derive_seed(99, 1)]
    assert all(c["image_data"] == images for c in calls)  # one sample: the prompt's images as a list
    assert [c.token_ids.tolist() for c in completions] == [[5], [8, 9]]


@cache
def generate_req_input():
    """sglang's own GenerateReqInput class, compiled from the installed source (importing sglang needs its
    CUDA dependencies): its batch normalisation is the code that rejected our image_data with n > 1."""
    root = _require_sglang()
    relpath = "srt/managers/io_struct.py"
    node = _classes(relpath)["GenerateReqInput"]
    helper = next(n for n in ast.parse((root / "srt/multimodal/mm_utils.py").read_text()).body
                  if isinstance(n, ast.FunctionDef) and n.name == "has_valid_data")

    class Opaque:  # names the normalisation never uses (validators, type aliases)
        def __getattr__(self, name):
            return Opaque()

        def __call__(self, *args, **kwargs):
            return Opaque()

        def __getitem__(self, key):
            return Opaque()

    import copy as copy_module
    import dataclasses
    import typing
    import uuid
    import warnings
    from collections import Counter

    namespace = {"dataclass": dataclasses.dataclass, "field": dataclasses.field, "copy": copy_module, "uuid": uuid,
                 "warnings": warnings, "Counter": Counter, "Any": typing.Any, "Dict": dict,
                 "List": list, "Optional": typing.Optional, "Union": typing.Union,
                 "Annotated": typing.Annotated, "__name__": "sglang_generate_req_input"}
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    import builtins

    namespace.update({name: Opaque() for name in names
                      if name not in namespace and name[:1].isupper() and not hasattr(builtins, name)})
    namespace.update({name: Opaque() for name in ("decode_kv_hints_envelope", "get_return_hidden_states_mode",
                                                  "validate_optional_list_i64_1d_2d")})
    module = ast.fix_missing_locations(ast.Module(body=[helper, node], type_ignores=[]))
    # dont_inherit: this file's `from __future__ import annotations` would turn sglang's annotations into strings.
    exec(compile(module, str(root / relpath), "exec", dont_inherit=True), namespace)
    return namespace["GenerateReqInput"]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("images", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [None, 5])
def test_every_request_passes_sglangs_own_batch_normalisation(n, images, seed):
    from medvl_engine.rollout.sglang_backend import generate_calls

    request_type = generate_req_input()
    pictures = [Image.new("RGB", (28 * (k + 1), 28)) for k in range(images)]
    request = PromptRequest("q", input_ids=[1] + [151655] * images + [2], images=pictures, seed=seed)
    params = replace(UNSEEDED, n=n)
    calls = generate_calls(request, params)
    assert sum(c["sampling_params"]["n"] for c in calls) == n
    for kwargs in calls:
        req = request_type(**{k: v for k, v in kwargs.items()})
        req.normalize_batch_and_arguments()
        if images:  # every copy of the prompt keeps all its images
            data = req.image_data if req.is_single else req.image_data[0]
            assert list(data) == pictures
    # What the backend sent before: a flat image list with n > 1 and two or more images.
    if n > 1 and images >= 2:
        with pytest.raises(ValueError, match="image_data should be equal to the batch size"):
            flat = request_type(input_ids=[1, 2], image_data=pictures, sampling_params={"n": n})
            flat.normalize_batch_and_arguments()


def test_a_data_parallel_engine_is_refused():
    with pytest.raises(ValueError, match="dp_size=2"):
        SGLangBackend(RecordingEngine(dp_size=2), request_types=recording_request_types())


def test_releasing_memory_pauses_first_and_resuming_continues():
    engine = RecordingEngine()
    backend = SGLangBackend(engine, request_types=recording_request_types())
    run(backend.release_memory())
    run(backend.resume_memory())
    assert [name for name, _ in engine.calls] == ["pause_generation", "release_memory_occupation",
                                                   "resume_memory_occupation", "continue_generation"]


def test_text_prompts_and_single_outputs():
    kwargs = generate_kwargs(PromptRequest("q", text="hello"), SamplingParams(n=1, top_k=20, return_logprobs=False))
    assert kwargs["prompt"] == "hello" and "input_ids" not in kwargs and "image_data" not in kwargs
    assert kwargs["return_logprob"] is False and kwargs["sampling_params"]["top_k"] == 20
    assert "stop" not in kwargs["sampling_params"] and "sampling_seed" not in kwargs["sampling_params"]
    aborted = {"text": "x", "output_ids": [3], "meta_info": {"finish_reason": {"type": "abort"}}}
    engine = RecordingEngine(outputs=aborted)
    [completion] = run(SGLangBackend(engine, weight_version=2, request_types=recording_request_types()).generate(
        PromptRequest("q", text="hello"), SamplingParams(n=1, return_logprobs=False)))
    assert completion.finish_reason == "abort" and completion.logprobs is None and completion.weight_version == 2


def test_malformed_outputs_are_errors():
    backend = SGLangBackend(RecordingEngine(outputs=[output([1], [-1.0])]), request_types=recording_request_types())
    with pytest.raises(RuntimeError, match="1 outputs for n=2"):
        run(backend.generate(PromptRequest("q", input_ids=[1]), UNSEEDED))
    with pytest.raises(RuntimeError, match="unknown reason"):
        completion_from_output(output([1], [-1.0], finish="weird"), 0, "q")
    bad = output([1, 2], [-1.0, -2.0])
    bad["meta_info"]["output_token_logprobs"][1] = (-2.0, 9, None)
    with pytest.raises(RuntimeError, match="differ from output_ids"):
        completion_from_output(bad, 0, "q")


def test_generate_kwargs_match_the_installed_sglang():
    allowed = async_generate_params()
    kwargs = generate_kwargs(PromptRequest("q", input_ids=[1], images=[Image.new("RGB", (8, 8))]), PARAMS)
    assert set(kwargs) <= allowed
    assert "prompt" in allowed  # the text form
    assert set(sampling_params_for(PARAMS)) <= sampling_param_fields()


def test_a_requests_own_seed_overrides_the_shared_one():
    own = generate_kwargs(PromptRequest("q", input_ids=[1], seed=12345), PARAMS)["sampling_params"]
    shared = generate_kwargs(PromptRequest("q", input_ids=[1]), PARAMS)["sampling_params"]
    unseeded = replace(PARAMS, seed=None)
    only_own = generate_kwargs(PromptRequest("q", input_ids=[1], seed=0), unseeded)["sampling_params"]
    assert own["sampling_seed"] == 12345 and shared["sampling_seed"] == 7 and only_own["sampling_seed"] == 0
    assert "sampling_seed" in sampling_param_fields()
    with pytest.raises(ValueError, match="seed must be None or an int >= 0"):
        PromptRequest("q", input_ids=[1], seed=-1)


# -- weights, memory, pause ------------------------------------------------------------------------------


def test_weight_update_is_pause_update_flush_continue():
    engine = RecordingEngine()
    backend = SGLangBackend(engine, request_types=recording_request_types())
    tensors = [("model.embed_tokens.weight", np.zeros((2, 2), np.float32))]
    run(backend.update_weights_from_tensors(tensors, version=3))
    assert [name for name, _ in engine.calls] == ["_serialize_tensors_per_rank", "pause_generation",
                                                 "update_weights_from_tensor", "flush_cache", "continue_generation"]
    assert engine.calls[0][1] == (tensors, None)
    pause = engine.calls[1][1][0]
    assert pause.type_name == "PauseGenerationReqInput" and pause.kwargs == {"mode": "retract"}
    update, http_request = engine.calls[2][1]
    assert http_request is None and update.type_name == "UpdateWeightsFromTensorReqInput"
    assert update.kwargs == {"serialized_named_tensors": [b"rank0-payload"], "load_format": None,
                             "flush_cache": False, "weight_version": "3"}
    assert backend.weight_version == 3


def test_failed_update_raises_keeps_the_version_and_resumes():
    engine = RecordingEngine(fail={"update_weights_from_disk"})
    backend = SGLangBackend(engine, weight_version=1, request_types=recording_request_types())
    with pytest.raises(RuntimeError, match="update_weights_from_disk failed: update_weights_from_disk refused"):
        run(backend.update_weights_from_disk("/ckpt/step-2", version=2))
    assert backend.weight_version == 1
    assert [name for name, _ in engine.calls] == ["pause_generation", "update_weights_from_disk",
                                                 "continue_generation"]


def test_every_control_request_matches_the_installed_sglang():
    engine = RecordingEngine()
    backend = SGLangBackend(engine, request_types=recording_request_types())

    async def scenario():
        await backend.update_weights_from_tensors([("w", np.zeros(1))], version=1)
        await backend.update_weights_from_disk("/ckpt/step-2", version=2)
        await backend.init_weights_update_group("10.0.0.1", 29500, rank_offset=1, world_size=3)
        await backend.update_weights_from_distributed(["w"], ["bfloat16"], [[4, 4]], version=3)
        await backend.release_memory()
        await backend.resume_memory()
        with pytest.raises(ValueError, match="1 names, 2 dtypes"):
            await backend.update_weights_from_distributed(["w"], ["bfloat16", "float32"], [[1]], version=4)

    run(scenario())
    assert backend.weight_version == 3
    sent = [(name, args) for name, args in engine.calls if name not in ("_serialize_tensors_per_rank",)]
    methods = {name for name, _ in sent}
    assert methods == {"pause_generation", "continue_generation", "update_weights_from_tensor",
                       "update_weights_from_disk", "init_weights_update_group", "update_weights_from_distributed",
                       "flush_cache", "release_memory_occupation", "resume_memory_occupation"}
    distributed = next(args[0] for name, args in sent if name == "update_weights_from_distributed")
    assert distributed.kwargs["shapes"] == [[4, 4]] and distributed.kwargs["weight_version"] == "3"
    # Against the installed sglang: each request's fields exist, each method is a TokenizerManager coroutine
    # taking (obj[, request]).
    for name, args in sent:
        params = tokenizer_manager_coroutine(name)
        assert len(args) <= len(params) - 1, f"{name} takes {params}, we pass {len(args)} arguments"
        for arg in args:
            if isinstance(arg, RecordedRequest):
                assert set(arg.kwargs) <= request_fields(arg.type_name), arg.type_name


def test_engine_construction_and_serialisation_match_the_installed_sglang():
    fields = server_arg_fields()
    assert {"model_path", "weight_version", "tp_size", "mem_fraction_static"} <= fields
    assert _method_params("srt/entrypoints/engine.py", "Engine", "_serialize_tensors_per_rank")[1] == [
        "self", "tensors", "load_format"]
    for name in REQUEST_TYPES:
        assert name in _classes("srt/managers/io_struct.py"), name
    assert "mode" in request_fields("PauseGenerationReqInput")


def test_shutdown_and_health():
    engine = RecordingEngine(outputs=[output([1], [-0.5])])
    backend = SGLangBackend(engine, request_types=recording_request_types())
    assert run(backend.health()) is True
    engine.outputs = []
    assert run(backend.health()) is False
    run(backend.shutdown())
    assert engine.calls[-1][0] == "shutdown"
