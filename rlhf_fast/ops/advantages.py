"""Advantages from rollouts: gae, whiten, group_advantages and the fused ppo_advantages pipeline.

Each op validates once, converts its [B, T] inputs to the kernel contract of
``rlhf_fast/backends/base.py`` (float32, contiguous, bool mask) and calls a ``rlhf_fast::`` op
that resolves the provider at run time. Gradients: gae through the provider's adjoint scan,
whiten and group_advantages in closed form in torch (the derivations sit next to the code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate as check
from ..backends import registry
from ..choices import GROUP_MODES, INDEXED_GROUP_MODES, KL_ESTIMATORS
from ..reference import WHITEN_EPS
from .indexed_groups import indexed_group_advantages
from .kl import check_kl_clamp, kl_penalized_rewards


def _bt(name: str, value, like: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Validate a [B, T] float tensor (shaped like ``like`` when given)."""
    if like is None:
        check.tensor(name, value, dtypes=check.FLOAT_DTYPES)
        if value.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T]; got {check.describe(value)}")
        return value
    return check.tensor(name, value, dtypes=check.FLOAT_DTYPES, shape=like[1].shape, like=like)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


def _resolve(backend: str, x: torch.Tensor, op: str):
    return registry.resolve(backend, x.device, torch.float32, op=op)


# ---------------------------------------------------------------------------------------------
# gae
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::gae_fwd", mutates_args=())
def _gae_forward_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] float32 rewards, values, bool mask -> advantages, returns [B, T] float32."""
    advantages, returns = torch.empty_like(rewards), torch.empty_like(rewards)
    if rewards.numel() > 0:
        _resolve(backend, rewards, "gae").gae_forward(rewards, values, mask, advantages, returns, gamma, lam)
    return advantages, returns


@_gae_forward_op.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.custom_op("rlhf_fast::gae_bwd", mutates_args=())
def _gae_backward_op(
    grad_advantages: torch.Tensor, grad_returns: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of rewards and values [B, T] float32 (reference.gae_scan_backward)."""
    grad_rewards, grad_values = torch.empty_like(grad_advantages), torch.empty_like(grad_advantages)
    if grad_advantages.numel() > 0:
        prov = _resolve(backend, grad_advantages, "gae")
        prov.gae_backward(grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam)
    return grad_rewards, grad_values


@_gae_backward_op.register_fake
def _(grad_advantages, grad_returns, mask, gamma, lam, backend):
    return torch.empty_like(grad_advantages), torch.empty_like(grad_advantages)


def _gae_setup(ctx, inputs, output):
    _, _, mask, gamma, lam, backend = inputs
    ctx.save_for_backward(mask)
    ctx.options = (gamma, lam, backend)


def _gae_backward(ctx, grad_advantages, grad_returns):
    (mask,) = ctx.saved_tensors
    gamma, lam, backend = ctx.options
    zeros = None
    if grad_advantages is None or grad_returns is None:
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    grad_advantages = zeros if grad_advantages is None else grad_advantages.float().contiguous()
    grad_returns = zeros if grad_returns is None else grad_returns.float().contiguous()
    grad_rewards, grad_values = _gae_backward_op(grad_advantages, grad_returns, mask, gamma, lam, backend)
    return grad_rewards, grad_values, None, None, None, None


_gae_forward_op.register_autograd(_gae_backward, setup_context=_gae_setup)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
):
    """Generalised advantage estimation over the valid tokens of each row (a per-row reverse scan).

    Args:
        rewards, values: [B, T] float per-token rewards and value estimates.
        mask: [B, T] bool or 0/1, True on response tokens. "Next" means the next *valid* token of
            the row: masked positions are skipped (they neither get an advantage nor break the
            chain) and the value after the last valid token is 0. Values and rewards at masked
            positions (NaN included) change nothing.
        gamma, lam: discount and GAE lambda, in [0, 1].
        backend: "auto", "triton", "cuda", "host" or "torch".

    Returns:
        (advantages, returns), [B, T] float32, 0 at masked positions; returns = advantages + values.
        Differentiable w.r.t. rewards and values.
    """
    _bt("rewards", rewards)
    _bt("values", values, like=("rewards", rewards))
    mask = check.mask("mask", mask, shape=rewards.shape, like=("rewards", rewards))
    gamma = check.number("gamma", gamma, low=0.0, high=1.0)
    lam = check.number("lam", lam, low=0.0, high=1.0)
    registry.check_backend_name(backend)
    return _gae_forward_op(_f32(rewards), _f32(values), mask.contiguous(), gamma, lam, backend)


