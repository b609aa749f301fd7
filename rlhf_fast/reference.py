"""PyTorch reference of every rlhf_fast op: the spec, the test oracle and the benchmark baseline.

Shape letters: B batch (sequences), T tokens per sequence, V vocabulary, N = B*T flattened tokens,
H hidden size, G group size. Everything here is plain eager PyTorch, written to be read; the fused
kernels in ``kernels/`` (Triton) and ``csrc/`` (CUDA C++ and host C++) must agree with it.
"""

from __future__ import annotations

import torch

from .choices import AGG_MODES, GROUP_MODES, INDEXED_GROUP_MODES, KL_ESTIMATORS
from .options import PolicyLossOptions, no_leftovers, take

IGNORE_INDEX = -100


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
):
    """Log-probability of each label under softmax(logits / temperature), and optionally its entropy.

    logits: [..., V] float; labels: [...] int. Returns float32 (float64 for float64 logits) logp [...]
    and, with ``return_entropy``, entropy [...] = -sum_v p_v log p_v of the same tempered distribution.

    1. z = logits / temperature, in float32 (or float64).
    2. log p = log_softmax(z) over V.
    3. logp = log p[label]; entropy = -sum p * log p (terms with p = 0 count as 0).
    4. Positions whose label is ``ignore_index`` get logp = 0 and entropy = 0 (and no gradient).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute_dtype) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    return logp, entropy


def token_logprobs_upcast(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0):
    """The common hand-written baseline: ``logits.float()`` first, then log_softmax and gather [N]."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor):
    """TRL's formulation: gather the label logit, subtract a per-row logsumexp computed row by row.

    Written here in plain PyTorch because it is the de facto baseline users know. [..., V] -> [...]
    """
    if logits.dtype in (torch.float32, torch.float64):
        label_logits = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        return label_logits - torch.logsumexp(logits, dim=-1)
    rows = [
        torch.log_softmax(row_logits, dim=-1).gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1)
        for row_logits, row_labels in zip(logits, labels)
    ]
    return torch.stack(rows)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
):
    """Instruction-finetuning loss: mean negative log-prob over non-ignored tokens. [..., V], [...] -> []

    With every token ignored the loss is 0 (and its gradient zero), never NaN.
    """
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    count = (labels != ignore_index).sum().clamp(min=1)
    return -logp.sum() / count


# ---------------------------------------------------------------------------------------------
# RLHF objectives on [B, T] token tensors: KL penalties, rewards, advantages, losses.
#
# ``mask`` is [B, T] bool (or 0/1) marking response tokens; any pattern is allowed (right or left
# padding, holes). Values at masked positions never reach a result: every function replaces them
# with 0 through ``torch.where`` *before* any arithmetic, so a NaN or inf there cannot leak through
# a product with 0, in the forward or in the gradient. Results keep the inputs' floating dtype
# (the tests run these in float64 as the oracle).
# ---------------------------------------------------------------------------------------------

WHITEN_EPS = 1e-8


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens. [...] -> [...]

    With d = logp - ref_logp (Schulman's estimators, http://joschu.net/blog/kl-approx.html):
      k1 = d;  k2 = d^2 / 2;  k3 = e^{-d} + d - 1 (>= 0, unbiased, low variance);  abs = |d|.
    k3 is written expm1(-d) + d, which keeps its digits when d is small.
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_loss(logp, ref_logp, o) -> torch.Tensor:
    """The policy loss's per-token KL term, before kl_coef. [B, T] -> [B, T]

    1. kl = kl_penalty(logp, ref_logp, estimator) with the "+" of a straight-through estimator
       ("k3+", verl) removed; clamped to [-kl_clamp, kl_clamp] when kl_clamp is set (verl's
       low_var_kl and OpenRLHF clamp at 10).
    2. Straight-through ("+"): the value of step 1 with the gradient of k2 = d^2 / 2, whose
       gradient d is an unbiased estimate of the KL's gradient under samples of the policy.
    """
    estimator = o.kl_estimator
    kl = kl_penalty(logp, ref_logp, estimator=estimator.removesuffix("+"))
    if o.kl_clamp is not None:
        kl = kl.clamp(-o.kl_clamp, o.kl_clamp)
    if estimator.endswith("+"):
        k2 = kl_penalty(logp, ref_logp, estimator="k2")
        kl = k2 - k2.detach() + kl.detach()
    return kl


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B] int64 index of the last valid token of each row, -1 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, -1).amax(dim=-1)


