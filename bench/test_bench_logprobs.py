"""pytest-benchmark entries for token_logprobs on small CPU shapes: each backend and the eager baseline.

    pytest bench/ --benchmark-only            (not collected by `pytest tests/`)

Each entry first checks its result against the float64 reference on the same inputs, so a fast
wrong implementation fails instead of reporting a time. The full comparison (GPU shapes, bandwidth,
memory, torch.compile) is the driver's: python -m rlhf_fast.bench --ops logprobs,logprobs_entropy.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.bench import bench_logprobs as bl
from rlhf_fast.bench.case import MODES
from rlhf_fast.backends.registry import BACKENDS

SHAPES = [(64, 32000), (256, 4096)]
IMPLS = ["eager"] + [f"backend={name}" for name in BACKENDS]
DEVICE = torch.device("cpu")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", bl.FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_logprobs(benchmark, shape, impl, family, mode):
    reason = bl.unavailable(impl, DEVICE, torch.float32)
    if reason:
        pytest.skip(f"{impl} on cpu/float32: {reason}")
    inputs = bl.make_inputs(*shape, torch.float32, DEVICE)
    fn = bl.implementation(impl, family)
    report = bl.verify(fn, inputs, bl.expected_values(inputs, [family]), family, with_grad=mode == "fwd+bwd")
    problem = report["problem"] or (report["grad_problem"] if mode == "fwd+bwd" else None)
    assert problem is None, f"{impl} {family} {mode}: {problem}"
    benchmark.extra_info.update(impl=impl, family=family, mode=mode, shape=list(shape))
    step = bl.Step(fn, inputs, mode)
    benchmark(step, 0)
