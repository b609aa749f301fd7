"""One options object per group: PolicyLossOptions and LinearOptions flow through the reference, the
ops and the nn modules; flat keyword arguments are sugar for their fields, taken in one place."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.options import LinearOptions, PolicyLossOptions

from numerics import random_mask

B, T, V, H = 3, 6, 41, 8


def policy_inputs():
    mask = random_mask(B, T)
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    logp = reference.token_logprobs(logits, labels)
    old_logp, ref_logp = logp + 0.3 * torch.randn(B, T), logp + 0.3 * torch.randn(B, T)
    return logits, labels, logp, old_logp, torch.randn(B, T), mask, ref_logp


OPTIONS = PolicyLossOptions(clip_eps=0.1, clip_eps_high=0.3, dual_clip=2.5, kl_coef=0.2, kl_estimator="k2",
                            agg="seq-mean-token-sum")  # fmt: skip
FLAT = dataclasses.asdict(OPTIONS)


def test_options_object_equals_flat_keywords_in_every_layer():
    logits, labels, logp, old_logp, adv, mask, ref_logp = policy_inputs()
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    calls = [
        lambda **kw: rlhf_fast.policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, **kw),
        lambda **kw: reference.policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, **kw),
        lambda **kw: rlhf_fast.fused_policy_loss(logits, labels, old_logp, adv, mask, ref_logp=ref_logp, **kw),
        lambda **kw: reference.fused_policy_loss(logits, labels, old_logp, adv, mask, ref_logp=ref_logp, **kw),
        lambda **kw: rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old_logp, adv, mask, ref_logp=ref_logp, **kw),
        lambda **kw: rlhf_fast.nn.PolicyLoss(**kw)(logp, old_logp, adv, mask, ref_logp),
        lambda **kw: rlhf_fast.nn.FusedPolicyLoss(**kw)(logits, labels, old_logp, adv, mask, ref_logp),
        lambda **kw: rlhf_fast.nn.FusedLinearPolicyLoss(**kw)(hidden, weight, labels, old_logp, adv, mask, ref_logp=ref_logp),
    ]
    for call in calls:
        by_object, stats = call(options=OPTIONS)
        by_keywords, _ = call(**FLAT)
        default, _ = call()
        assert torch.equal(by_object, by_keywords) and "clipfrac" in stats
        assert not torch.equal(by_object, default)  # the options were applied
        overridden, _ = call(options=OPTIONS, agg="token-mean")  # a keyword overrides the object's field
        assert torch.equal(overridden, call(**{**FLAT, "agg": "token-mean"})[0])


def test_modules_hold_the_validated_objects_and_show_their_fields():
    module = rlhf_fast.nn.FusedLinearPolicyLoss(options=OPTIONS, chunk_size=4, entropy_coef=0.01)
    assert module.options is OPTIONS and module.linear == LinearOptions(chunk_size=4)
    assert "kl_estimator='k2'" in repr(module) and "chunk_size=4" in repr(module) and "entropy_coef=0.01" in repr(module)
    assert rlhf_fast.nn.LinearSFTLoss(linear=LinearOptions(accum_dtype=None)).linear.accum_dtype is None


def test_linear_options_object_equals_flat_keywords():
    hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H)
    labels = torch.randint(0, V, (B, T))
    a = rlhf_fast.linear_token_logprobs(hidden, weight, labels, linear=LinearOptions(backend="torch", chunk_size=5))
    b = rlhf_fast.linear_token_logprobs(hidden, weight, labels, backend="torch", chunk_size=5)
    assert torch.equal(a, b)
    assert torch.equal(rlhf_fast.linear_sft_loss(hidden, weight, labels, linear=LinearOptions(chunk_size=3)),
                       rlhf_fast.linear_sft_loss(hidden, weight, labels, chunk_size=3))  # fmt: skip


@pytest.mark.parametrize("call, message", [
    (lambda: rlhf_fast.policy_loss(*policy_inputs()[2:6], clip_epz=0.2),
     r"policy_loss\(\) got unexpected keyword argument\(s\) clip_epz; its option keywords are: objective, clip_eps, "),
    (lambda: rlhf_fast.linear_sft_loss(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), clip_eps=0.2),
     r"linear_sft_loss\(\) got unexpected keyword argument\(s\) clip_eps; its option keywords are: backend, chunk_size"),
    (lambda: rlhf_fast.nn.PolicyLoss(chunk_size=3), r"PolicyLoss\(\) got unexpected keyword argument\(s\) chunk_size"),
    (lambda: rlhf_fast.policy_loss(*policy_inputs()[2:6], options={"clip_eps": 0.2}),
     r"options must be a PolicyLossOptions or None, got dict"),
    (lambda: rlhf_fast.linear_sft_loss(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), linear=OPTIONS),
     r"linear must be a LinearOptions or None, got PolicyLossOptions"),
])  # fmt: skip
def test_unknown_keywords_and_wrong_objects_are_named(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_options_are_keyword_only_frozen_and_validated():
    with pytest.raises(TypeError):
        PolicyLossOptions(0.2)  # noqa
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPTIONS.clip_eps = 0.5
    with pytest.raises(ValueError, match="backend must be one of"):
        LinearOptions(backend="gpu")
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
        LinearOptions(chunk_size=0)
    with pytest.raises(ValueError, match="agg must be one of"):
        rlhf_fast.policy_loss(*policy_inputs()[2:6], options=OPTIONS, agg="mean")
