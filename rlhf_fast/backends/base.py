"""What every backend provides: availability with a reason, and the kernels on flattened tensors.

The public ops in ``rlhf_fast.ops`` validate arguments once, flatten [..., V] to [N, V] (last dim
contiguous, any row stride) and call a provider through this interface. Providers never validate
user input; they only say whether they can serve a call and why not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Support:
    """Answer to "can you serve this?": ``ok`` and, when not, a reason a person can act on."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Support(True)


class Provider:
    """One implementation of the fused ops (torch reference, host C++, CUDA C++ or Triton).

    Kernel-facing contract for token log-probs (all tensors on one device):
      logits   [N, V] float32/bfloat16/float16 (float64 where the provider supports it),
               stride(1) == 1, stride(0) >= V (any row stride)
      labels   [N] int64 or int32, contiguous; values in [0, V) or == ignore_index (checked upstream)
      logp, entropy, lse: [N] float32 contiguous (float64 when logits are float64)
      lse is the log-sum-exp of logits / temperature, saved for the backward.
    """

    name: str = "?"

    def available(self) -> Support:
        """Whether this provider can run at all on this machine (import, build, device)."""
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        """Whether it serves tensors of this device and dtype (called only when available)."""
        raise NotImplementedError

    def token_logprobs_forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logp: torch.Tensor,
        entropy: torch.Tensor | None,
        lse: torch.Tensor,
        temperature: float,
        ignore_index: int,
    ) -> None:
        """Write logp, lse and (if given) entropy for every row. Ignored rows: logp = entropy = 0."""
        raise NotImplementedError

    def token_logprobs_backward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor | None,
        grad_logp: torch.Tensor,
        grad_entropy: torch.Tensor | None,
        grad_logits: torch.Tensor,
        temperature: float,
        ignore_index: int,
    ) -> None:
        """Write d(loss)/d(logits) into grad_logits ([N, V], logits' dtype, stride(1) == 1).

        grad_logits may be the logits tensor itself (in-place backward): read each element before
        writing it. With z = logits / T, p = softmax(z), log p = z - lse, H = entropy:
            d/dz_k = g_logp * (1[k == label] - p_k) - g_H * p_k * (log p_k + H)
            d/dlogits = d/dz / T; rows whose label is ignore_index get 0.
        ``entropy`` and ``grad_entropy`` are both given or both None.
        """
        raise NotImplementedError
