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
    loss, clipped, dual = _ppo_surrogate(logp, old_logp, advantages, mask, options)
    stats = {"clipfrac": _masked_mean(clipped.float(), mask)}
    if options.dual_clip is not None:
        stats["dual_clipfrac"] = _masked_mean(dual.float(), mask)
    return loss, stats


def _ppo_surrogate(logp, old_logp, advantages, mask, options):
    """PPO's per-token loss, and where the clip and the dual clip bit (None without dual_clip)."""
    log_ratio = logp - old_logp
    # Which branch each token takes, decided on detached values (the max/min of the formula).
    with torch.no_grad():
        raw_ratio = torch.exp(log_ratio)
        frozen = advantages == 0
        if options.clip_eps is None:
            clipped, bound = torch.zeros_like(mask), torch.ones_like(raw_ratio)
        else:
            low, high = clip_range(options)
            positive = advantages > 0
            # A > 0: -A min(r, 1 + h) is clipped above 1 + h; A < 0: |A| max(r, 1 - l) below 1 - l.
            clipped = (positive & (raw_ratio > high)) | ((advantages < 0) & (raw_ratio < low))
            bound = torch.where(positive, high, low)
            frozen = clipped | frozen
        dual = None
        if options.dual_clip is not None:
            # For A < 0 the clipped loss is |A| max(r, 1 - l); min with |A| c (c > 1) bites when r > c.
            dual = (advantages < 0) & (raw_ratio > options.dual_clip)
            bound = torch.where(dual, options.dual_clip, bound)
            frozen = frozen | dual
    ratio = torch.exp(torch.where(frozen, 0.0, log_ratio))
    return -advantages * torch.where(frozen, bound, ratio), clipped, dual


def sequence_log_ratio(logp, old_logp, mask) -> torch.Tensor:
    """log s_i = (1 / |y_i|) sum_t (logp - old_logp): GSPO's length-normalised sequence ratio. [B]"""
    return (logp - old_logp).sum(-1) / mask.sum(-1).clamp(min=1)


def _clipped_surrogate_of_log_ratio(log_s, advantages, mask, options):
    """max(-A s, -A clip(s, 1 - l, 1 + h)) per token for s = exp(log_s) (-A s with clip_eps None),
    with clipfrac. As in ``ppo``: tokens whose loss is the constant clip (and A = 0) never take
    exp(log_s), so a huge ratio cannot make their gradient 0 * inf = NaN."""
    with torch.no_grad():
        if options.clip_eps is None:  # no trust region: the plain ratio gradient
            clipped, bound = torch.zeros_like(mask), torch.ones_like(advantages)
        else:
            s = torch.exp(log_s)
            low, high = clip_range(options)
            clipped = ((advantages > 0) & (s > high)) | ((advantages < 0) & (s < low))
            bound = torch.where(advantages > 0, high, low)
        frozen = clipped | (advantages == 0)
    loss = -advantages * torch.where(frozen, bound, torch.exp(torch.where(frozen, 0.0, log_s)))
    return loss, {"clipfrac": _masked_mean(clipped.float(), mask)}


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
    return _clipped_surrogate_of_log_ratio(log_s, seq_adv, mask, options)


@register_objective("gspo_token", separable=False)
def gspo_token(logp, old_logp, advantages, mask, options):
    """GSPO-token (arXiv:2507.18071, eq. 13-14): s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)], equal to
    s_i in value, with token-level advantages: loss_t = -min(s_{i,t} A_t, clip(s_{i,t}) A_t). With
    one advantage per sequence its gradient is GSPO's. verl's "gspo" computes this form.
    """
    log_s = sequence_log_ratio(logp, old_logp, mask).detach().unsqueeze(-1) + (logp - logp.detach())
    return _clipped_surrogate_of_log_ratio(log_s, advantages, mask, options)


@register_objective("cispo", separable=True)
def cispo(logp, old_logp, advantages, mask, options):
    """CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4-5): loss_t = -sg(clip(r, 1 - l, 1 + h)) A log pi,
    the importance weight clipped and detached, so that no token loses its gradient. clip_eps=None
    leaves the weight without a lower bound (the paper's choice), clip_eps_high (else clip_eps) is
    the upper one; with both None the weight is unclipped."""
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        low = None if options.clip_eps is None else 1 - options.clip_eps
        high = options.clip_eps_high if options.clip_eps_high is not None else options.clip_eps
        weight = ratio if low is None and high is None else ratio.clamp(min=low, max=None if high is None else 1 + high)
    loss = -weight * advantages * logp
    return loss, {"clipfrac": _masked_mean((weight != ratio).float(), mask)}


