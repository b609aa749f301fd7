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
) -> torch.Tensor:
    """Mean of -log p(label) over tokens whose label is not ``ignore_index``. [..., V], [...] -> [] float32.

    With every token ignored the loss is 0 with a zero gradient (the count is clamped to 1), never NaN.
    For gradient accumulation over micro-batches, scale each micro-batch's loss by its token count
    over the global token count.
    NaN or +inf in a valid row's logits makes the loss NaN (``token_logprobs``); RLHF_FAST_CHECK=1
    checks them.
    """
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, backend=backend)
    count = (labels != ignore_index).sum().clamp(min=1)
    return -logp.sum() / count
