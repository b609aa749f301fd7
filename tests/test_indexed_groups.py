"""group_advantages over an arbitrary index (verl's form) vs reference.indexed_group_advantages:
unequal groups in any order, singletons, unscorable (NaN) scores, pass@k and OPO."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.choices import GROUP_MODES, INDEXED_GROUP_MODES

from numerics import rel_err


def indexed_case(groups=6, nan_rows=3, dtype=torch.int64):
    """Shuffled group ids with sizes from 1 up (group 0 is always a singleton), scores with ties
    and a few NaNs (one of them in a group of two, which leaves a group of one scorable row)."""
    sizes = torch.randint(1, 7, (groups,))
    sizes[0] = 1
    sizes[1] = 2
    ids = torch.repeat_interleave(torch.arange(groups), sizes)
    ids = ids[torch.randperm(ids.numel())]
    index = (1000 * ids - 7).to(dtype)  # arbitrary values, negative ones included
    scores = torch.randn(index.numel()).round(decimals=1)  # rounding makes ties
    pair = (ids == 1).nonzero().flatten()
    scores[pair[0]] = float("nan")
    others = torch.randperm(index.numel())[:nan_rows]
    scores[others[ids[others] != 0]] = float("nan")
    lengths = torch.randint(1, 40, (index.numel(),))
    return scores, index, lengths


def grad_budget(scores, index, upstream, mode) -> torch.Tensor:
    """Per row, the float32 error its gradient may carry: each group's terms are about
    sum |upstream| (centring), over std where the mode divides by it (the std's derivative,
    from deviations s - mean that lose digits as max |s| / std); pass@k divides by the gap
    max - second max besides."""
    eps32 = torch.finfo(torch.float32).eps
    budget = torch.zeros_like(scores, dtype=torch.float64)
    for key in index.unique():
        rows = (index == key) & scores.isfinite()
        s = scores[rows].double()
        if s.numel() < 2:
            continue
        size = float(upstream[rows].abs().sum())
        if mode in ("grpo", "passk"):  # the modes that divide by the std
            std = float(s.std()) or 1.0
            size *= (1 + float(s.abs().max()) / std) / std
        if mode == "passk":
            top = s.topk(2).values
            size *= max(1.0, std / float(top[0] - top[1]))
        budget[rows] = 16 * eps32 * size
    return budget


@pytest.mark.parametrize("mode", INDEXED_GROUP_MODES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_reference(mode, index_dtype):
    scores, index, lengths = indexed_case(dtype=index_dtype)
    if mode == "passk":
        # max and second max of tied scores have many subgradients (torch picks differently in
        # a scatter and in .max()): untied scores here; ties in value are
        # test_pass_at_k_rewards_the_first_best_row_only's.
        scores = torch.where(scores.isnan(), scores, torch.randn_like(scores))
    opo_lengths = lengths if mode == "opo" else None
    x = scores.clone().requires_grad_(True)
    got = rlhf_fast.group_advantages(x, index=index, mode=mode, lengths=opo_lengths)
    y = scores.double().requires_grad_(True)
    want = reference.indexed_group_advantages(y, index, mode=mode, lengths=opo_lengths)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5, (got, want)
    upstream = torch.randn_like(scores)
    (got * upstream).sum().backward()
    (want * upstream.double()).sum().backward()
    assert torch.isfinite(x.grad).all()
    # torch's std has no derivative at 0 (NaN in the float64 reference): groups of equal scores
    # are compared in value only.
    defined = torch.isfinite(y.grad)
    error = (x.grad.double() - y.grad)[defined].abs()
    allowed = (1e-6 * y.grad.abs() + grad_budget(scores, index, upstream, mode))[defined]
    assert (error <= allowed).all(), (error - allowed).max()
    unscorable = scores.isnan()
    assert (got[unscorable] == 0).all() and (x.grad[unscorable] == 0).all()


@pytest.mark.parametrize("mode", GROUP_MODES)
def test_contiguous_index_equals_group_size(mode):
    """index = row // G is the contiguous case that the kernels compute."""
    scores = torch.randn(24)
    got = rlhf_fast.group_advantages(scores, index=torch.arange(24) // 4, mode=mode)
    assert rel_err(got, rlhf_fast.group_advantages(scores, 4, mode=mode)) < 1e-6


@pytest.mark.parametrize("mode", ["passk", "opo"])
def test_group_size_form_of_the_index_modes(mode):
    scores, lengths = torch.randn(12), torch.randint(1, 30, (12,))
    opo_lengths = lengths if mode == "opo" else None
    got = rlhf_fast.group_advantages(scores, 3, mode=mode, lengths=opo_lengths)
    want = reference.indexed_group_advantages(scores.double(), torch.arange(12) // 3, mode=mode, lengths=opo_lengths)
    assert rel_err(got, want) < 1e-6


def test_pass_at_k_gradient_of_a_second_best_tied_at_zero():
    """Binary rewards tie the second best at 0: the tied rows share its gradient, as in the float64
    reference, on every call (the group reduction once started from uninitialised memory, and
    torch's backward of scatter_reduce let a 0 there take a share too)."""
    scores = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    index = torch.tensor([3, 3, 3, 8, 8, 8, 8])
    y = scores.double().requires_grad_(True)
    reference.indexed_group_advantages(y, index, mode="passk").sum().backward()
    for _ in range(5):
        torch.zeros(64).sum()  # what the allocator may hand out next
        x = scores.clone().requires_grad_(True)
        rlhf_fast.group_advantages(x, index=index, mode="passk").sum().backward()
        assert rel_err(x.grad, y.grad) < 1e-5, (x.grad, y.grad)


def test_pass_at_k_rewards_the_first_best_row_only():
    scores = torch.tensor([0.0, 1.0, 1.0, 0.5, 2.0, 2.0, 2.0])
    index = torch.tensor([5, 5, 5, 5, 9, 9, 9])
    got = rlhf_fast.group_advantages(scores, index=index, mode="passk")
    std = scores[:4].std()
    assert got.tolist() == pytest.approx([0.0, 0.0 / (std + 1e-6), 0.0, 0.0, 0.0, 0.0, 0.0])
    scores[1] = 1.5
    got = rlhf_fast.group_advantages(scores, index=index, mode="passk")
    assert got[1].item() == pytest.approx(0.5 / (scores[:4].std().item() + 1e-6), rel=1e-6)
    assert (got[[0, 2, 3]] == 0).all()


def test_opo_baseline_is_length_weighted():
    scores, lengths = torch.tensor([1.0, 0.0]), torch.tensor([3, 1])
    got = rlhf_fast.group_advantages(scores, index=torch.zeros(2, dtype=torch.int64), mode="opo", lengths=lengths)
    assert got.tolist() == pytest.approx([0.25, -0.75])


@pytest.mark.parametrize("mode", INDEXED_GROUP_MODES)
def test_no_host_sync(mode):
    """The index path never reads a value on the host (torch.unique would, to size its output):
    on the meta device, which holds no values, any .item() / .tolist() / data-dependent shape fails."""
    scores, index = torch.randn(10, device="meta"), torch.zeros(10, dtype=torch.int64, device="meta")
    lengths = torch.ones(10, device="meta") if mode == "opo" else None
    assert rlhf_fast.group_advantages(scores, index=index, mode=mode, lengths=lengths).shape == (10,)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(), ValueError, "exactly one of group_size"),
        (dict(group_size=2, index=torch.zeros(6, dtype=torch.int64)), ValueError, "exactly one of group_size"),
        (dict(index=torch.zeros(5, dtype=torch.int64)), ValueError, r"index must have shape \(6,\)"),
        (dict(index=torch.zeros(6)), TypeError, "index must have dtype"),
        (dict(group_size=3, mode="opo"), ValueError, "pass lengths"),
        (dict(group_size=3, lengths=torch.ones(6)), ValueError, "lengths is the response lengths of mode='opo'"),
        (dict(group_size=1, mode="passk"), ValueError, "group_size must be >= 2"),
        (dict(group_size=3, mode="best"), ValueError, "mode must be one of"),
    ],
)
def test_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        rlhf_fast.group_advantages(torch.randn(6), **kwargs)
