"""Benchmark evaluation, pass-rate estimation and difficulty curation on the rollout pool."""
