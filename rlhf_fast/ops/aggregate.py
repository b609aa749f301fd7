"""How a per-token loss [B, T] becomes a scalar: the ``agg`` modes, and the normaliser each divides by.

Every mode is ``numerator / normaliser``; passing the *global* normaliser of a batch split into
micro-batches and data-parallel ranks (``normalizer=``) makes the micro-batch losses sum to the
full-batch loss, and their gradients to its gradient (verl's global batch info, TRL's
``num_items_in_batch``):

    total = global_loss_normalizer(micro_masks, agg, group=dp_group)
    for k: policy_loss(..., mask_k, agg=agg, normalizer=total)[0].backward()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import _validate as check
from ..choices import AGG_MODES


def loss_normalizer(mask: torch.Tensor, agg: str = "token-mean", max_response_length: int | None = None) -> torch.Tensor:
    """What ``agg`` divides this [B, T] mask's loss by, as a float32 scalar tensor (no host sync).

    token-mean: number of valid tokens; seq-mean-token-mean: number of rows with a valid token;
    seq-mean-token-sum: B; seq-mean-token-sum-norm: B * (max_response_length, or T when None);
    token-sum: 1. For micro-batches and ranks use ``global_loss_normalizer``, which knows that
    token-sum's normaliser is not a sum of its parts.
    """
    mask = _checked_mask(mask)
    check.choice("agg", agg, AGG_MODES)
    length = check.max_response_length(max_response_length, agg)
    if agg == "token-mean":
        return mask.sum().float()
    if agg == "seq-mean-token-mean":
        return mask.any(dim=-1).sum().float()
    return torch.tensor(float(_shape_normalizer(mask, agg, length)), device=mask.device)


def global_loss_normalizer(masks: Sequence[torch.Tensor], agg: str = "token-mean", *,
                           max_response_length: int | None = None, group=None) -> torch.Tensor:  # fmt: skip
    """The normaliser of the whole batch made of ``masks`` (its micro-batches) on every rank of
    ``group`` (a torch.distributed process group; the default group when torch.distributed is
    initialised, this process alone otherwise), floored at 1. One all-reduce, no host sync.

    Pass it as ``normalizer=`` to each micro-batch's loss on each rank: the losses then sum to the
    loss of the global batch. (With DDP, which averages gradients over ranks, scale the loss by the
    world size, or sum the gradients instead.)
    """
    if not masks:
        raise ValueError("masks must name at least one [B, T] mask (the micro-batches of this rank)")
    if agg == "token-sum":
        check.max_response_length(max_response_length, agg)
        return torch.ones((), device=masks[0].device)
    total = sum(loss_normalizer(mask, agg, max_response_length) for mask in masks)
    if dist.is_available() and dist.is_initialized():
        total = total.reshape(1).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        total = total.reshape(())
    return total.clamp(min=1.0)


def check_normalizer(normalizer):
    """None, a number > 0, or a scalar tensor (not inspected: that would sync with the device)."""
    if normalizer is None or isinstance(normalizer, torch.Tensor):
        if isinstance(normalizer, torch.Tensor) and normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor; got {check.describe(normalizer)}")
        return normalizer
    return check.positive_finite("normalizer", normalizer)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str, normalizer=None,
              max_response_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """Scalar from a float32 per-token loss [B, T] and a bool mask [B, T] (both already validated).

    Masked positions are replaced by 0 before any sum. Without ``normalizer`` the counts are those
    of this batch, floored at 1 (no valid token: loss 0, gradient 0, never NaN).
    """
    return aggregate_masked(torch.where(mask, loss, 0.0), mask, agg, normalizer, max_response_length)


def aggregate_masked(loss: torch.Tensor, mask: torch.Tensor, agg: str, normalizer=None,
                     max_response_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """``aggregate`` of a loss already 0 at masked positions (policy_loss_terms's): one masking less."""
    if agg == "seq-mean-token-mean":
        row_count = mask.sum(dim=-1)
        numerator = (loss.sum(dim=-1) / row_count.clamp(min=1)).sum()
    else:
        numerator = loss.sum()
    if normalizer is None:
        normalizer = _own_normalizer(mask, agg, max_response_length)
    return numerator / normalizer


def aggregate_weights(mask: torch.Tensor, agg: str, normalizer=None, max_response_length: int | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """d aggregate(x) / d x [B, T] in ``dtype``: aggregate is linear, so this is each token's weight
    (0 at masked positions). Built from the very ops that autograd's backward of ``aggregate`` runs,
    in its order, so that it equals ``torch.autograd.grad`` of it bit for bit (tests/test_aggregate.py)
    without recording a graph: the fused loss calls it on every training step."""
    if normalizer is None:
        normalizer = _own_normalizer(mask, agg, max_response_length)
    # DivBackward of numerator / normalizer on a ones gradient, in the quotient's dtype; the engine
    # then sums it to the numerator's shape (a one-element normaliser may be [1]) and casts it.
    scale = (torch.ones((), dtype=dtype, device=mask.device) / normalizer).reshape(()).to(dtype)
    if agg == "seq-mean-token-mean":  # DivBackward of each row's sum / row_count.clamp(min=1)
        scale = (scale / mask.sum(dim=-1).clamp(min=1)).unsqueeze(-1)
    return torch.where(mask, scale, 0.0)  # WhereBackward of the masking: the sums' gradient broadcast


def _checked_mask(mask):
    mask = check.mask("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T]; got {check.describe(mask)}")
    return mask


def _shape_normalizer(mask: torch.Tensor, agg: str, max_response_length: int | None) -> int:
    """The normaliser of the modes that the shape decides, unfloored."""
    if agg == "seq-mean-token-sum":
        return mask.shape[0]
    if agg == "seq-mean-token-sum-norm":
        return mask.shape[0] * (mask.shape[1] if max_response_length is None else max_response_length)
    return 1  # token-sum


def _own_normalizer(mask: torch.Tensor, agg: str, max_response_length: int | None):
    """This batch's normaliser, floored at 1; a Python number where the shape decides it (no H2D copy)."""
    if agg == "token-mean":
        return mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return mask.any(dim=-1).sum().clamp(min=1)
    return max(_shape_normalizer(mask, agg, max_response_length), 1)
