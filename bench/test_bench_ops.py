"""pytest-benchmark entries for the hot ops on small CPU shapes, through the suite's cases.

    pytest bench/ --benchmark-only            (not collected by `pytest tests/`)

fused_policy_loss (every registered objective and rollout correction), the fused linear head, GAE and the PPO advantage pipeline, group advantages and
the pairwise loss: every implementation the suite knows except torch.compile (a compile per entry
is minutes on a CPU). Each entry checks its result against the float64 oracle first, with the
suite's rule: one of ours out of tolerance fails the entry, a baseline is timed and flagged in
extra_info. token_logprobs has its own entries in test_bench_logprobs.py.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.bench.bench_advantages import GAECase, GroupAdvantagesCase, PPOAdvantagesCase
from rlhf_fast.bench.bench_fused_linear import LinearCase, LinearPolicyCase
from rlhf_fast.bench.bench_pairwise import PairwiseCase
from rlhf_fast.bench.bench_policy_loss import PolicyLossCase

DEVICE = torch.device("cpu")
CASES = {
    "policy_loss": (PolicyLossCase, {"B": 1, "T": 256, "V": 32000}),
    "linear_logprobs": (LinearCase, {"N": 128, "H": 256, "V": 32000}),
    "linear_policy_loss": (LinearPolicyCase, {"N": 128, "H": 256, "V": 32000}),
    "gae": (GAECase, {"B": 64, "T": 1024}),
    "ppo_advantages": (PPOAdvantagesCase, {"B": 64, "T": 1024}),
    "group_advantages": (GroupAdvantagesCase, {"B": 1024, "G": 16}),
    "pairwise": (PairwiseCase, {"B": 512}),
}


def _case(op: str):
    cls, dims = CASES[op]
    return cls(dims, torch.float32, DEVICE, ("headline",))


def _entries():
    for op in CASES:
        case = _case(op)
        for impl in case.implementations():
            if impl.name.startswith("compile"):
                continue
            for mode in (m for m in case.modes if m in impl.modes):  # per-objective rows: fwd+bwd only
                yield pytest.param(op, impl.name, mode, id=f"{op}-{impl.name}-{mode}")


@pytest.mark.parametrize("op,impl_name,mode", list(_entries()))
def test_op(benchmark, op, impl_name, mode):
    case = _case(op)
    impls = {impl.name: impl for impl in case.implementations()}
    impl = impls[impl_name]
    if impl.skip is not None:
        pytest.skip(f"{impl_name} on cpu: {impl.skip}")
    inputs = case.make_inputs(1)
    expected = case.oracle(inputs)
    with_grad = mode == "fwd+bwd"
    eager = case.check(impls["eager"], impls["eager"].make(), inputs, expected, None, with_grad)
    fn = impl.make()
    target = case.inputs_for(impl, inputs)
    problem = case.check(impl, fn, target, expected, eager, with_grad).problem(mode)
    assert problem is None or not impl.ours, f"{op} {impl_name} {mode}: {problem}"
    benchmark.extra_info.update(op=op, impl=impl_name, mode=mode, dims=case.dims, inexact=problem)
    benchmark(case.step(fn, target, mode), 0)


def test_profile_ops_smoke(tmp_path):
    """profile_ops.py (gpu_check.sh's profile step) runs on a CPU and writes its report: a plain test, no benchmark."""
    from rlhf_fast.bench import profile_ops

    assert profile_ops.main(["--device", "cpu", "--out", str(tmp_path), "--cases", "ppo", "--calls", "1"]) == 0
    report = (tmp_path / "profile.txt").read_text()
    assert "host: ppo fwd+bwd (one-kernel)" in report and "torch: ppo fwd (no_grad)" in report
    assert "ATen ops by count per call" in report and list(tmp_path.glob("trace-*.json.gz"))
