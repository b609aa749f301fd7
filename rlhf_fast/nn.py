"""nn.Module wrappers that hold an op's options."""

from __future__ import annotations

import torch

from .ops import token_logprobs
from .reference import IGNORE_INDEX


class TokenLogProbs(torch.nn.Module):
    """Module form of ``rlhf_fast.token_logprobs``: forward(logits, labels) -> logp (and entropy)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        return_entropy: bool = False,
        inplace_backward: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        return token_logprobs(
            logits,
            labels,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            return_entropy=self.return_entropy,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"return_entropy={self.return_entropy}, backend={self.backend!r}"
        )