@register_objective("sapo", separable=True)
def sapo(logp, old_logp, advantages, mask, options):
    """SAPO (Gao et al. 2025, arXiv:2511.20347, eq. 5-6): a soft gate instead of the hard clip,
    loss_t = -A f(r), f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = sapo_tau_pos where A > 0 and
    sapo_tau_neg elsewhere; f'(1) = 1, so near r = 1 the gradient is PPO's. The log-ratio is
    clamped to [-20, 20] as in verl: beyond it the gate is flat (no NaN from exp overflow)."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    tau = torch.where(advantages > 0, options.sapo_tau_pos, options.sapo_tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1)) * (4 / tau)
    return -advantages * gate, {}


@register_objective("gmpo", separable=False)
def gmpo(logp, old_logp, advantages, mask, options):
    """GMPO (Zhao et al. 2025, arXiv:2507.20673): the geometric mean of the token ratios, each
    clipped in log space on the side the advantage's sign cuts:
    log s_i = mean_t sgn(A) min(sgn(A) x_t, sgn(A) clamp(x_t, -l, h)), x = log r;
    every token of response i carries -A_i s_i (A_i the response's mean advantage), so
    seq-mean-token-mean gives verl's geo_mean loss when every row has a token."""
    log_ratio = logp - old_logp
    sign = torch.sign(advantages)
    if options.clip_eps is None:
        kept, clipped = log_ratio, torch.zeros_like(mask)
    else:
        high = options.clip_eps if options.clip_eps_high is None else options.clip_eps_high
        bounded = log_ratio.clamp(-options.clip_eps, high)
        kept = sign * torch.minimum(sign * log_ratio, sign * bounded)
        clipped = log_ratio.detach() != bounded.detach()
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    log_s = (torch.where(mask, kept, 0.0).sum(-1, keepdim=True) / count).expand_as(logp)
    seq_adv = (advantages.sum(-1, keepdim=True) / count).expand_as(logp)
    stats = {"clipfrac": _masked_mean((clipped & (advantages > 0)).float(), mask),
             "clipfrac_lower": _masked_mean((clipped & (advantages < 0)).float(), mask)}  # fmt: skip
    return -seq_adv * torch.exp(log_s), stats


@register_objective("gpg", separable=True)
def gpg(logp, old_logp, advantages, mask, options):
    """GPG (Chu et al. 2025, arXiv:2504.02546): the plain policy gradient, loss_t = -A log pi, no
    ratio and no clip."""
    return -advantages * logp, {}


def _covariance(logp, advantages, mask):
    """(A - mean A)(log pi - mean log pi) per token, the means over the batch's valid tokens:
    the entropy-mechanism paper's per-token contribution to the entropy change. Detached."""
    logp, advantages = logp.detach(), advantages.detach()
    return (advantages - _masked_mean(advantages, mask)) * (logp - _masked_mean(logp, mask))


@register_objective("clip_cov", separable=False)
def clip_cov(logp, old_logp, advantages, mask, options):
    """Clip-Cov (Cui et al. 2025, arXiv:2505.22617, sec. 4): PPO's clipped loss, with the
    gradient cut for a random cov_ratio share (at least one) of the valid, not already clipped
    tokens whose covariance lies in (clip_cov_lb, clip_cov_ub). The draw uses torch's generator
    (torch.randperm), as verl does."""
    loss, clipped, _ = _ppo_surrogate(logp, old_logp, advantages, mask, options)
    stats = {"clipfrac": _masked_mean(clipped.float(), mask)}
    with torch.no_grad():
        cov = _covariance(logp, advantages, mask)
        candidates = (mask & ~clipped & (cov > options.clip_cov_lb) & (cov < options.clip_cov_ub)).reshape(-1).nonzero()[:, 0]
        limit = max(int(options.cov_ratio * int(mask.sum())), 1)
        picked = candidates[torch.randperm(candidates.numel(), device=candidates.device)[:limit]]
        cut = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        cut[picked] = True
        cut = cut.view(mask.shape)
    stats["cov_selected_frac"] = _masked_mean(cut.float(), mask)
    return torch.where(cut, loss.detach(), loss), stats


@register_objective("kl_cov", separable=False)
def kl_cov(logp, old_logp, advantages, mask, options):
    """KL-Cov (arXiv:2505.22617, sec. 4): the unclipped surrogate -A r, plus kl_cov_coef |log r|
    on the cov_ratio share (at least one) of valid tokens with the largest covariance."""
    log_ratio = logp - old_logp
    loss = -advantages * torch.exp(log_ratio)
    with torch.no_grad():
        valid = int(mask.sum())
        cov = torch.where(mask, _covariance(logp, advantages, mask), -torch.inf).reshape(-1)
        top = torch.topk(cov, min(max(int(options.cov_ratio * valid), 1), valid)).indices if valid else cov.new_zeros(0, dtype=torch.long)
        picked = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        picked[top] = True
        picked = picked.view(mask.shape)
    loss = loss + torch.where(picked, options.kl_cov_coef * log_ratio.abs(), 0.0)
    return loss, {"cov_selected_frac": _masked_mean(picked.float(), mask)}
