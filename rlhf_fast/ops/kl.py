"""kl_penalty and kl_penalized_rewards: per-token KL estimates and the PPO reward built from them.

``kl_penalty`` is elementwise torch (autograd does its gradient). ``kl_penalized_rewards`` runs
the provider's ``kl_rewards_forward`` kernel through the ``rlhf_fast::kl_rewards`` op; its
gradient (w.r.t. logp, ref_logp and scores) is elementwise and written here in torch.
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..backends import registry
from ..choices import KL_ESTIMATORS
from ..kl_estimators import kl_grad, kl_values


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from the log-probs of the sampled tokens.

    With d = logp - ref_logp: "k1" = d, "k2" = d^2 / 2, "k3" = e^{-d} + d - 1 (>= 0, exactly 0 at
    d = 0), "abs" = |d|. logp, ref_logp: same shape, float; returns float32 of that shape,
    differentiable w.r.t. both (k3 stays accurate in float32 for tiny d, see ``k3_of``).
    """
    check.tensor("logp", logp, dtypes=check.FLOAT_DTYPES)
    check.tensor("ref_logp", ref_logp, dtypes=check.FLOAT_DTYPES, shape=logp.shape, like=("logp", logp))
    check.choice("estimator", estimator, KL_ESTIMATORS)
    return kl_values(logp.float(), ref_logp.float(), estimator)


@torch.library.custom_op("rlhf_fast::kl_rewards", mutates_args=())
def _kl_rewards_op(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str,
    kl_clamp: float | None,
    backend: str,
) -> torch.Tensor:
    """[B, T] float32 x2, [B] float32, [B, T] bool -> rewards [B, T] float32."""
    rewards = torch.empty_like(logp)
    if logp.numel() > 0:
        prov = registry.resolve(backend, logp.device, logp.dtype, op="kl_rewards")
        prov.kl_rewards_forward(logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp)
    return rewards


@_kl_rewards_op.register_fake
def _(logp, ref_logp, scores, mask, beta, estimator, kl_clamp, backend):
    return torch.empty_like(logp)


def _kl_rewards_setup(ctx, inputs, output):
    logp, ref_logp, scores, mask, beta, estimator, kl_clamp, _ = inputs
    ctx.save_for_backward(logp, ref_logp, mask)
    ctx.options = (beta, estimator, kl_clamp)


def _kl_rewards_backward(ctx, grad):
    # rewards = -beta clamp(kl(logp, ref), -c, c) on valid tokens + scores[b] at the last valid
    # token. The clamp passes the gradient where -c <= kl <= c (torch.clamp's rule), 0 elsewhere.
    logp, ref_logp, mask = ctx.saved_tensors
    beta, estimator, kl_clamp = ctx.options
    grad = torch.where(mask, grad, 0.0)
    safe_logp, safe_ref = torch.where(mask, logp, 0.0), torch.where(mask, ref_logp, 0.0)
    kl_slope = kl_grad(safe_logp, safe_ref, estimator)
    if kl_clamp is not None:
        kl = kl_values(safe_logp, safe_ref, estimator)
        kl_slope = torch.where((kl >= -kl_clamp) & (kl <= kl_clamp), kl_slope, 0.0)
    grad_logp = torch.where(mask, -beta * grad * kl_slope, 0.0)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=-1, keepdim=True) if mask.shape[-1] else None
    if last is None:
        grad_scores = grad.new_zeros(mask.shape[0])
    else:
        at_last = grad.gather(-1, last.clamp(min=0)).squeeze(-1)
        grad_scores = torch.where(last.squeeze(-1) >= 0, at_last, 0.0)
    return grad_logp, -grad_logp, grad_scores, None, None, None, None, None


_kl_rewards_op.register_autograd(_kl_rewards_backward, setup_context=_kl_rewards_setup)


def kl_penalized_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    kl_clamp: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token PPO rewards: -beta * kl_penalty(logp, ref_logp) on the response tokens, with the
    sequence score added at the last response token of each row.

    Args:
        logp, ref_logp: [B, T] float log-probs of the sampled tokens under the policy and the
            reference model.
        scores: [B] float sequence scores (reward model or verifier).
        mask: [B, T] bool or 0/1, True on response tokens; any pattern (left/right padding,
            holes). Values of logp, ref_logp at masked positions (NaN included) are ignored.
        beta: KL coefficient, >= 0.
        estimator: "k1", "k2", "k3" or "abs" (see ``kl_penalty``).
        kl_clamp: None, or a finite c > 0: the per-token KL is clamped to [-c, c] before -beta
            scales it, and a clamped token passes no gradient (verl's apply_kl_penalty with
            kl_penalty="low_var_kl" clamps k3 at 10; OpenRLHF's compute_approx_kl clamps at 10).
        backend: "auto", "triton", "cuda", "host" or "torch".

    Returns:
        rewards [B, T] float32: 0 at masked positions, all zeros for a row with no valid token.
        Differentiable w.r.t. logp, ref_logp and scores.
    """
    check.tensor("logp", logp, dtypes=check.FLOAT_DTYPES, min_dim=2)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T]; got {check.describe(logp)}")
    check.tensor("ref_logp", ref_logp, dtypes=check.FLOAT_DTYPES, shape=logp.shape, like=("logp", logp))
    check.tensor("scores", scores, dtypes=check.FLOAT_DTYPES, shape=logp.shape[:1], like=("logp", logp))
    mask = check.mask("mask", mask, shape=logp.shape, like=("logp", logp))
    beta = check.number("beta", beta, low=0.0)
    check.choice("estimator", estimator, KL_ESTIMATORS)
    kl_clamp = check_kl_clamp(kl_clamp)
    registry.check_backend_name(backend)
    return _kl_rewards_op(
        logp.float().contiguous(),
        ref_logp.float().contiguous(),
        scores.float().contiguous(),
        mask.contiguous(),
        beta,
        estimator,
        kl_clamp,
        backend,
    )


def check_kl_clamp(kl_clamp: float | None) -> float | None:
    """None, or the clamp of the rewards' KL as a float > 0 and finite."""
    return None if kl_clamp is None else check.positive_finite("kl_clamp", kl_clamp)
