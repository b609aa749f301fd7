"""linear_sft_loss: the SFT loss from the last hidden states and the lm_head, without [N, V] logits."""

from __future__ import annotations

import torch

from .. import _validate as check
from ..options import LinearOptions, no_leftovers, take
from ..reference import IGNORE_INDEX
from . import linear_vocab_parallel
from .linear_chunks import RowStats, TokenObjective, kept_rows, linear_loss
from .linear_logprobs import check_linear, make_spec


class SFTObjective(TokenObjective):
    """loss = -sum(logp over kept tokens) / max(kept count, 1): d loss / d logp_t = -1 / count."""

    def __init__(self, kept: int, dtype: torch.dtype, device: torch.device):
        self.count = max(kept, 1)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.grad = torch.full((kept,), -1.0 / self.count, dtype=out_dtype, device=device)

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
    linear: LinearOptions | None = None,
    vocab_group=None,
    **option_kwargs,
) -> torch.Tensor:
    """``sft_loss(hidden @ weight.T + bias, labels)``: mean -log p(label) over non-ignored tokens.

    hidden [..., H], weight [V, H] (hidden's dtype), labels [...], bias [V] or None, linear (and
    its fields backend, chunk_size, accum_dtype, logit_scale, logit_softcap as keywords): as in
    ``linear_token_logprobs``. Returns a float32 scalar (0 with zero gradients when every token is
    ignored). The gradients w.r.t. hidden, weight and bias are computed during the forward, in the
    same pass over the chunks as the loss (the weight gradient summed in float32, or with
    ``accum_dtype=None`` in the weight's dtype, as in ``linear_token_logprobs``); the backward
    scales them by the upstream gradient. Ignored tokens (prompts, padding) cost no FLOPs.
    NaN or inf in a valid row of ``hidden`` or anywhere in ``weight`` makes the loss and the
    gradients NaN (or inf), as in ``linear_token_logprobs``; RLHF_FAST_CHECK=1 checks for them.

    ``vocab_group``: ``weight`` [V_r, H] and ``bias`` [V_r] are this rank's contiguous shard of the
    head and labels global ids, as in ``linear_token_logprobs``; every rank gets the same loss.
    The loss then comes from the vocabulary-parallel ``linear_token_logprobs`` (two sweeps: its
    gradients are computed in the backward, the hidden one all-reduced over the group).
    """
    linear = take(LinearOptions, linear, option_kwargs, "linear")
    no_leftovers("linear_sft_loss", option_kwargs, LinearOptions)
    flat_hidden, flat_labels = check_linear(hidden, weight, bias, labels)
    spec = make_spec(1.0, ignore_index, linear, hidden, weight)
    if check.CHECK:  # RLHF_FAST_CHECK=1: values too (README, "Non-finite values")
        check.linear_values(flat_hidden, weight, bias, flat_labels != spec.ignore_index)
    if vocab_group is not None:
        logp, _ = linear_vocab_parallel.linear_token_logprobs(flat_hidden, weight, bias, flat_labels, spec, vocab_group,
                                                              False)  # fmt: skip
        return -logp.sum() / (flat_labels != spec.ignore_index).sum().clamp(min=1)
    check.labels_in_range(flat_labels, weight.shape[0], spec.ignore_index)
    index = kept_rows(flat_labels != spec.ignore_index)
    kept = flat_labels.numel() if index is None else index.numel()
    objective = SFTObjective(kept, spec.compute_dtype, hidden.device)
    return linear_loss(flat_hidden, weight, bias, flat_labels, index, spec, objective)
