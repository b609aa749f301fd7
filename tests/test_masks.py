"""Masks as users pass them: bool, or 0/1 in an integer or float dtype (verl's response_mask, TRL's
completion_mask), give the same result as the bool mask in every op that takes one; any other
value (a fraction, a 2, a NaN) is a ValueError saying how many and where, before any kernel."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast

from numerics import random_mask

B, T, V, H = 3, 7, 23, 8
DTYPES = [torch.int64, torch.int32, torch.uint8, torch.float32, torch.bfloat16, torch.float64]


def ops():
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    logp, old, ref, values, returns = (torch.randn(B, T) - 2 for _ in range(5))
    scores, adv = torch.randn(B), torch.randn(B, T)
    return {
        "policy_loss": lambda m: rlhf_fast.policy_loss(logp, old, adv, m, ref_logp=ref, kl_coef=0.1)[0],
        "policy_loss[gspo]": lambda m: rlhf_fast.policy_loss(logp, old, adv, m, objective="gspo")[0],
        "fused_policy_loss": lambda m: rlhf_fast.fused_policy_loss(logits, labels, old, adv, m)[0],
        "fused_linear_policy_loss": lambda m: rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old, adv, m)[0],
        "value_loss": lambda m: rlhf_fast.value_loss(values, old, returns, m, clip_eps=0.2),
        "kl_penalized_rewards": lambda m: rlhf_fast.kl_penalized_rewards(logp, ref, scores, m, beta=0.1),
        "gae": lambda m: rlhf_fast.gae(logp, values, m)[0],
        "whiten": lambda m: rlhf_fast.whiten(values, m),
        "ppo_advantages": lambda m: rlhf_fast.ppo_advantages(logp, ref, scores, values, m, beta=0.1).advantages,
        "loss_normalizer": lambda m: rlhf_fast.loss_normalizer(m, "seq-mean-token-mean"),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_and_float_masks_equal_the_bool_mask(dtype):
    mask = random_mask(B, T, "mixed")
    for name, op in ops().items():
        assert torch.equal(op(mask.to(dtype)), op(mask)), name


@pytest.mark.parametrize("bad", [0.5, 2.0, float("nan"), -1.0])
def test_other_values_are_named(bad):
    mask = random_mask(B, T, "mixed").float()
    mask[1, 3], mask[2, 5] = bad, bad
    for name, op in ops().items():
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(or be bool\); 2 of 21 values are neither, "
                                             r"the first .* at index \(1, 3\)"):  # fmt: skip
            op(mask)
