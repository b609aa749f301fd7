"""Policy objectives, registered by name: the per-token terms of every policy-gradient loss.

An objective is one function ``terms(logp, old_logp, advantages, mask, options) -> (loss, stats)``
on [B, T] float32 tensors that are already 0 at masked positions (advantages expanded to [B, T]):
``loss`` is the per-token loss [B, T] (before ``agg``), ``stats`` detached scalars of its own
(clipfrac...). ``ops.policy_loss`` adds the KL term and the stats every objective shares, and
aggregates; every fused op takes any registered objective (``PolicyLossOptions.objective``).

``separable``: whether d loss / d logp_t depends on token t's own values only (and the mask).
The lm_head-fused loss computes a separable objective's gradient in its one sweep over the
vocabulary; an objective coupled across a sequence (a ratio over the whole response) needs its
log-probs first, so it runs there as two sweeps (log-probs, then the backward).

Adding one (verl's ``@register_policy_loss`` is the model): a function here with its paper's
formula, its float64 spec in ``reference.policy_loss``, and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Objective:
    name: str
    terms: Callable
    separable: bool


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, *, separable: bool):
    def register(terms: Callable) -> Callable:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered already ({OBJECTIVES[name].terms.__qualname__})")
        OBJECTIVES[name] = Objective(name, terms, separable)
        return terms

    return register


def clip_range(options) -> tuple[float, float]:
    """(1 - clip_eps, 1 + clip_eps_high): the ratio's trust region."""
    high = options.clip_eps if options.clip_eps_high is None else options.clip_eps_high
    return 1 - options.clip_eps, 1 + high


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


@register_objective("ppo", separable=True)
def ppo(logp, old_logp, advantages, mask, options):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), with DAPO's clip-higher
    (clip_eps_high, arXiv:2503.14476), dual clip (Ye et al. 2020, arXiv:1912.09729) and, with
    clip_eps=None, REINFORCE: loss_t = max(-A r, -A clamp(r, 1 - l, 1 + h)), r = pi / pi_old.

    Written so that the gradient is finite wherever the loss is: tokens whose loss does not depend
    on logp (clipped, dual-clipped, A = 0) take a constant branch and exp() never sees their
    log-ratio, which may be huge (its gradient would be 0 * inf = NaN otherwise).
    """
    log_ratio = logp - old_logp
    # Which branch each token takes, decided on detached values (the max/min of the formula).
    with torch.no_grad():
        raw_ratio = torch.exp(log_ratio)
        clipped = torch.zeros_like(mask)
        bound = torch.ones_like(raw_ratio)
        if options.clip_eps is not None:
            low, high = clip_range(options)
            # A > 0: -A min(r, 1 + h) is clipped above 1 + h; A < 0: |A| max(r, 1 - l) below 1 - l.
            clipped = ((advantages > 0) & (raw_ratio > high)) | ((advantages < 0) & (raw_ratio < low))
            bound = torch.where(advantages > 0, high, low)
        dual = torch.zeros_like(mask)
        if options.dual_clip is not None:
            # For A < 0 the clipped loss is |A| max(r, 1 - l); min with |A| c (c > 1) bites when r > c.
            dual = (advantages < 0) & (raw_ratio > options.dual_clip)
            bound = torch.where(dual, options.dual_clip, bound)
        frozen = clipped | dual | (advantages == 0)
    ratio = torch.exp(torch.where(frozen, 0.0, log_ratio))
    loss = -advantages * torch.where(frozen, bound, ratio)
    stats = {"clipfrac": _masked_mean(clipped.float(), mask)}
    if options.dual_clip is not None:
        stats["dual_clipfrac"] = _masked_mean(dual.float(), mask)
    return loss, stats


def sequence_log_ratio(logp, old_logp, mask) -> torch.Tensor:
    """log s_i = (1 / |y_i|) sum_t (logp - old_logp): GSPO's length-normalised sequence ratio. [B]"""
    return (logp - old_logp).sum(-1) / mask.sum(-1).clamp(min=1)


def _clipped_by_sequence(log_s, advantages, options):
    """For a ratio s and advantage A per token: the tokens whose min(s A, clip(s) A) is the
    constant clip (and A = 0 tokens), the clip bound there, and the clip flags for clipfrac."""
    with torch.no_grad():
        if options.clip_eps is None:  # no trust region: the plain sequence-ratio gradient
            clipped, bound = torch.zeros_like(advantages, dtype=torch.bool), torch.ones_like(advantages)
        else:
            s = torch.exp(log_s)
            low, high = clip_range(options)
            clipped = ((advantages > 0) & (s > high)) | ((advantages < 0) & (s < low))
            bound = torch.where(advantages > 0, high, low)
    return clipped | (advantages == 0), bound, clipped


@register_objective("gspo", separable=False)
def gspo(logp, old_logp, advantages, mask, options):
    """GSPO, sequence level (Zheng et al. 2025, arXiv:2507.18071, eq. 5-7):
    s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|), loss_i = -min(s_i A_i, clip(s_i, 1 - l, 1 + h) A_i),
    with A_i the sequence's advantage ([B] advantages, or the mean of [B, T] ones over its tokens).
    Every token of sequence i carries loss_i, so agg="seq-mean-token-mean" (the paper's) gives
    mean_i loss_i. The paper clips tightly: clip_eps 3e-4, clip_eps_high 4e-4.
    """
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    seq_adv = (advantages.sum(-1, keepdim=True) / count).expand_as(logp)
    log_s = sequence_log_ratio(logp, old_logp, mask).unsqueeze(-1).expand_as(logp)
    frozen, bound, clipped = _clipped_by_sequence(log_s, seq_adv, options)
    s = torch.exp(torch.where(frozen, 0.0, log_s))
    loss = -seq_adv * torch.where(frozen, bound, s)
    return loss, {"clipfrac": _masked_mean(clipped.float(), mask)}


@register_objective("gspo_token", separable=False)
def gspo_token(logp, old_logp, advantages, mask, options):
    """GSPO-token (arXiv:2507.18071, eq. 13-14): s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)], equal to
    s_i in value, with token-level advantages: loss_t = -min(s_{i,t} A_t, clip(s_{i,t}) A_t). With
    one advantage per sequence its gradient is GSPO's. verl's "gspo" computes this form.
    """
    log_s = sequence_log_ratio(logp, old_logp, mask).detach().unsqueeze(-1) + (logp - logp.detach())
    frozen, bound, clipped = _clipped_by_sequence(log_s, advantages, options)
    s = torch.exp(torch.where(frozen, 0.0, log_s))
    loss = -advantages * torch.where(frozen, bound, s)
    return loss, {"clipfrac": _masked_mean(clipped.float(), mask)}