def kl_penalized_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    kl_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token PPO rewards: a KL penalty on every response token, the sequence score on the last.

    logp, ref_logp, mask: [B, T]; scores: [B]. Returns rewards [B, T]:
    1. kl = kl_penalty(logp, ref_logp) on valid tokens, 0 elsewhere; clamped to
       [-kl_clamp, kl_clamp] when kl_clamp is set (verl's apply_kl_penalty with low_var_kl clamps
       k3 at 10, OpenRLHF's compute_approx_kl every estimator), so a clamped token has no gradient.
    2. rewards = -beta * kl.
    3. rewards[b, last valid token of b] += scores[b]; a row with no valid token stays all zeros.
    """
    mask = mask.bool()
    kl = kl_penalty(torch.where(mask, logp, 0.0), torch.where(mask, ref_logp, 0.0), estimator=estimator)
    if kl_clamp is not None:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    rewards = torch.where(mask, -beta * kl, 0.0)
    last = last_valid_index(mask)
    at_last = torch.arange(mask.shape[-1], device=mask.device) == last.unsqueeze(-1)
    has_valid = (last >= 0).unsqueeze(-1)
    return rewards + torch.where(at_last & has_valid, scores.unsqueeze(-1), 0.0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalised advantage estimation over the valid tokens of each row, as a plain loop over T.

    rewards, values, mask: [B, T]. Returns (advantages, returns), both [B, T]. Walking each row
    from its end, with "next" meaning the next *valid* token of the row (masked tokens are skipped:
    they neither get an advantage nor break the chain) and 0 after the last valid token:
    1. delta_t = r_t + gamma * V_next - V_t
    2. A_t = delta_t + gamma * lam * A_next
    3. R_t = A_t + V_t
    4. A and R are 0 at masked positions.
    This loop is the spec; ``gae_scan`` computes the same thing in log2(T) vectorised steps.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    next_value = torch.zeros_like(rewards[..., 0])
    next_advantage = torch.zeros_like(rewards[..., 0])
    # Columns by unbind, not rewards[..., t]: T indexing ops would each cost an O(B T) backward.
    steps = list(zip(rewards.unbind(-1), values.unbind(-1), mask.unbind(-1)))
    columns = []  # A_t, from t = T - 1 down to 0
    for reward, value, valid in reversed(steps):
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        columns.append(torch.where(valid, advantage, 0.0))
        next_value = torch.where(valid, value, next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    advantages = torch.stack(columns[::-1], dim=-1) if columns else torch.zeros_like(rewards)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


# A masked linear recurrence is a composition of affine maps, so it scans associatively.
# Each token is a map on a state (x, y):  x' = a x + u,  y' = b x + d y + v  (lower triangular).
# Composing "first (a1, b1, d1, u1, v1), then (a2, b2, d2, u2, v2)" gives
#   a = a2 a1,  b = b2 a1 + d2 b1,  d = d2 d1,  u = a2 u1 + u2,  v = b2 u1 + d2 v1 + v2.
# GAE walks right to left with x = V_next, y = A:
#   valid token:  V_next' = V_t            (a = 0, u = V_t)
#                 A'      = gamma V_next + gamma lam A + (r_t - V_t)   (b = gamma, d = gamma lam)
#   masked token: identity                 (a = d = 1, b = u = v = 0)
# Its adjoint walks left to right with x = G (the gradient of delta), y = G at the previous valid
# token (see ``gae_scan_backward``). The Triton kernels use the same maps and combine.


def affine_combine(first, second):
    """Compose two lower-triangular affine maps (a, b, d, u, v): apply ``first``, then ``second``."""
    a1, b1, d1, u1, v1 = first
    a2, b2, d2, u2, v2 = second
    return a2 * a1, b2 * a1 + d2 * b1, d2 * d1, a2 * u1 + u2, b2 * u1 + d2 * v1 + v2


def affine_scan(maps, *, reverse: bool = False):
    """Inclusive scan of per-token affine maps along the last dim (Hillis-Steele, log2(T) steps).

    maps: a tuple (a, b, d, u, v) of [..., T] tensors. Position t of the result is the composition
    of the maps at 0..t (or t..T-1 with ``reverse``, composed right to left).
    """
    if reverse:
        return tuple(m.flip(-1) for m in affine_scan(tuple(m.flip(-1) for m in maps)))
    identity = (1.0, 0.0, 1.0, 0.0, 0.0)
    length = maps[0].shape[-1]
    offset = 1
    while offset < length:
        # position t composes (prefix ending at t - offset) then (prefix of the last `offset` at t)
        shifted = tuple(
            torch.cat([torch.full_like(m[..., :offset], e), m[..., :-offset]], dim=-1)
            for m, e in zip(maps, identity)
        )
        maps = affine_combine(shifted, maps)
        offset *= 2
    return maps


def gae_scan(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """``gae`` as one reverse affine scan: O(T log T) work in log2(T) vectorised steps. [B, T] -> 2 x [B, T]

    Starting from the state (V_next, A) = (0, 0) after the last token, the scanned map at t
    applied to that state is (V_next, A) just after processing t, so A_t is its ``v`` part.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    one, zero = torch.ones_like(rewards), torch.zeros_like(rewards)
    maps = (
        torch.where(mask, zero, one),  # a: V_next' = V_t on a valid token
        torch.where(mask, gamma * one, zero),  # b
        torch.where(mask, gamma * lam * one, one),  # d
        values,  # u
        rewards - values,  # v
    )
    _, _, _, _, advantages = affine_scan(maps, reverse=True)
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


def gae_scan_backward(
    grad_advantages: torch.Tensor,
    grad_returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Gradient of ``gae`` w.r.t. (rewards, values) given those of (advantages, returns). [B, T] each.

    A is linear: A_k = sum over valid j >= k of (gamma lam)^(valid steps from k to j) delta_j, and
    delta_j = r_j + gamma V_next(j) - V_j, R = A + V. So, left to right over valid tokens,
    1. G_k = (gA_k + gR_k) + gamma lam G_prev(k)   (gradient of delta_k; G_prev = 0 at the first)
    2. grad r_k = G_k
    3. grad V_k = gR_k - G_k + gamma G_prev(k)    (V_k is V_next of the previous valid token)
    The scan state is (x, y) = (G, G_prev): valid: x' = gamma lam x + g, y' = x.
    """
    mask = mask.bool()
    g_adv = torch.where(mask, grad_advantages, 0.0)
    g_ret = torch.where(mask, grad_returns, 0.0)
    one, zero = torch.ones_like(g_adv), torch.zeros_like(g_adv)
    maps = (
        torch.where(mask, gamma * lam * one, one),  # a
        torch.where(mask, one, zero),  # b: G_prev' = G
        torch.where(mask, zero, one),  # d
        g_adv + g_ret,  # u
        zero,  # v
    )
    _, _, _, g_delta, g_prev = affine_scan(maps)
    grad_rewards = torch.where(mask, g_delta, 0.0)
    grad_values = torch.where(mask, g_ret - g_delta + gamma * g_prev, 0.0)
    return grad_rewards, grad_values


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True) -> torch.Tensor:
    """Masked whitening over all valid tokens of the batch. [B, T] -> [B, T]

    1. mean = sum(x m) / n over the n valid tokens.
    2. var = sum((x - mean)^2 m) / (n - 1), the unbiased variance (verl's masked_whiten, TRL), or
       / n with ``unbiased=False``, the biased one (OpenRLHF's advantage normalisation); the
       divisor is floored at 1 (with n <= 1 the numerator is 0 anyway).
    3. out = (x - mean) / sqrt(var + 1e-8), plus mean again when ``shift_mean`` is False.
    4. out = 0 at masked positions (and everywhere when n = 0).
    """
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)
    n = mask.sum()
    mean = x.sum() / n.clamp(min=1)
    centered = torch.where(mask, x - mean, 0.0)
    var = (centered * centered).sum() / (n - 1 if unbiased else n).clamp(min=1)
    out = centered / torch.sqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def group_advantages(scores: torch.Tensor, group_size: int, *, mode: str = "grpo", eps: float = 1e-6):
    """Group-relative advantages of sequence scores. [B] -> [B], B = (number of groups) * G

    Rows form contiguous groups of G = group_size (the G samples of one prompt).
    grpo:   (s - mean_g) / (std_g + eps), std unbiased (needs G >= 2)
    drgrpo: s - mean_g                     (Dr. GRPO: no std normalisation)
    rloo:   s - mean of the other G - 1 members of the group = G / (G - 1) * (s - mean_g)
    """
    s = scores.reshape(-1, group_size)
    mean = s.mean(dim=-1, keepdim=True)
    if mode == "grpo":
        out = (s - mean) / (s.std(dim=-1, keepdim=True) + eps)
    elif mode == "drgrpo":
        out = s - mean
    elif mode == "rloo":
        out = s - (s.sum(dim=-1, keepdim=True) - s) / (group_size - 1)
    else:
        raise ValueError(f"mode must be one of {GROUP_MODES}, got {mode!r}")
    return out.reshape(scores.shape)


def indexed_group_advantages(scores: torch.Tensor, index: torch.Tensor, *, mode: str = "grpo", eps: float = 1e-6,
                             lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Group-relative advantages over an arbitrary group index (verl's form). [B] -> [B]

    Rows with equal ``index`` form a group, of any size, in any order. A score that is not finite
    (NaN: the reward could not be computed) takes no part in its group and gets advantage 0; n
    counts the group's finite scores.
    grpo:   (s - mean) / (std + eps), std unbiased;   n = 1: s / (1 + eps)  (verl: mean 0, std 1)
    drgrpo: s - mean;                                 n = 1: s
    rloo:   n / (n - 1) (s - mean);                   n = 1: s
    passk:  GRPO pass@k (Chen et al. 2025, arXiv:2503.19595): the group's best response (the first
            row among equal maxima) gets (max - second max) / (std + eps), every other row 0;
            n = 1: 0 (there is no second response to beat)
    opo:    s - sum(len s) / sum(len) with len = ``lengths`` (OPO's length-weighted optimal
            baseline, Hao et al. 2025, arXiv:2505.23585);   n = 1: s
    """
    groups: dict[int, list[int]] = {}
    for row, key in enumerate(index.tolist()):
        if torch.isfinite(scores[row]):
            groups.setdefault(key, []).append(row)
    out = torch.zeros_like(scores)
    for rows in groups.values():
        s = scores[rows]
        n = len(rows)
        if n == 1:
            out[rows] = {"grpo": s / (1 + eps), "passk": 0 * s}.get(mode, s)
            continue
        mean, std = s.mean(), s.std()
        if mode == "grpo":
            out[rows] = (s - mean) / (std + eps)
        elif mode == "drgrpo":
            out[rows] = s - mean
        elif mode == "rloo":
            out[rows] = n / (n - 1) * (s - mean)
        elif mode == "passk":
            best = int(torch.argmax(s))  # torch.argmax returns the first maximal index
            second = torch.cat([s[:best], s[best + 1 :]]).max()
            out[rows[best]] = (s[best] - second) / (std + eps)
        elif mode == "opo":
            length = lengths[rows].to(s.dtype)
            out[rows] = s - (length * s).sum() / length.sum()
        else:
            raise ValueError(f"mode must be one of {INDEXED_GROUP_MODES}, got {mode!r}")
    return out


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", *,
              max_response_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """Reduce a per-token loss [B, T] over its valid tokens to a scalar.

    token-mean:              sum(l m) / sum(m)
    seq-mean-token-mean:     mean over rows with a valid token of (row sum / row count)
    seq-mean-token-sum:      sum(l m) / B          (mean over all rows of the row sums)
    seq-mean-token-sum-norm: sum(l m) / (B L)      (Dr. GRPO's constant normaliser, arXiv:2503.20783:
                                                    L = max_response_length, or T when None)
    token-sum:               sum(l m)
    No valid token at all gives 0 (the counts are floored at 1).
    """
    mask = mask.bool()
    loss = torch.where(mask, loss, 0.0)
    if agg == "token-mean":
        return loss.sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        row_count = mask.sum(-1)
        row_mean = loss.sum(-1) / row_count.clamp(min=1)
        return row_mean.sum() / (row_count > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        return loss.sum() / max(mask.shape[0], 1)
    if agg == "seq-mean-token-sum-norm":
        length = mask.shape[1] if max_response_length is None else max_response_length
        return loss.sum() / max(mask.shape[0] * length, 1)
    if agg == "token-sum":
        return loss.sum()
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the valid tokens, 0 when there is none. [B, T] -> []"""
    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(ratio, adv, o):
    """max(-A r, -A clamp(r, 1 - clip_eps, 1 + clip_eps_high)) per token (-A r with clip_eps None),
    and where the clip won."""
    pg = -adv * ratio
    if o.clip_eps is None:
        return pg, torch.zeros_like(ratio, dtype=torch.bool)
    high = o.clip_eps if o.clip_eps_high is None else o.clip_eps_high
    pg_clipped = -adv * torch.clamp(ratio, 1 - o.clip_eps, 1 + high)
    return torch.maximum(pg, pg_clipped), pg_clipped > pg


def gspo_terms(logp, old_logp, adv, mask, o):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071), on masked [B, T] inputs.

    1. log s_i = (1 / |y_i|) sum_t (logp - old_logp): the length-normalised sequence ratio (eq. 7).
    2. "gspo": A_i = mean of the advantages over the sequence's tokens; every token carries
       max(-s_i A_i, -clip(s_i) A_i) (eq. 5), so seq-mean-token-mean averages over sequences.
    3. "gspo_token": s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)] (eq. 13), equal to s_i in value with
       gradient s_i d log pi(y_t); loss_t = max(-s_{i,t} A_t, -clip(s_{i,t}) A_t) (eq. 14).
    """
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    log_s = ((logp - old_logp).sum(-1, keepdim=True) / count).expand_as(logp)
    if o.objective == "gspo":
        adv = (adv.sum(-1, keepdim=True) / count).expand_as(logp)
    else:
        log_s = log_s.detach() + logp - logp.detach()
    return clipped_surrogate(torch.exp(log_s), adv, o)


def cispo_terms(logp, old_logp, adv, mask, o):
    """CISPO (arXiv:2506.13585, eq. 4-5): -sg(clip(r, 1 - clip_eps, 1 + clip_eps_high)) A log pi;
    clip_eps None: no lower bound; both None: no clip."""
    ratio = torch.exp(logp - old_logp).detach()
    high = o.clip_eps_high if o.clip_eps_high is not None else o.clip_eps
    weight = ratio
    if o.clip_eps is not None or high is not None:
        weight = ratio.clamp(min=None if o.clip_eps is None else 1 - o.clip_eps, max=None if high is None else 1 + high)
    return -weight * adv * logp, weight != ratio


def sapo_terms(logp, old_logp, adv, mask, o):
    """SAPO (arXiv:2511.20347, eq. 5-6): -A (4 / tau) sigmoid(tau (r - 1)), tau by the sign of A;
    log r clamped to [-20, 20] (verl)."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    tau = torch.where(adv > 0, o.sapo_tau_pos, o.sapo_tau_neg)
    return -adv * (4 / tau) * torch.sigmoid(tau * (ratio - 1)), torch.zeros_like(mask)


def gmpo_terms(logp, old_logp, adv, mask, o):
    """GMPO (arXiv:2507.20673): s_i = exp(mean_t sgn(A) min(sgn(A) x, sgn(A) clamp(x, -l, h))),
    x = log r; every token of response i carries -A_i s_i, A_i its mean advantage."""
    x = logp - old_logp
    clipped = torch.zeros_like(mask)
    if o.clip_eps is not None:
        high = o.clip_eps if o.clip_eps_high is None else o.clip_eps_high
        sign = torch.sign(adv)
        x_clamped = x.clamp(-o.clip_eps, high)
        clipped = (x != x_clamped) & (adv > 0)
        x = sign * torch.minimum(sign * x, sign * x_clamped)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    s = torch.exp((x * mask).sum(-1, keepdim=True) / count)
    seq_adv = (adv * mask).sum(-1, keepdim=True) / count
    return (-seq_adv * s).expand_as(logp), clipped


def gpg_terms(logp, old_logp, adv, mask, o):
    """GPG (arXiv:2504.02546): -A log pi."""
    return -adv * logp, torch.zeros_like(mask)


def covariance(logp, adv, mask):
    """(A - mean A)(log pi - mean log pi) per token, means over the valid tokens (detached)."""
    logp, adv = logp.detach(), adv.detach()
    return (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp, mask))


def clip_cov_terms(logp, old_logp, adv, mask, o):
    """Clip-Cov (arXiv:2505.22617): the clipped surrogate, detached at a random cov_ratio share (at
    least 1) of the valid unclipped tokens with covariance in (clip_cov_lb, clip_cov_ub)."""
    pg, clipped = clipped_surrogate(torch.exp(logp - old_logp), adv, o)
    cov = covariance(logp, adv, mask)
    candidates = (mask & ~clipped & (cov > o.clip_cov_lb) & (cov < o.clip_cov_ub)).reshape(-1).nonzero()[:, 0]
    limit = max(int(o.cov_ratio * int(mask.sum())), 1)
    cut = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    cut[candidates[torch.randperm(len(candidates))[:limit]]] = True
    return torch.where(cut.view(mask.shape), pg.detach(), pg), clipped


def kl_cov_terms(logp, old_logp, adv, mask, o):
    """KL-Cov (arXiv:2505.22617): -A r, plus kl_cov_coef |log r| on the cov_ratio share (at least 1)
    of valid tokens with the largest covariance."""
    log_ratio = logp - old_logp
    cov = torch.where(mask, covariance(logp, adv, mask), -torch.inf).reshape(-1)
    n = int(mask.sum())
    picked = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if n:
        picked[torch.topk(cov, min(max(int(o.cov_ratio * n), 1), n)).indices] = True
    penalty = torch.where(picked.view(mask.shape), o.kl_cov_coef * log_ratio.abs(), 0.0)
    return -adv * torch.exp(log_ratio) + penalty, torch.zeros_like(mask)


def rollout_correction(old_logp, rollout_logp, mask, o):
    """Rollout importance correction (TIS / MIS; rlhf_fast.rollout_correction), on [B, T]:
    1. log w_t = old_logp - rollout_logp; "sequence": sum over the response, "geometric": its mean.
    2. "truncate": weights min(w, threshold) (clamp(w, threshold_low, threshold) when threshold_low
       is given), mask unchanged; "mask": keep the tokens with threshold_low <= w <= threshold
       (threshold_low None: 1 / threshold), weights 1; "masked_weight": mask unchanged, weights
       w where threshold_low <= w <= threshold, else 0 (TRL's token_mask / sequence_mask).
    Returns (mask, weights, stats): the mismatch's |log w_t| mean and max, KL(rollout || old) by
    k1 and k3, chi-square E[w_t^2] - 1, and the weights' mean, max and truncated/masked fraction."""
    log_w_token = torch.where(mask, old_logp - rollout_logp, 0.0)
    log_w = log_w_token
    if o.rollout_is in ("sequence", "geometric"):
        log_w = log_w_token.sum(-1, keepdim=True)
        if o.rollout_is == "geometric":
            log_w = log_w / mask.sum(-1, keepdim=True).clamp(min=1)
        log_w = log_w.expand_as(log_w_token)
    w, w_token = torch.exp(log_w), torch.exp(log_w_token)
    stats = {
        "rollout_log_ratio_abs_mean": masked_mean(log_w_token.abs(), mask),
        "rollout_log_ratio_abs_max": torch.where(mask, log_w_token.abs(), 0.0).amax(),
        "rollout_kl_k1": masked_mean(-log_w_token, mask),
        "rollout_kl_k3": masked_mean(w_token - 1 - log_w_token, mask),
        "rollout_chi2": masked_mean(w_token**2 - 1, mask),
    }
    if o.rollout_is_mode == "truncate":
        low = o.rollout_is_threshold_low or 0.0
        weights = w.clamp(min=low, max=o.rollout_is_threshold)
        stats["rollout_is_truncated_frac"] = masked_mean(((w > o.rollout_is_threshold) | (w < low)).to(w.dtype), mask)
        stats["rollout_is_weight_mean"] = masked_mean(weights, mask)
        stats["rollout_is_weight_max"] = torch.where(mask, weights, 0.0).amax()
        return mask, weights, stats
    low = 1 / o.rollout_is_threshold if o.rollout_is_threshold_low is None else o.rollout_is_threshold_low
    kept = mask & (w >= low) & (w <= o.rollout_is_threshold)
    stats["rollout_is_masked_frac"] = masked_mean((~kept).to(w.dtype), mask)
    if o.rollout_is_mode == "masked_weight":
        weights = torch.where(kept, w, 0.0)
        stats["rollout_is_weight_mean"] = masked_mean(weights, mask)
        stats["rollout_is_weight_max"] = torch.where(mask, weights, 0.0).amax()
        return mask, weights, stats
    stats["rollout_is_weight_mean"] = masked_mean(w, kept)
    stats["rollout_is_weight_max"] = torch.where(kept, w, 0.0).amax()
    return kept, torch.ones_like(w), stats


OBJECTIVE_TERMS = {"cispo": cispo_terms, "sapo": sapo_terms, "gmpo": gmpo_terms, "gpg": gpg_terms,
                   "clip_cov": clip_cov_terms, "kl_cov": kl_cov_terms}  # fmt: skip


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    **option_kwargs,
):
    """Clipped policy-gradient (PPO / GRPO / GSPO) loss. logp, old_logp, mask [B, T]; advantages [B, T] or [B].
    ``options``: a PolicyLossOptions, or its fields as keywords (objective, clip_eps, ...).
    Steps 1-3 are objective="ppo"; the others replace them with their terms (``gspo_terms``,
    ``OBJECTIVE_TERMS``). Each returns the per-token loss and where a clip bit (for clipfrac).

    1. ratio = exp(logp - old_logp); A broadcast over T when it is [B].
    2. pg = max(-A ratio, -A clamp(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)));
       clip_eps None gives pg = -A ratio (REINFORCE).
    3. dual clip c: where A < 0, pg = min(pg, -A c).
    4. with ref_logp: pg += kl_coef * kl_loss(logp, ref_logp) (kl_penalty with the options'
       clamp and straight-through gradient), times ratio with kl_is_correction (TRL's
       use_bias_correction_kl, DeepSeek-V3.2, arXiv:2512.02556: the KL of samples drawn from
       pi_old, corrected to pi).
    5. loss = aggregate(pg, mask, agg).
    With options.rollout_is, ``rollout_correction`` first: its mask replaces ``mask``, and pg (before
    the KL term) is multiplied by its weights. With top_entropy_quantile q < 1, pg (before the KL
    term) is also multiplied by the high-entropy mask: entropy >= the (1 - q) quantile of the valid
    tokens' entropies (TRL's top_entropy_quantile; Wang et al. 2025, arXiv:2506.01939).
    Returns (loss, stats): clipfrac, approx_kl (k3 of old vs new), ratio_mean, ratio_max, and kl
    when ref_logp is given, as detached means over the valid tokens.
    """
    o = take(PolicyLossOptions, options, option_kwargs)
    no_leftovers("policy_loss", option_kwargs, PolicyLossOptions)
    mask = mask.bool()
    stats, weights = {}, 1.0
    if o.rollout_is is not None:
        mask, weights, stats = rollout_correction(old_logp.detach(), rollout_logp, mask, o)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    logp = torch.where(mask, logp, 0.0)
    old_logp = torch.where(mask, old_logp, 0.0)
    adv = torch.where(mask, advantages, 0.0)
    ratio = torch.exp(logp - old_logp)
    if o.objective == "ppo":
        pg, clipped = clipped_surrogate(ratio, adv, o)
        if o.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * o.dual_clip), pg)
    elif o.objective in ("gspo", "gspo_token"):
        pg, clipped = gspo_terms(logp, old_logp, adv, mask, o)
    else:
        pg, clipped = OBJECTIVE_TERMS[o.objective](logp, old_logp, adv, mask, o)
    pg = pg * weights
    if o.top_entropy_quantile < 1:
        threshold = torch.quantile(entropy.detach()[mask].double(), 1 - o.top_entropy_quantile) if mask.any() else torch.inf
        keep = mask & (entropy.detach() >= threshold)
        pg = pg * keep
        stats["entropy_mask_frac"] = masked_mean(keep.to(pg.dtype), mask)
    if ref_logp is not None:
        kl = kl_loss(logp, torch.where(mask, ref_logp, 0.0), o)
        pg = pg + o.kl_coef * (kl * ratio if o.kl_is_correction else kl)
        stats["kl"] = masked_mean(kl, mask).detach()
    loss = aggregate(pg, mask, o.agg, max_response_length=o.max_response_length)
    ratio = ratio.detach()
    stats["clipfrac"] = masked_mean(clipped.to(ratio.dtype), mask)
    stats["approx_kl"] = masked_mean(kl_penalty(old_logp, logp.detach(), estimator="k3"), mask)
    stats["ratio_mean"] = masked_mean(ratio, mask)
    stats["ratio_max"] = torch.where(mask, ratio, 0.0).amax()  # ratios are > 0: an empty mask gives 0
    return loss, stats


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    **option_kwargs,
):
    """``policy_loss`` straight from logits [B, T, V] and labels [B, T], minus an entropy bonus.

    1. logp, entropy = token_logprobs(logits, labels, temperature) (labels at masked positions ignored).
    2. loss, stats = policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, options=options).
    3. loss -= entropy_coef * aggregate(entropy, mask, options.agg); stats["entropy"] = mean entropy.
    With options.rollout_is in mask mode, ``mask`` is the correction's in every step.
    """
    options = take(PolicyLossOptions, options, option_kwargs)
    no_leftovers("fused_policy_loss", option_kwargs, PolicyLossOptions)
    given = mask.bool()
    mask = given if options.rollout_is is None else rollout_correction(old_logp, rollout_logp, given, options)[0]
    labels = torch.where(mask, labels, IGNORE_INDEX)
    logp, entropy = token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    loss, stats = policy_loss(logp, old_logp, advantages, given, ref_logp=ref_logp, rollout_logp=rollout_logp,
                              entropy=entropy, options=options)  # fmt: skip
    loss = loss - entropy_coef * aggregate(entropy, mask, options.agg, max_response_length=options.max_response_length)
    stats["entropy"] = masked_mean(entropy, mask).detach()
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
    agg: str = "token-mean",
) -> torch.Tensor:
    """PPO value loss. [B, T] each -> []

    1. unclipped = (v - R)^2
    2. with clip_eps: clipped = (old + clamp(v - old, -eps, eps) - R)^2, l = max(unclipped, clipped)
    3. loss = aggregate(0.5 l, mask, agg)
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)
    old_values = torch.where(mask, old_values, 0.0)
    returns = torch.where(mask, returns, 0.0)
    per_token = (values - returns) ** 2
    if clip_eps is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        per_token = torch.maximum(per_token, (clipped - returns) ** 2)
    return aggregate(0.5 * per_token, mask, agg)


def pairwise_reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
):
    """Bradley-Terry reward-model loss on paired scores. chosen, rejected, margin: [B] -> []

    1. loss = mean(-log sigmoid(c - r - margin)) (margin 0 when None)
    2. loss += center_coef * mean((c + r)^2), which keeps the rewards centred at 0.
    Returns (loss, stats): accuracy = mean(c > r), margin = mean(c - r).
    """
    diff = chosen - rejected
    shifted = diff if margin is None else diff - margin
    loss = -torch.nn.functional.logsigmoid(shifted).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    stats = {
        "accuracy": (diff > 0).to(diff.dtype).mean().detach(),
        "margin": diff.mean().detach(),
    }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Linear-head forms: the same objectives from the last hidden states [..., H] and the lm_head
# weight [V, H] (bias [V] optional). The fused versions never materialise these [N, V] logits.
# ---------------------------------------------------------------------------------------------


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """The lm_head: hidden [..., H] @ weight [V, H].T + bias [V] -> logits [..., V], then the
    head's logit transform in the order transformers applies it (Cohere and Granite scale the
    head's output; Gemma 2 soft-caps it; MuseSpark scales, then caps):

    1. z = hidden @ weight.T + bias.
    2. z = logit_scale * z (``LinearOptions.logit_scale``).
    3. z = c * tanh(z / c) with c = logit_softcap, if not None.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale != 1:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
):
    """``token_logprobs`` of the lm_head's logits. hidden [..., H], weight [V, H], labels [...] -> [...]"""
    return token_logprobs(
        linear_logits(hidden, weight, bias, logit_scale=logit_scale, logit_softcap=logit_softcap), labels,
        temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
    )  # fmt: skip


def linear_sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """``sft_loss`` of the lm_head's logits. hidden [..., H], weight [V, H], labels [...] -> []"""
    logits = linear_logits(hidden, weight, bias, logit_scale=logit_scale, logit_softcap=logit_softcap)
    return sft_loss(logits, labels, ignore_index=ignore_index)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    **policy_options,
):
    """``fused_policy_loss`` of the lm_head's logits. hidden [B, T, H], weight [V, H], the rest [B, T]."""
    return fused_policy_loss(
        linear_logits(hidden, weight, bias, logit_scale=logit_scale, logit_softcap=logit_softcap), labels, old_logp,
        advantages, mask, temperature=temperature, entropy_coef=entropy_coef, **policy_options,
    )  # fmt: skip
