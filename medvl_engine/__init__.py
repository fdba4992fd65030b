"""medvl-engine: generate, score and learn from answers of medical vision-language models, fast.

The core package holds the data schema and loaders (`medvl_engine.data`), MedVLThinker's prompt
layout (`medvl_engine.prompts`) and the batched answer scorer (`medvl_engine.rewards`, backed by the
C++ extension `medvl_engine._native`). Kernels, trainers and evaluations live in the subpackages
`medvl_engine.kernels`, `medvl_engine.trainers` and `medvl_engine.evals`.

Importing this package does no work and never imports GPU-only packages.
"""

__version__ = "0.1.0"
