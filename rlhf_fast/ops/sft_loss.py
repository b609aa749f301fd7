"""sft_loss: the instruction-finetuning loss, mean negative log-prob over non-ignored tokens."""

from __future__ import annotations

import torch

from ..reference import IGNORE_INDEX
from .token_logprobs import token_logprobs


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    backend: str = "auto",
    vocab_group=None,
) -> torch.Tensor:
    """Mean of -log p(label) over tokens whose label is not ``ignore_index``. [..., V], [...] -> [] float32.

    With every token ignored the loss is 0 with a zero gradient (the count is clamped to 1), never NaN.
    For gradient accumulation over micro-batches, scale each micro-batch's loss by its token count
    over the global token count.
    NaN or +inf in a valid row's logits makes the loss NaN (``token_logprobs``); RLHF_FAST_CHECK=1
    checks them.

    ``vocab_group``: ``logits`` is this rank's contiguous vocabulary shard [..., V_r] and labels
    are global ids, as in ``token_logprobs``; every rank gets the same loss, and the gradient of
    its own shard.
    """
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, backend=backend,
                          vocab_group=vocab_group)  # fmt: skip
    count = (labels != ignore_index).sum().clamp(min=1)
    return -logp.sum() / count
