"""Rollout importance correction (TIS / MIS) against the float64 reference: every level and mode,
every registered objective, in policy_loss and the fused ops (the lm_head one through its one
sweep and its two sweeps), with the mismatch stats; and the arguments it needs."""

from __future__ import annotations

import math

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.objectives import OBJECTIVES

from numerics import poison, policy_term_scale, random_mask, rel_err

TOL = 2e-5
MODES = [("token", "truncate", {}), ("sequence", "truncate", {"rollout_is_threshold": 3.0}),
         ("geometric", "truncate", {}), ("token", "mask", {}), ("sequence", "mask", {"rollout_is_threshold": 4.0}),
         ("geometric", "mask", {"rollout_is_threshold_low": 0.8}), ("token", "truncate", {"rollout_is_threshold_low": 0.5}),
         ("token", "masked_weight", {}), ("sequence", "masked_weight", {"rollout_is_threshold": 4.0}),
         ("geometric", "masked_weight", {"rollout_is_threshold_low": 0.0}),
         ("token", "masked_weight", {"rollout_is_threshold_low": 0.0}),
         ("token", "masked_weight", {"rollout_is_threshold": math.inf, "rollout_is_threshold_low": 0.5}),
         ("token", "truncate", {"rollout_is_threshold": math.inf, "rollout_is_threshold_low": 0.5})]  # fmt: skip


def case(rows=8, tokens=9):
    """Rollout log-probs off the old ones by a regime that cycles along each row: w = pi_old /
    pi_rollout about e (beyond the thresholds 2 to 4 above), about 1/e (below 1/2), or near 1, so
    that the "mixed" mask's full row truncates and masks at token level. NaN where masked."""
    mask = random_mask(rows, tokens, "mixed")
    logp = -3 * torch.rand(rows, tokens)
    old = logp + 0.2 * torch.randn(rows, tokens)
    regime = torch.arange(tokens) % 3
    offset = torch.where(regime == 0, 1.5, torch.where(regime == 1, -1.0, 0.0)) + 0.2 * torch.rand(rows, tokens) - 0.1
    rollout = old - offset
    return poison(logp, mask), poison(old, mask), poison(rollout, mask), torch.randn(rows), mask


@pytest.mark.parametrize("level, mode, extra", MODES, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_policy_loss_matches_reference(level, mode, extra, objective):
    logp, old, rollout, adv, mask = case()
    options = dict(objective=objective, rollout_is=level, rollout_is_mode=mode, agg="seq-mean-token-mean", **extra)
    draw = torch.randint(0, 2**31, ()).item()
    x = logp.clone().requires_grad_()
    torch.manual_seed(draw)
    loss, stats = rlhf_fast.policy_loss(x, old, adv, mask, rollout_logp=rollout, **options)
    loss.backward()
    y = logp.double().requires_grad_()
    torch.manual_seed(draw)
    want, want_stats = reference.policy_loss(y, old.double(), adv.double(), mask, rollout_logp=rollout.double(), **options)
    want.backward()
    # Terms of both signs can cancel; the float32 error follows their sizes, the loss at |A|.
    torch.manual_seed(draw)
    scale, _ = reference.policy_loss(y.detach(), old.double(), adv.double().abs(), mask, rollout_logp=rollout.double(), **options)
    assert abs(loss.item() - want.item()) <= TOL * max(abs(want.item()), abs(scale.item()), 1e-2)
    assert torch.isfinite(x.grad).all() and rel_err(x.grad, y.grad) < TOL
    for key, value in want_stats.items():
        assert abs(stats[key].item() - value.item()) <= TOL * max(abs(value.item()), 1e-2), key
    corrected = stats["rollout_is_truncated_frac" if mode == "truncate" else "rollout_is_masked_frac"]
    assert 0 < corrected < 1 or level != "token"  # both regimes at token level


@pytest.mark.parametrize("objective", ["ppo", "gspo"])  # one sweep and two sweeps in the lm_head op
@pytest.mark.parametrize("mode", ["truncate", "mask", "masked_weight"])
def test_fused_ops_match_reference(objective, mode):
    B, T, H, V = 4, 7, 16, 61
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5).requires_grad_()
    mask = random_mask(B, T, "mixed")
    labels = torch.where(mask, torch.randint(0, V, (B, T)), -3)
    with torch.no_grad():
        logp = reference.linear_token_logprobs(hidden, weight, torch.where(mask, labels, 0))
    old = poison(logp + 0.2 * torch.randn(B, T, dtype=torch.float64), mask)
    rollout = poison(old - torch.where(torch.arange(T) % 3 == 0, 1.5, -0.5).double() * torch.rand(B, T, dtype=torch.float64), mask)
    adv = torch.randn(B, dtype=torch.float64)
    kw = dict(rollout_logp=rollout, objective=objective, rollout_is="token", rollout_is_mode=mode, entropy_coef=0.01)
    want, want_stats = reference.fused_policy_loss(hidden @ weight.T, labels, old, adv, mask, **kw)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    logits = (hidden @ weight.T).detach().requires_grad_()
    got, stats = rlhf_fast.fused_policy_loss(logits, labels, old, adv, mask, backend="host", **kw)
    (logits_grad,) = torch.autograd.grad(got, logits)
    # float32 kernels: the loss rounds like its terms, which cancel, and the stats like the float32
    # log-ratios old - rollout of log-probs of this size they are computed from.
    scale = policy_term_scale(logp, old, adv, mask, "token-mean")
    stat_scale = torch.where(mask, old, 0.0).abs().sum().item() / mask.sum().item()
    assert abs(got.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2)
    assert rel_err(logits_grad @ weight.detach(), want_grads[0].reshape(B, T, H)) < TOL
    loss, stats_linear = rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask, chunk_size=5, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert abs(loss.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2)
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < TOL
    for key, value in want_stats.items():
        for got_stats in (stats, stats_linear):
            assert abs(got_stats[key].item() - value.item()) <= TOL * max(abs(value.item()), stat_scale, 1e-2), key


