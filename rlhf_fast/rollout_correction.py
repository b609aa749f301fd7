"""Rollout importance correction: the rollout engine (vLLM, SGLang) samples with log-probs that
differ from the trainer's recomputed old log-probs (other kernels, other precision). The policy
loss is an expectation under the trainer's old policy, so each token is reweighted by
w = pi_old / pi_rollout = exp(old_logp - rollout_logp), detached (TIS / MIS, as in verl and TRL).

Levels: "token" (w_t), "sequence" (the product over the response, exp(sum_t)) and "geometric"
(its geometric mean, exp(mean_t)). Modes, with lo = threshold_low and hi = threshold (math.inf:
no upper bound):

- "truncate" (TIS) multiplies the per-token policy-gradient loss by min(w, hi), or by
  clamp(w, lo, hi) when threshold_low is given (TRL's ``*_truncate`` with
  ``vllm_importance_sampling_clip_min``);
- "mask" (MIS) drops the tokens (or whole responses) with w outside [lo, hi] from the loss, its
  normaliser included (lo None: 1 / hi);
- "masked_weight" multiplies the policy-gradient loss by w * [lo <= w <= hi], 0 outside: the
  tokens out of range keep their place in the loss's normaliser and their KL term, only their
  policy-gradient term is zeroed (lo None: 1 / hi; lo = 0: no lower bound). This is TRL's
  ``token_mask`` / ``sequence_mask`` (trl 1.16, trl/trainer/grpo_trainer.py,
  ``_generate_and_score_completions``: the ratio is ``masked_fill``-ed with 0 outside
  [clip_min, clip_max] and ``_compute_loss`` multiplies ``per_token_loss`` by it before adding the KL).

All are known before any logit exists (they depend on the inputs only), so every fused op applies
them in its per-token pass: each is a ``Correction``, a mask and weights that the ops consume alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Correction:
    mask: torch.Tensor  # [B, T] bool: the tokens the loss keeps
    weights: torch.Tensor | None  # [B, T] float32 multipliers of the policy-gradient term (truncate, masked_weight)
    stats: dict[str, torch.Tensor]


def _masked_mean(x, mask):
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _masked_max(x, mask):
    """0 when no token is valid; decided on the device (``if mask.any()`` would sync with it)."""
    if not mask.numel():
        return x.new_zeros(())
    return torch.where(mask.any(), torch.where(mask, x, -torch.inf).amax(), 0.0)


def correct(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, options) -> Correction:
    """The mask and weights of ``options.rollout_is`` for [B, T] validated inputs, and the mismatch stats."""
    with torch.no_grad():
        log_w_token = torch.where(mask, old_logp.float() - rollout_logp.float(), 0.0)
        if options.rollout_is == "token":
            log_w = log_w_token
        else:
            total = log_w_token.sum(-1, keepdim=True)
            if options.rollout_is == "geometric":
                total = total / mask.sum(-1, keepdim=True).clamp(min=1)
            log_w = total.expand_as(log_w_token)
        high = math.log(options.rollout_is_threshold)
        given_low = options.rollout_is_threshold_low
        stats = {
            "rollout_log_ratio_abs_mean": _masked_mean(log_w_token.abs(), mask),
            "rollout_log_ratio_abs_max": _masked_max(log_w_token.abs(), mask),
            # KL(rollout || old) by k1 and k3 on the rollout's own samples, and the chi-square
            # divergence E_rollout[w^2] - 1 of the token weights.
            "rollout_kl_k1": _masked_mean(-log_w_token, mask),
            "rollout_kl_k3": _masked_mean(torch.expm1(log_w_token) - log_w_token, mask),
            "rollout_chi2": _masked_mean(torch.expm1(2 * log_w_token), mask),
        }
        if options.rollout_is_mode == "truncate":
            low = -math.inf if not given_low else math.log(given_low)  # None or 0: no lower bound
            weights = torch.exp(log_w.clamp(min=low, max=high))
            stats["rollout_is_truncated_frac"] = _masked_mean(((log_w > high) | (log_w < low)).float(), mask)
            stats["rollout_is_weight_mean"] = _masked_mean(weights, mask)
            stats["rollout_is_weight_max"] = _masked_max(weights, mask)
            return Correction(mask, torch.where(mask, weights, 0.0), stats)
        if given_low is None:
            low = -high
        else:
            low = -math.inf if given_low == 0 else math.log(given_low)
        in_range = (log_w <= high) & (log_w >= low)
        kept = mask & in_range
        stats["rollout_is_masked_frac"] = _masked_mean((~kept).float(), mask)
        if options.rollout_is_mode == "masked_weight":
            weights = torch.where(kept, torch.exp(log_w), 0.0)
            stats["rollout_is_weight_mean"] = _masked_mean(weights, mask)
            stats["rollout_is_weight_max"] = _masked_max(weights, mask)
            return Correction(mask, weights, stats)
        stats["rollout_is_weight_mean"] = _masked_mean(torch.exp(log_w), kept)
        stats["rollout_is_weight_max"] = _masked_max(torch.exp(log_w), kept)
        return Correction(kept, None, stats)
