"""The agg modes' normalisers: token-sum, Dr. GRPO's constant length, and the global normaliser
of micro-batches on several ranks (torch.distributed, gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.choices import AGG_MODES
from rlhf_fast.ops.aggregate import aggregate, aggregate_weights

from numerics import random_mask, rel_err, tolerance


def per_token_case(rows=6, tokens=9):
    mask = random_mask(rows, tokens, "mixed")
    return torch.randn(rows, tokens), mask


def test_token_sum_is_the_masked_sum():
    loss, mask = per_token_case()
    logp = torch.randn_like(loss) - 2
    got, _ = rlhf_fast.policy_loss(logp, logp.detach(), loss, mask, agg="token-sum", clip_eps=None)
    # REINFORCE at ratio 1: the per-token loss is -A.
    terms = torch.where(mask, loss.double(), 0.0)
    # Advantages of both signs can cancel to ~0; a float32 sum errs relative to the terms' sizes.
    assert abs(got.item() + terms.sum().item()) <= tolerance(torch.float32) * terms.abs().sum().item()


@pytest.mark.parametrize("length", [None, 5, 64])
def test_dr_grpo_constant_length(length):
    """seq-mean-token-sum-norm divides by B * max_response_length, as TRL's dr_grpo divides by
    B * max_completion_length, whatever the padded T."""
    adv, mask = per_token_case(rows=5, tokens=9)
    logp = -torch.rand(5, 9)
    old_logp = logp + 0.05 * torch.randn(5, 9)
    options = dict(agg="seq-mean-token-sum-norm", max_response_length=length)
    got, _ = rlhf_fast.policy_loss(logp, old_logp, adv, mask, **options)
    want, _ = reference.policy_loss(logp.double(), old_logp.double(), adv.double(), mask, **options)
    assert rel_err(got, want) < 2e-5
    ratio = (logp - old_logp).double().exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    trl = torch.where(mask, per_token, 0.0).sum() / (5 * (9 if length is None else length))
    assert rel_err(got, trl) < 2e-5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(agg="token-mean", max_response_length=8), "applies to agg='seq-mean-token-sum-norm' only"),
        (dict(agg="seq-mean-token-sum-norm", max_response_length=0), "max_response_length must be None or an int >= 1"),
        (dict(agg="seq-mean-token-sum-norm", max_response_length=True), "max_response_length must be None or an int >= 1"),
        (dict(agg="seq-mean-token-sum-norm", max_response_length=8.0), "max_response_length must be None or an int >= 1"),
    ],
)
def test_max_response_length_validation(options, message):
    with pytest.raises(ValueError, match=message):
        rlhf_fast.PolicyLossOptions(**options)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aggregate_weights_equal_autograd_bit_for_bit(agg, dtype):
    """The one-kernel fused loss's token weights (aggregate_weights, no graph) are aggregate's
    autograd gradient exactly, for every kind of normaliser (own, number, 0-d or [1] tensors of
    another dtype, an int tensor) and mask (empty rows, an empty batch)."""
    normalizers = [None, 13.7, 7, torch.tensor(29.3), torch.tensor([0.3], dtype=torch.float64), torch.tensor(11)]
    lengths = [None, 37] if agg == "seq-mean-token-sum-norm" else [None]
    for seed in range(20):
        torch.manual_seed(seed)
        rows, tokens = 1 + seed % 7, 1 + 3 * seed
        mask = random_mask(rows, tokens, "mixed") if seed else torch.zeros(rows, tokens, dtype=torch.bool)
        for normalizer in normalizers:
            for length in lengths:
                x = torch.zeros(mask.shape, dtype=dtype, requires_grad=True)
                expected = torch.autograd.grad(aggregate(x, mask, agg, normalizer, length), x)[0]
                got = aggregate_weights(mask, agg, normalizer, length, dtype)
                assert got.dtype == expected.dtype
                bits = (t.view(-1).view(torch.uint8) for t in (got, expected))
                assert torch.equal(*bits), (normalizer, length)


def test_global_normalizer_of_micro_batches():
    _, mask = per_token_case(rows=7, tokens=5)
    parts = [mask[:2], mask[2:3], mask[3:]]
    assert rlhf_fast.global_loss_normalizer(parts, "token-mean").item() == mask.sum().item()
    assert rlhf_fast.global_loss_normalizer(parts, "seq-mean-token-sum").item() == 7
    norm = rlhf_fast.global_loss_normalizer(parts, "seq-mean-token-sum-norm", max_response_length=12)
    assert norm.item() == 7 * 12
    assert rlhf_fast.global_loss_normalizer(parts, "token-sum").item() == 1
    with pytest.raises(ValueError, match="masks must name at least one"):
        rlhf_fast.global_loss_normalizer([], "token-mean")


AGGS_ACROSS_RANKS = ("token-mean", "seq-mean-token-mean", "token-sum")


def _rank_normalizers(rank, world, init_file, masks, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = masks[rank]
        out[rank] = [rlhf_fast.global_loss_normalizer([mine[:1], mine[1:]], agg).item() for agg in AGGS_ACROSS_RANKS]
    finally:
        dist.destroy_process_group()


def test_global_normalizer_across_ranks(tmp_path):
    """Every rank gets the normaliser of the union of all ranks' micro-batches. The ranks are forked (a
    spawn would import torch again: 15 s of a 16 s test)."""
    masks = [random_mask(3, 6, "mixed"), random_mask(4, 6, "holes")]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_normalizers, args=(2, str(tmp_path / "init"), masks, out), nprocs=2, start_method="fork")
        got = dict(out)
    union = torch.cat(masks)
    want = [1.0 if agg == "token-sum" else rlhf_fast.loss_normalizer(union, agg).item() for agg in AGGS_ACROSS_RANKS]
    assert got == {0: want, 1: want}