# ---------------------------------------------------------------------------------------------
# whiten
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::whiten", mutates_args=())
def _whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, backend: str) -> torch.Tensor:
    """[B, T] float32, bool mask -> whitened [B, T] float32 (reference.whiten)."""
    out = torch.empty_like(x)
    if x.numel() > 0:
        _resolve(backend, x, "whiten").whiten_forward(x, mask, out, shift_mean, unbiased)
    return out


@_whiten_op.register_fake
def _(x, mask, shift_mean, unbiased, backend):
    return torch.empty_like(x)


def _whiten_setup(ctx, inputs, output):
    x, mask, shift_mean, unbiased, _ = inputs
    ctx.save_for_backward(x, mask)
    ctx.options = (shift_mean, unbiased)


def _whiten_backward(ctx, grad):
    # Over the n valid tokens, c = x - mean, s = sqrt(var + eps), var = sum(c^2) / k, y = c / s, with
    # k = n - 1 (unbiased) or k = n (biased), floored at 1, a constant of x:
    #   d c_j / d x_i = 1[i == j] - 1/n,   d s / d x_i = c_i / (k s)   (as sum(c) = 0)
    # so  grad x_i = g_i / s - sum(g) / (n s) - c_i sum(g c) / (k s^3),
    # plus sum(g) / n when the mean is added back (shift_mean False). The biased form differs only
    # in k: at n = 1, c = 0 and both give g / s - g / s = 0.
    x, mask = ctx.saved_tensors
    shift_mean, unbiased = ctx.options
    g = torch.where(mask, grad, 0.0)
    n = mask.sum()
    n1, dof = n.clamp(min=1), (n - 1 if unbiased else n).clamp(min=1)
    xm = torch.where(mask, x, 0.0)
    c = torch.where(mask, xm - xm.sum() / n1, 0.0)
    s = torch.sqrt((c * c).sum() / dof + WHITEN_EPS)
    g_sum = g.sum()
    grad_x = g / s - g_sum / (n1 * s) - c * ((g * c).sum() / (dof * s**3))
    if not shift_mean:
        grad_x = grad_x + g_sum / n1
    return torch.where(mask, grad_x, 0.0), None, None, None, None


