"""policy_loss: the policy-gradient loss of PPO / GRPO / DAPO / GSPO ... on [B, T] log-probs.

Plain torch on [B, T] (a few elementwise kernels, negligible next to the [N, V] log-softmax that
produced logp). The formula is reference.policy_loss; the per-token terms are the registered
objective's (``rlhf_fast.objectives``), written so that the gradient is finite wherever the loss
is; masked positions never reach it. Stats stay on the device: no host sync.
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..kl_estimators import k3_of, kl_loss_values
from ..objectives import OBJECTIVES
from ..options import PolicyLossOptions, no_leftovers, take
from ..rollout_correction import Correction, correct
from .aggregate import aggregate, aggregate_masked, check_normalizer


def validate_inputs(logp, old_logp, advantages, mask, ref_logp, *, logp_name="logp", rollout_logp=None, options=None):
    """Check the [B, T] inputs against ``logp`` (or its shape); return the bool mask and the rollout
    correction (``rlhf_fast.rollout_correction``) the options ask for."""
    shape = logp.shape
    if options is not None and options.rollout_is is not None and rollout_logp is None:
        raise ValueError(f"rollout_is={options.rollout_is!r} needs rollout_logp (the rollout engine's log-probs); got None")
    for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if value is not None:
            check.tensor(name, value, dtypes=check.FLOAT_DTYPES, shape=shape, like=(logp_name, logp))
    check.tensor("advantages", advantages, dtypes=check.FLOAT_DTYPES, like=(logp_name, logp))
    if tuple(advantages.shape) not in (tuple(shape), tuple(shape[:1])):
        raise ValueError(
            f"advantages must have shape {tuple(shape)} (per token) or {tuple(shape[:1])} (per sequence); "
            f"got {check.describe(advantages)}"
        )
    mask = check.mask("mask", mask, shape=shape, like=(logp_name, logp))
    if check.CHECK:  # RLHF_FAST_CHECK=1: the values too (a pass over each input and a sync; off by default)
        check.policy_values(mask, logp=logp if logp_name == "logp" else None, old_logp=old_logp, advantages=advantages,
                            ref_logp=ref_logp, rollout_logp=rollout_logp)  # fmt: skip
    if options is None or options.rollout_is is None:
        return Correction(mask, None, {})
    return correct(old_logp, rollout_logp, mask, options)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / count


def policy_loss_terms(logp, old_logp, advantages, mask, ref_logp, options: PolicyLossOptions, rollout_weights=None):
    """Per-token loss [B, T] (0 at masked positions) and the detached stats, on validated inputs:
    the options' objective (``rlhf_fast.objectives``) times the rollout correction's weights, plus
    kl_coef * KL to the reference."""
    mask = mask.bool()
    logp = torch.where(mask, logp.float(), 0.0)
    old_logp = torch.where(mask, old_logp.float(), 0.0)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(mask.shape)
    adv = torch.where(mask, advantages.float(), 0.0)
    per_token, own_stats = OBJECTIVES[options.objective].terms(logp, old_logp, adv, mask, options)
    count = mask.sum().clamp(min=1)
    # clipfrac first, 0 for clip-free objectives
    stats = own_stats if "clipfrac" in own_stats else {"clipfrac": count.new_zeros((), dtype=torch.float32)} | own_stats
    if rollout_weights is not None:
        per_token = per_token * rollout_weights
    # The inputs are 0 at masked positions, so the KL and k3 below are exactly +0 there: their sums
    # need no masking.
    log_ratio = (logp - old_logp).detach()
    approx_k3 = None
    if ref_logp is not None:
        ref_logp = torch.where(mask, ref_logp.float(), 0.0)
        value = None
        if options.kl_estimator.removesuffix("+") == "k3":
            # The KL term's k3 and the approx_kl stat's in one pass: elementwise, so the same values as two.
            value, approx_k3 = k3_of(torch.stack((-(logp - ref_logp), log_ratio))).unbind()
        kl = kl_loss_values(logp, ref_logp, options.kl_estimator, options.kl_clamp, value)
        if options.kl_coef:
            weighted = kl * torch.exp(logp - old_logp) if options.kl_is_correction else kl
            per_token = per_token + options.kl_coef * weighted
        stats["kl"] = kl.detach().sum() / count
    with torch.no_grad():
        stats["approx_kl"] = (k3_of(log_ratio) if approx_k3 is None else approx_k3).sum() / count  # k3 of old vs new
        # Ratios are > 0, so masked zeros never win the max and an empty mask gives 0.
        ratio = torch.where(mask, torch.exp(log_ratio), 0.0)
        stats["ratio_mean"] = ratio.sum() / count
        stats["ratio_max"] = ratio.amax() if mask.numel() else count.new_zeros((), dtype=torch.float32)
    return torch.where(mask, per_token, 0.0), stats


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    **option_kwargs,
):
    """Clipped policy-gradient loss: PPO, GRPO (with its KL loss), DAPO (clip-higher), dual-clip PPO.

    Args:
        logp: [B, T] float log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: [B, T] log-probs under the policy that sampled (behaviour policy).
        advantages: [B, T], or [B] broadcast over T.
        mask: [B, T] bool or 0/1, True on the tokens that count. NaN or inf at masked positions of
            any input never reaches the loss, the stats or the gradient.
        ref_logp: [B, T] reference-model log-probs, for the KL loss and the "kl" stat.
        rollout_logp: [B, T] the rollout engine's log-probs, for the options' rollout_is
            correction (``rlhf_fast.rollout_correction``; weights detached, stats "rollout_*").
        entropy: [B, T] the tokens' entropies, for the options' top_entropy_quantile mask (only
            their order matters; no gradient flows to them).
        normalizer: what ``agg`` divides by, overriding this batch's count: pass the global
            ``loss_normalizer(mask, agg)`` summed over micro-batches (and ranks) and the
            micro-batch losses add up to the full-batch loss (see ``rlhf_fast.ops.aggregate``).
        options: a ``PolicyLossOptions`` (None: its defaults); its fields (objective, clip_eps,
            clip_eps_high, dual_clip, kl_coef, kl_estimator, agg) may also be passed as keyword
            arguments, which override it. The objective's per-token terms are in
            ``rlhf_fast.objectives``; for the default "ppo", with ratio = exp(logp - old_logp):
            pg = max(-A ratio, -A clamp(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)));
            dual clip: where A < 0, pg = min(pg, -A dual_clip); plus kl_coef * kl_penalty(logp,
            ref_logp, kl_estimator) per token when ref_logp is given.

    Returns:
        (loss, stats): loss a float32 scalar (0 with zero gradient when no token is valid);
        stats detached float32 scalars over the valid tokens: "clipfrac", "approx_kl" (k3 of old
        vs new), "ratio_mean", "ratio_max", "kl" (with ref_logp), "dual_clipfrac" (with dual_clip).

    Non-finite values at valid tokens pass through by default (README, "Non-finite values"): NaN in logp,
    old_logp or advantages makes the loss NaN and that token's gradient NaN (the other tokens'
    stay finite); +-inf advantages give a +-inf loss. The ratio exp(logp - old_logp) overflows
    float32 past a log-ratio of 88.7: with A < 0 and no dual clip, the loss and the gradient are
    then inf (at a log-ratio of 50 they are already ~1e21); dual_clip bounds both. A zero tensor
    ``normalizer`` gives a +-inf or NaN loss, a negative one flips its sign. RLHF_FAST_CHECK=1
    checks these inputs (finite, log-probs <= 0, normalizer > 0) and names the first bad index.
    """
    options = take(PolicyLossOptions, options, option_kwargs)
    no_leftovers("policy_loss", option_kwargs, PolicyLossOptions)
    check.tensor("logp", logp, dtypes=check.FLOAT_DTYPES)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T]; got {check.describe(logp)}")
    correction = validate_inputs(logp, old_logp, advantages, mask, ref_logp, rollout_logp=rollout_logp, options=options)
    if entropy is not None:
        check.tensor("entropy", entropy, dtypes=check.FLOAT_DTYPES, shape=logp.shape, like=("logp", logp))
    elif options.top_entropy_quantile < 1:
        raise ValueError(f"top_entropy_quantile={options.top_entropy_quantile} ranks the tokens by entropy: pass "
                         "entropy=[B, T] (the fused ops compute it themselves)")  # fmt: skip
    normalizer = check_normalizer(normalizer)
    if check.CHECK:
        check.normalizer_value(normalizer)
        check.policy_values(correction.mask, entropy=entropy)
    return policy_loss_with_options(logp, old_logp, advantages, correction, ref_logp, options, normalizer, entropy)


def policy_loss_with_options(logp, old_logp, advantages, correction: Correction, ref_logp, options: PolicyLossOptions,
                             normalizer=None, entropy=None):  # fmt: skip
    """``policy_loss`` on validated inputs (the fused ops' loss on their log-probs)."""
    if options.kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={options.kl_coef} needs ref_logp (the reference model's log-probs); got None")
    if options.top_entropy_quantile < 1:
        correction = keep_high_entropy(correction, entropy, options.top_entropy_quantile)
    mask = correction.mask
    per_token, stats = policy_loss_terms(logp, old_logp, advantages, mask, ref_logp, options, correction.weights)
    loss = aggregate_masked(per_token, mask, options.agg, normalizer, options.max_response_length)
    return loss, stats | correction.stats


def masked_quantile(x: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x[mask], q) (linear interpolation) without a host sync: the valid values are
    sorted first, and the two ranks around q (n - 1) are gathered by a device index. +inf when no
    value is valid. The rank is computed in float64: in float32, 0.6 * 25 rounds up past 15, and the
    value at rank 15 (the exact quantile) would fall below its own threshold, as it does in
    torch.quantile on float32 input."""
    ranked = torch.sort(torch.where(mask, x, torch.inf).reshape(-1)).values
    position = q * (mask.sum() - 1).clamp(min=0).double()
    below = position.floor().long().reshape(1)
    above = position.ceil().long().reshape(1)
    low, high = ranked.index_select(0, below), ranked.index_select(0, above)
    return (low + (position - below).to(x.dtype) * (high - low)).reshape(())


def keep_high_entropy(correction: Correction, entropy: torch.Tensor, quantile: float) -> Correction:
    """The policy-gradient weights times TRL's high-entropy mask: 1 where the token's entropy is at
    least the (1 - quantile) quantile of the valid tokens' entropies, else 0 (the tokens stay in
    the loss's normaliser and keep their KL term, as in TRL's GRPOTrainer)."""
    mask = correction.mask
    entropy = entropy.detach().float()
    threshold = masked_quantile(entropy, mask, 1 - quantile)
    keep = mask & (entropy >= threshold)
    weights = keep.float() if correction.weights is None else correction.weights * keep
    stats = correction.stats | {"entropy_mask_frac": masked_mean(keep.float(), mask, mask.sum().clamp(min=1))}
    return Correction(mask, weights, stats)


def loss_with_entropy_bonus(logp, entropy, old_logp, advantages, correction, ref_logp, options, entropy_coef, normalizer):
    """The fused ops' loss on their [B, T] log-probs and entropies: ``policy_loss_with_options``
    minus entropy_coef * aggregate(entropy), with stats["entropy"], the mean over valid tokens."""
    mask = correction.mask
    loss, stats = policy_loss_with_options(logp, old_logp, advantages, correction, ref_logp, options, normalizer, entropy)
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(entropy, mask, options.agg, normalizer, options.max_response_length)
    stats["entropy"] = masked_mean(entropy.detach(), mask, mask.sum().clamp(min=1))
    return loss, stats
