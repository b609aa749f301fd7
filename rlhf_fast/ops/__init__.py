"""Public functional ops: validate once, dispatch to a backend, autograd."""

from .sft_loss import sft_loss
from .token_logprobs import token_logprobs

__all__ = ["sft_loss", "token_logprobs"]
