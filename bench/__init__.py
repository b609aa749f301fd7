"""Benchmarks of rlhf_fast: the suite (``python -m bench``, ``rlhf-fast bench``; ``suite.py``) and one
script per op family (``bench_<op>.py``) on the shared ``harness``.

Run a script directly (``python bench/bench_logprobs.py --help``) or as a module
(``python -m bench.bench_logprobs``); results land in ``bench/results/`` with device, date and commit.
``pytest bench/ --benchmark-only`` runs the small pytest-benchmark entries (not part of ``tests/``).
Installed, this package is ``rlhf_fast.bench`` (its modules import each other relatively).
"""
