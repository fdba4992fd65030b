"""medvl-engine: generate, score and learn from answers of medical vision-language models, fast.

The core package holds the data schema and loaders (`medvl_engine.data`), MedVLThinker's prompt
layout (`medvl_engine.prompts`) and the batched answer scorer (`medvl_engine.rewards`, backed by the
C++ extension `medvl_engine._native`). Kernels, trainers and evaluations live in the subpackages
`medvl_engine.kernels`, `medvl_engine.trainers` and `medvl_engine.evals`.

The Python API (`medvl_engine.api`) is importable from here:

    from medvl_engine import score, evaluate, passrate, curate

Importing this package does no work and never imports GPU-only packages: the names below load their
modules on first use.
"""

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first read
_LAZY = {
    "score": "medvl_engine.api",
    "evaluate": "medvl_engine.api",
    "passrate": "medvl_engine.api",
    "curate": "medvl_engine.api",
    "ScoreResult": "medvl_engine.api",
    "EvalRun": "medvl_engine.api",
    "PassrateRun": "medvl_engine.api",
    "EvalConfig": "medvl_engine.evals.evaluate",
    "PassrateConfig": "medvl_engine.evals.passrate",
    "CurateConfig": "medvl_engine.evals.curate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
