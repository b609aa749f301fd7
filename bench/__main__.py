"""``python -m rlhf_fast.bench``: the benchmark suite (bench/suite.py); ``rlhf-fast bench`` runs the same."""

import sys

from .suite import main

sys.exit(main())
