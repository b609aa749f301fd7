"""linear_sft_loss: the SFT loss from the last hidden states and the lm_head, without [N, V] logits."""

from __future__ import annotations

import torch

from .. import _validate as check
from ..reference import IGNORE_INDEX
from .linear_chunks import RowStats, TokenObjective, linear_loss
from .linear_logprobs import check_linear, make_spec


class SFTObjective(TokenObjective):
    """loss = -sum(logp over kept tokens) / max(kept count, 1): d loss / d logp_t = -keep_t / count."""

    def __init__(self, labels: torch.Tensor, ignore_index: int, dtype: torch.dtype):
        keep = labels != ignore_index
        self.count = keep.sum().clamp(min=1)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.grad = -keep.to(out_dtype) / self.count

    def token_grads(self, rows: RowStats, start: int, end: int):
        return self.grad[start:end], None

    def value(self, rows: RowStats) -> torch.Tensor:
        return -rows.logp.sum() / self.count


def linear_sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``sft_loss(hidden @ weight.T + bias, labels)``: mean -log p(label) over non-ignored tokens.

    hidden [..., H], weight [V, H] (hidden's dtype), labels [...], bias [V] or None: as in
    ``linear_token_logprobs``. Returns a float32 scalar (0 with zero gradients when every token is
    ignored). The gradients w.r.t. hidden, weight and bias are computed during the forward, in the
    same pass over the chunks as the loss (the weight gradient summed in float32); the backward
    scales them by the upstream gradient.
    """
    flat_hidden, flat_labels = check_linear(hidden, weight, bias, labels)
    spec = make_spec(1.0, ignore_index, backend, chunk_size)
    check.labels_in_range(flat_labels, weight.shape[0], spec.ignore_index)
    objective = SFTObjective(flat_labels, spec.ignore_index, hidden.dtype)
    return linear_loss(flat_hidden, weight, bias, flat_labels, spec, objective)
