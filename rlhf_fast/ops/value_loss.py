"""value_loss: the (optionally clipped) PPO value-function loss on [B, T] tensors."""

from __future__ import annotations

import torch

from .. import _validate as check
from ..choices import AGG_MODES
from .aggregate import aggregate, check_normalizer


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """0.5 * max((v - R)^2, (old + clamp(v - old, -clip_eps, clip_eps) - R)^2), aggregated over valid tokens.

    Args:
        values: [B, T] float predictions of the value head (differentiable).
        old_values: [B, T] the values at rollout time (used only with clip_eps).
        returns: [B, T] targets (e.g. from ``gae``).
        mask: [B, T] bool or 0/1; NaN or inf at masked positions never reaches the loss or gradient.
        clip_eps: > 0 for the clipped form; None gives 0.5 (v - R)^2.
        agg, normalizer: as in ``policy_loss`` (see ``rlhf_fast.ops.aggregate``).

    Returns:
        float32 scalar; 0 with zero gradient when no token is valid.
    """
    check.tensor("values", values, dtypes=check.FLOAT_DTYPES)
    if values.dim() != 2:
        raise ValueError(f"values must have shape [B, T]; got {check.describe(values)}")
    for name, value in (("old_values", old_values), ("returns", returns)):
        check.tensor(name, value, dtypes=check.FLOAT_DTYPES, shape=values.shape, like=("values", values))
    mask = check.mask("mask", mask, shape=values.shape, like=("values", values))
    if clip_eps is not None:
        clip_eps = check.positive_finite("clip_eps", clip_eps)
    check.choice("agg", agg, AGG_MODES)
    normalizer = check_normalizer(normalizer)

    v = torch.where(mask, values.float(), 0.0)
    target = torch.where(mask, returns.float(), 0.0)
    per_token = (v - target) ** 2
    if clip_eps is not None:
        old = torch.where(mask, old_values.float(), 0.0)
        clipped = old + torch.clamp(v - old, -clip_eps, clip_eps)
        per_token = torch.maximum(per_token, (clipped - target) ** 2)
    return aggregate(0.5 * per_token, mask, agg, normalizer)