def test_masked_weight_keeps_the_normaliser_and_the_kl_term():
    """masked_weight zeroes only the policy-gradient term of a token out of range: with every w out
    of range the loss is the KL term alone, over the given mask's count (mask mode would drop the
    tokens, KL and count included); with every w in range it is truncate's loss with no bound hit."""
    logp, old, rollout, adv, mask = case()
    ref = logp - 0.3
    kw = dict(ref_logp=ref, kl_coef=0.1, agg="token-mean", rollout_is="token")
    far = poison(old - 3.0, mask)  # w = e^3 > 2 everywhere
    got, _ = rlhf_fast.policy_loss(logp, old, adv, mask, rollout_logp=far, rollout_is_mode="masked_weight", **kw)
    kl_only, _ = rlhf_fast.policy_loss(logp, old, torch.zeros_like(adv), mask, rollout_logp=far, rollout_is_mode="truncate", **kw)
    torch.testing.assert_close(got, kl_only)
    near = poison(old - 0.1, mask)
    got, _ = rlhf_fast.policy_loss(logp, old, adv, mask, rollout_logp=near, rollout_is_mode="masked_weight", **kw)
    want, _ = rlhf_fast.policy_loss(logp, old, adv, mask, rollout_logp=near, rollout_is_mode="truncate", **kw)
    torch.testing.assert_close(got, want)


def test_the_correction_needs_rollout_logp_and_valid_options():
    logp, old, rollout, adv, mask = case()
    with pytest.raises(ValueError, match="rollout_is='token' needs rollout_logp"):
        rlhf_fast.policy_loss(logp, old, adv, mask, rollout_is="token")
    with pytest.raises(ValueError, match=r"rollout_is must be one of \('token', 'sequence', 'geometric'\)"):
        rlhf_fast.PolicyLossOptions(rollout_is="tok")
    with pytest.raises(ValueError, match=r"rollout_is_mode must be one of \('truncate', 'mask', 'masked_weight'\)"):
        rlhf_fast.PolicyLossOptions(rollout_is="token", rollout_is_mode="weighted")
    with pytest.raises(ValueError, match="rollout_is_threshold_low must be a finite number >= 0.0 and <= 1.0"):
        rlhf_fast.PolicyLossOptions(rollout_is="token", rollout_is_threshold_low=1.5)
    assert rlhf_fast.PolicyLossOptions(rollout_is="token", rollout_is_threshold=math.inf).rollout_is_threshold == math.inf
    with pytest.raises(ValueError, match="rollout_is_threshold must be a finite number > 1.0"):
        rlhf_fast.PolicyLossOptions(rollout_is="token", rollout_is_threshold=-math.inf)
    with pytest.raises(ValueError, match="rollout_is_threshold must be a finite number > 1.0"):
        rlhf_fast.PolicyLossOptions(rollout_is="token", rollout_is_threshold=0.5)
    with pytest.raises(ValueError, match=r"rollout_logp must have shape \(8, 9\)"):
        rlhf_fast.policy_loss(logp, old, adv, mask, rollout_logp=rollout[:, :-1], rollout_is="token")
