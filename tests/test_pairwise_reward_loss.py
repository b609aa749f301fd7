"""pairwise_reward_loss (Bradley-Terry) vs the float64 reference, stats, module and validation."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference

from numerics import rel_err


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(margin, center_coef, dtype):
    chosen, rejected = (torch.randn(33) * 3).to(dtype), (torch.randn(33) * 3).to(dtype)
    chosen[0] = 40.0  # far in the saturated region of log sigmoid
    rejected[1] = 40.0
    if margin == "tensor":
        margin = torch.rand(33)
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    loss, stats = rlhf_fast.pairwise_reward_loss(c, r, margin=margin, center_coef=center_coef)
    loss.backward()
    c64, r64 = chosen.double().requires_grad_(True), rejected.double().requires_grad_(True)
    m64 = margin.double() if isinstance(margin, torch.Tensor) else margin
    want, want_stats = reference.pairwise_reward_loss(c64, r64, margin=m64, center_coef=center_coef)
    want.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(want.item(), rel=2e-5)
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to the inputs' dtype
    assert rel_err(c.grad, c64.grad) < tol and rel_err(r.grad, r64.grad) < tol
    # The margin stat is a mean of differences of both signs: its float32 error scales with their size.
    scale = (c64 - r64).abs().mean().item()
    for key in ("accuracy", "margin"):
        assert stats[key].dtype == torch.float32 and not stats[key].requires_grad
        assert stats[key].item() == pytest.approx(want_stats[key].item(), rel=1e-5, abs=1e-6 * scale)


def test_stats_values_and_module():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, stats = rlhf_fast.pairwise_reward_loss(chosen, rejected)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == pytest.approx(1.5)
    module = rlhf_fast.nn.PairwiseRewardLoss(margin=0.3, center_coef=0.1)
    got, _ = module(chosen, rejected)
    want, _ = rlhf_fast.pairwise_reward_loss(chosen, rejected, margin=0.3, center_coef=0.1)
    assert torch.equal(got, want) and "margin=0.3" in repr(module)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda c: rlhf_fast.pairwise_reward_loss(c, c[:3]), r"rejected must have shape \(4,\)"),
        (lambda c: rlhf_fast.pairwise_reward_loss(c[:0], c[:0]), r"chosen must have shape \[B\] with B >= 1"),
        (lambda c: rlhf_fast.pairwise_reward_loss(c[None], c[None]), r"chosen must have shape \[B\]"),
        (lambda c: rlhf_fast.pairwise_reward_loss(c, c, margin=c[:2]), r"margin must have shape \(4,\)"),
        (lambda c: rlhf_fast.pairwise_reward_loss(c, c, center_coef=-1.0), "center_coef must be a finite number >= 0"),
    ],
)
def test_bad_inputs(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(torch.randn(4))