_whiten_op.register_autograd(_whiten_backward, setup_context=_whiten_setup)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Masked whitening over all valid tokens of the batch: (x - mean) / sqrt(var + 1e-8).

    Args:
        x: [B, T] float (typically advantages).
        mask: [B, T] bool or 0/1; only valid tokens enter the mean and the variance.
        shift_mean: False adds the mean back (rescale without centring).
        unbiased: divide the sum of squares by n - 1 (verl's masked_whiten, TRL), or by n with
            False (OpenRLHF's advantage normalisation); either divisor is floored at 1.
        backend: "auto", "triton", "cuda", "host" or "torch".

    Returns:
        [B, T] float32, 0 at masked positions (everywhere when no token is valid).
        Differentiable w.r.t. x. No host synchronisation.
    """
    _bt("x", x)
    mask = check.mask("mask", mask, shape=x.shape, like=("x", x))
    registry.check_backend_name(backend)
    return _whiten_op(_f32(x), mask.contiguous(), bool(shift_mean), bool(unbiased), backend)


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::group_advantages", mutates_args=())
def _group_advantages_op(scores: torch.Tensor, group_size: int, mode: str, eps: float, backend: str) -> torch.Tensor:
    """[B] float32 -> [B] float32 (reference.group_advantages)."""
    out = torch.empty_like(scores)
    if scores.numel() > 0:
        _resolve(backend, scores, "group_advantages").group_advantages_forward(scores, out, group_size, mode, eps)
    return out


@_group_advantages_op.register_fake
def _(scores, group_size, mode, eps, backend):
    return torch.empty_like(scores)


def _group_setup(ctx, inputs, output):
    scores, group_size, mode, eps, _ = inputs
    ctx.save_for_backward(scores)
    ctx.options = (group_size, mode, eps)


def _group_backward(ctx, grad):
    # Per group of G, dev = s - mean: d dev_j / d s_i = 1[i == j] - 1/G, so
    #   drgrpo: grad s = g - mean(g);  rloo: G / (G - 1) (g - mean(g)).
    # grpo: y = dev / (sigma + eps), sigma = sqrt(sum(dev^2) / (G - 1)), d sigma / d s_i = dev_i / ((G - 1) sigma):
    #   grad s_i = (g_i - mean(g)) / (sigma + eps) - dev_i sum(g dev) / ((G - 1) sigma (sigma + eps)^2)
    # (the second term vanishes with sigma = 0, where every dev is 0).
    (scores,) = ctx.saved_tensors
    group_size, mode, eps = ctx.options
    g = grad.view(-1, group_size)
    g_centered = g - g.mean(dim=-1, keepdim=True)
    if mode == "drgrpo":
        return g_centered.view(-1), None, None, None, None
    if mode == "rloo":
        return (g_centered * (group_size / (group_size - 1))).view(-1), None, None, None, None
    s = scores.view(-1, group_size)
    dev = s - s.mean(dim=-1, keepdim=True)
    sigma = torch.sqrt((dev * dev).sum(dim=-1, keepdim=True) / (group_size - 1))
    scale = (g * dev).sum(dim=-1, keepdim=True) / ((group_size - 1) * torch.where(sigma > 0, sigma, 1.0) * (sigma + eps) ** 2)
    grad_s = g_centered / (sigma + eps) - dev * torch.where(sigma > 0, scale, 0.0)
    return grad_s.view(-1), None, None, None, None


_group_advantages_op.register_autograd(_group_backward, setup_context=_group_setup)


def group_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
    index: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Group-relative advantages of the samples of each prompt: contiguous groups of ``group_size``
    rows, or the rows that share an ``index`` value (verl's form).

    Args:
        scores: [B] float sequence scores.
        group_size: G, for groups of G consecutive rows (B divisible by G; >= 2 for "grpo", "rloo"
            and "passk"). Give this or ``index``.
        mode: "grpo" = (s - mean_g) / (std_g + eps) with the unbiased std; "drgrpo" = s - mean_g;
            "rloo" = s minus the mean of the other members; "passk" = GRPO pass@k, only each
            group's best row gets (max - second max) / (std_g + eps); "opo" = s minus the
            length-weighted mean of the group (needs ``lengths``). See
            reference.group_advantages and reference.indexed_group_advantages.
        eps: added to the std in "grpo" and "passk" (> 0).
        index: [B] integer group ids (any values, any order, groups of any size). Singleton
            groups follow verl (grpo s / (1 + eps), drgrpo / rloo / opo s, passk 0), and a score
            that is not finite (an unscorable response) is left out of its group and gets 0.
        lengths: [B] response lengths in tokens, for "opo".
        backend: "auto", "triton", "cuda", "host" or "torch": the kernel of the contiguous
            grpo / drgrpo / rloo case. The other cases are segment reductions in torch on the
            scores' device (no host synchronisation), whatever the backend.

    Returns:
        [B] float32; a group of identical scores gives exactly 0. Differentiable w.r.t. scores.
    """
    check.tensor("scores", scores, dtypes=check.FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [B]; got {check.describe(scores)}")
    check.choice("mode", mode, INDEXED_GROUP_MODES)
    eps = check.positive_finite("eps", eps)
    registry.check_backend_name(backend)
    lengths = _check_lengths(lengths, mode, scores)
    if (group_size is None) == (index is None):
        raise ValueError("group_advantages needs exactly one of group_size (contiguous groups) and index (group ids); "
                         f"got group_size={group_size!r} and index={'None' if index is None else check.describe(index)}")  # fmt: skip
    if index is None:
        group_size = check.group_size(group_size, scores.shape[0], mode=mode)
        if mode in GROUP_MODES:
            return _group_advantages_op(_f32(scores), group_size, mode, eps, backend)
        index = torch.arange(scores.shape[0], device=scores.device) // group_size
    else:
        check.tensor("index", index, dtypes=check.INDEX_DTYPES, shape=scores.shape, like=("scores", scores))
    return indexed_group_advantages(scores.float(), index, mode, eps, lengths)


def _check_lengths(lengths, mode: str, scores: torch.Tensor):
    if mode != "opo":
        if lengths is not None:
            raise ValueError(f"lengths is the response lengths of mode='opo'; got it with mode={mode!r}")
        return None
    if lengths is None:
        raise ValueError("mode='opo' weighs each score by its response length: pass lengths=[B] token counts")
    return check.tensor("lengths", lengths, dtypes=check.INDEX_DTYPES + check.FLOAT_DTYPES, shape=scores.shape,
                        like=("scores", scores))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# ppo_advantages: rewards -> GAE -> whitening, fused
# ---------------------------------------------------------------------------------------------


class PPOAdvantages(NamedTuple):
    """Outputs of ``ppo_advantages``, each [B, T] float32 and 0 at masked positions."""

    advantages: torch.Tensor  # GAE advantages, whitened over the batch when asked
    returns: torch.Tensor  # value targets: advantages (before whitening) + values
    rewards: torch.Tensor  # the KL-penalised per-token rewards


@torch.library.custom_op("rlhf_fast::ppo_advantages", mutates_args=())
def _ppo_advantages_op(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str,
    gamma: float,
    lam: float,
    whiten: bool,
    kl_clamp: float | None,
    unbiased: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] float32 x3, [B] float32, bool mask -> advantages, returns, rewards [B, T] float32."""
    advantages, returns, rewards = (torch.empty_like(logp) for _ in range(3))
    if logp.numel() > 0:
        prov = _resolve(backend, logp, "ppo_advantages")
        prov.ppo_advantages_forward(
            logp, ref_logp, scores, values, mask, rewards, advantages, returns, beta, estimator, gamma, lam, whiten,
            kl_clamp, unbiased,
        )  # fmt: skip
    return advantages, returns, rewards


@_ppo_advantages_op.register_fake
def _(logp, ref_logp, scores, values, mask, beta, estimator, gamma, lam, whiten, kl_clamp, unbiased, backend):
    return tuple(torch.empty_like(logp) for _ in range(3))


def ppo_advantages(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    kl_clamp: float | None = None,
    unbiased: bool = True,
    backend: str = "auto",
) -> PPOAdvantages:
    """The PPO advantage pipeline in one pass where the backend fuses it (Triton: two launches).

    Equal to ``rewards = kl_penalized_rewards(logp, ref_logp, scores, mask, beta, estimator,
    kl_clamp)``, ``advantages, returns = gae(rewards, values, mask, gamma, lam)`` and, with
    ``whiten``, ``advantages = whiten(advantages, mask, unbiased=unbiased)``; see those for the
    arguments (``unbiased`` is the whitening's variance: False for OpenRLHF's biased one). When no
    input needs a gradient (the usual rollout case) one fused op runs; otherwise the
    differentiable steps are composed, with the same result.

    Returns:
        PPOAdvantages(advantages, returns, rewards), each [B, T] float32.
    """
    _bt("logp", logp)
    for name, value in (("ref_logp", ref_logp), ("values", values)):
        _bt(name, value, like=("logp", logp))
    check.tensor("scores", scores, dtypes=check.FLOAT_DTYPES, shape=logp.shape[:1], like=("logp", logp))
    mask = check.mask("mask", mask, shape=logp.shape, like=("logp", logp))
    beta = check.number("beta", beta, low=0.0)
    check.choice("estimator", estimator, KL_ESTIMATORS)
    gamma = check.number("gamma", gamma, low=0.0, high=1.0)
    lam = check.number("lam", lam, low=0.0, high=1.0)
    kl_clamp = check_kl_clamp(kl_clamp)
    registry.check_backend_name(backend)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (logp, ref_logp, scores, values))
    if needs_grad:
        rewards = kl_penalized_rewards(logp, ref_logp, scores, mask, beta=beta, estimator=estimator,
                                       kl_clamp=kl_clamp, backend=backend)  # fmt: skip
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
        if whiten:
            advantages = _whiten_op(advantages, mask.contiguous(), True, bool(unbiased), backend)
        return PPOAdvantages(advantages, returns, rewards)
    outputs = _ppo_advantages_op(
        _f32(logp), _f32(ref_logp), _f32(scores), _f32(values), mask.contiguous(),
        beta, estimator, gamma, lam, bool(whiten), kl_clamp, bool(unbiased), backend,
    )  # fmt: skip
    return PPOAdvantages(*outputs)
