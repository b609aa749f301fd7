"""How a per-token loss [B, T] becomes a scalar: the ``agg`` modes, and the normaliser each divides by.

Every mode is ``numerator / normaliser``; passing the *global* normaliser of a batch split into
micro-batches (``normalizer=``) makes the micro-batch losses sum to the full-batch loss, and their
gradients to its gradient:

    total = sum(loss_normalizer(mask_k, agg) for mask_k in micro_masks)   # all-reduce it across ranks too
    for k: policy_loss(..., mask_k, agg=agg, normalizer=total)[0].backward()
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..choices import AGG_MODES


def loss_normalizer(mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """What ``agg`` divides by for this [B, T] mask, as a float32 scalar tensor (no host sync).

    token-mean: number of valid tokens; seq-mean-token-mean: number of rows with a valid token;
    seq-mean-token-sum: B; seq-mean-token-sum-norm: B * T. Sum it over micro-batches (and ranks)
    and pass the total as ``normalizer=`` to reproduce the full-batch loss.
    """
    mask = check.mask("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T]; got {check.describe(mask)}")
    check.choice("agg", agg, AGG_MODES)
    if agg == "token-mean":
        return mask.sum().float()
    if agg == "seq-mean-token-mean":
        return mask.any(dim=-1).sum().float()
    if agg == "seq-mean-token-sum":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    return torch.tensor(float(mask.numel()), device=mask.device)


def check_normalizer(normalizer):
    """None, a number > 0, or a scalar tensor (not inspected: that would sync with the device)."""
    if normalizer is None or isinstance(normalizer, torch.Tensor):
        if isinstance(normalizer, torch.Tensor) and normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor; got {check.describe(normalizer)}")
        return normalizer
    return check.positive_finite("normalizer", normalizer)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str, normalizer=None) -> torch.Tensor:
    """Scalar from a float32 per-token loss [B, T] and a bool mask [B, T] (both already validated).

    Masked positions are replaced by 0 before any sum. Without ``normalizer`` the counts are those
    of this batch, floored at 1 (no valid token: loss 0, gradient 0, never NaN).
    """
    loss = torch.where(mask, loss, 0.0)
    if agg == "seq-mean-token-mean":
        row_count = mask.sum(dim=-1)
        numerator = (loss.sum(dim=-1) / row_count.clamp(min=1)).sum()
    else:
        numerator = loss.sum()
    if normalizer is None:
        normalizer = _own_normalizer(mask, agg)
    return numerator / normalizer


def _own_normalizer(mask: torch.Tensor, agg: str):
    """This batch's normaliser, floored at 1; a Python number where the shape decides it (no H2D copy)."""
    if agg == "token-mean":
        return mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return mask.any(dim=-1).sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        return max(mask.shape[0], 1)
    return max(mask.numel(), 1)
