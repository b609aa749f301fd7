"""pairwise_reward_loss: the Bradley-Terry loss of a reward model on (chosen, rejected) pairs."""

from __future__ import annotations

import torch

from .. import _validate as check


def pairwise_reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
):
    """mean(-log sigmoid(c - r - margin)) + center_coef * mean((c + r)^2).

    Args:
        chosen, rejected: [B] float scores of the preferred and the other response (differentiable).
        margin: None, a number, or a [B] float tensor of required score gaps (Llama 2's margin).
        center_coef: >= 0, weight of the term that keeps rewards centred at 0.

    Returns:
        (loss, stats): float32 loss; stats "accuracy" (fraction with c > r) and "margin" (mean c - r),
        detached float32 scalars.
    """
    check.tensor("chosen", chosen, dtypes=check.FLOAT_DTYPES)
    if chosen.dim() != 1 or chosen.shape[0] == 0:
        raise ValueError(f"chosen must have shape [B] with B >= 1; got {check.describe(chosen)}")
    check.tensor("rejected", rejected, dtypes=check.FLOAT_DTYPES, shape=chosen.shape, like=("chosen", chosen))
    if isinstance(margin, torch.Tensor):
        check.tensor("margin", margin, dtypes=check.FLOAT_DTYPES, shape=chosen.shape, like=("chosen", chosen))
        margin = margin.float()
    elif margin is not None:
        margin = check.number("margin", margin)
    center_coef = check.number("center_coef", center_coef, low=0.0)

    c, r = chosen.float(), rejected.float()
    diff = c - r
    loss = -torch.nn.functional.logsigmoid(diff if margin is None else diff - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((c + r) ** 2).mean()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, stats
