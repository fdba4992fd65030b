"""Benchmark evaluation, pass-rate estimation and difficulty curation on the rollout pool.

The files, in the order data meets them:

- `runner.py`    questions -> prompts -> RolloutPool -> one results line per finished question
- `results.py`   the append-only, resumable results file (MedVLThinker's eval_results.jsonl layout)
- `manifest.py`  `manifest.json`: what produced a run folder; refuses to resume with other settings
- `metrics.py`   accuracy, pass@n, majority@n, no-parse rate in every parser mode, over repeats
- `evaluate.py`  `medvl-engine eval`
- `passrate.py`  `medvl-engine passrate` (pass counts of n samples, histogram)
- `curate.py`    `medvl-engine curate` (keep a pass-count band, order by difficulty, save a dataset)
- `report.py`    `medvl-engine report` (tables, runs side by side, MedVLThinker's published rows)
- `curves.py`    a training run's curves (`curves.png`) and its table per step
- `timeline.py`  a GRPO run's `timeline.jsonl` as `timeline.png`, with the overlap of generation and training
- `reference_results.json`  MedVLThinker's published accuracy tables, with their source
"""
