"""Benchmarks of rlhf_fast: one script per op family (``bench_<op>.py``) on the shared ``harness``.

Run a script directly (``python bench/bench_logprobs.py --help``) or as a module
(``python -m bench.bench_logprobs``); results land in ``bench/results/`` with device, date and commit.
``pytest bench/ --benchmark-only`` runs the small pytest-benchmark entries (not part of ``tests/``).
"""
