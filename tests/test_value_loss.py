"""value_loss vs the float64 reference: clipped and unclipped, every agg, masked NaN, validation."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference

from numerics import MASK_PATTERNS, poison, random_mask, rel_err

AGGS = reference.AGG_MODES


def value_case(rows=6, tokens=11, pattern="mixed"):
    mask = random_mask(rows, tokens, pattern)
    old = torch.randn(rows, tokens)
    values = old + 0.4 * torch.randn(rows, tokens)  # inside and outside a 0.2 clip range
    returns = torch.randn(rows, tokens)
    values = off_the_kinks(values, old, returns)
    return poison(values, mask), poison(old, mask), poison(returns, mask), mask


def off_the_kinks(values, old, returns, clip_eps=0.2, gap=1e-3):
    """values redrawn where the clipped loss's gradient jumps: at |v - old| = eps, and where the clipped
    and unclipped terms tie. float32 and float64 may land on two sides of a kink within an ulp of it."""
    while True:
        moved = values - old
        clipped = old + moved.clamp(-clip_eps, clip_eps)
        outside = moved.abs() > clip_eps
        near = ((moved.abs() - clip_eps).abs() < gap) | (
            outside & (((values - returns) ** 2 - (clipped - returns) ** 2).abs() < gap))
        if not near.any():
            return values
        values = torch.where(near, old + 0.4 * torch.randn_like(values), values)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("pattern", MASK_PATTERNS)
def test_matches_reference(agg, clip_eps, pattern):
    values, old, returns, mask = value_case(pattern=pattern)
    upstream = torch.randn(()).item()
    x = values.clone().requires_grad_(True)
    loss = rlhf_fast.value_loss(x, old, returns, mask, clip_eps=clip_eps, agg=agg)
    (loss * upstream).backward()
    y = values.double().requires_grad_(True)
    want = reference.value_loss(y, old.double(), returns.double(), mask, clip_eps=clip_eps, agg=agg)
    (want * upstream).backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=2e-5, abs=1e-7)
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert rel_err(x.grad, y.grad) < 2e-5


def test_clipping_zeroes_gradient_where_clipped_term_wins():
    values, old, returns = torch.tensor([[2.0, 0.05]]), torch.zeros(1, 2), torch.tensor([[3.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # token 0: v moved 2 from old, clipped to 0.2: (0.2 - 3)^2 > (2 - 3)^2, constant in v; token 1 inside
    x = values.clone().requires_grad_(True)
    loss = rlhf_fast.value_loss(x, old, returns, mask, clip_eps=0.2, agg="seq-mean-token-sum")
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (2.8**2 + 0.05**2))
    assert x.grad[0, 0] == 0 and x.grad[0, 1] == pytest.approx(0.05)


@pytest.mark.parametrize("agg", AGGS)
def test_no_valid_token_and_accumulation(agg):
    values, old, returns, mask = value_case(rows=8)
    empty = torch.zeros_like(mask)
    x = values.clone().requires_grad_(True)
    loss = rlhf_fast.value_loss(x, old, returns, empty, clip_eps=0.2, agg=agg)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()

    full = rlhf_fast.value_loss(values, old, returns, mask, clip_eps=0.2, agg=agg)
    splits = [slice(0, 3), slice(3, 4), slice(4, 8)]
    total = rlhf_fast.global_loss_normalizer([mask[s] for s in splits], agg)
    parts = [rlhf_fast.value_loss(values[s], old[s], returns[s], mask[s], clip_eps=0.2, agg=agg, normalizer=total) for s in splits]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-5, abs=1e-7)


def test_module():
    module = rlhf_fast.nn.ValueLoss(clip_eps=0.1, agg="seq-mean-token-mean")
    values, old, returns, mask = value_case()
    assert torch.equal(module(values, old, returns, mask), rlhf_fast.value_loss(values, old, returns, mask, clip_eps=0.1, agg="seq-mean-token-mean"))
    assert "clip_eps=0.1" in repr(module)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda v, m: rlhf_fast.value_loss(v, v[:, :2], v, m), r"old_values must have shape \(3, 4\)"),
        (lambda v, m: rlhf_fast.value_loss(v, v, v[:1], m), r"returns must have shape \(3, 4\)"),
        (lambda v, m: rlhf_fast.value_loss(v, v, v, m[:, :1]), r"mask must have shape \(3, 4\)"),
        (lambda v, m: rlhf_fast.value_loss(v, v, v, m, clip_eps=0.0), "clip_eps must be a finite number > 0"),
        (lambda v, m: rlhf_fast.value_loss(v, v, v, m, agg="sum"), "agg must be one of"),
        (lambda v, m: rlhf_fast.value_loss(v[0], v[0], v[0], m[0]), r"values must have shape \[B, T\]"),
    ],
)
def test_bad_inputs(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
