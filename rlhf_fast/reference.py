"""PyTorch reference of every rlhf_fast op: the spec, the test oracle and the benchmark baseline.

Shape letters: B batch (sequences), T tokens per sequence, V vocabulary, N = B*T flattened tokens,
H hidden size, G group size. Everything here is plain eager PyTorch, written to be read; the fused
kernels in ``kernels/`` (Triton) and ``csrc/`` (CUDA C++ and host C++) must agree with it.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
):
    """Log-probability of each label under softmax(logits / temperature), and optionally its entropy.

    logits: [..., V] float; labels: [...] int. Returns float32 (float64 for float64 logits) logp [...]
    and, with ``return_entropy``, entropy [...] = -sum_v p_v log p_v of the same tempered distribution.

    1. z = logits / temperature, in float32 (or float64).
    2. log p = log_softmax(z) over V.
    3. logp = log p[label]; entropy = -sum p * log p (terms with p = 0 count as 0).
    4. Positions whose label is ``ignore_index`` get logp = 0 and entropy = 0 (and no gradient).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute_dtype) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    return logp, entropy


def token_logprobs_upcast(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0):
    """The common hand-written baseline: ``logits.float()`` first, then log_softmax and gather [N]."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor):
    """TRL's formulation: gather the label logit, subtract a per-row logsumexp computed row by row.

    Written here in plain PyTorch because it is the de facto baseline users know. [..., V] -> [...]
    """
    if logits.dtype in (torch.float32, torch.float64):
        label_logits = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        return label_logits - torch.logsumexp(logits, dim=-1)
    rows = [
        torch.log_softmax(row_logits, dim=-1).gather(-1, row_labels.long().unsqueeze(-1)).squeeze(-1)
        for row_logits, row_labels in zip(logits, labels)
    ]
    return torch.stack(rows)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
):
    """Instruction-finetuning loss: mean negative log-prob over non-ignored tokens. [..., V], [...] -> []

    With every token ignored the loss is 0 (and its gradient zero), never NaN.
    """
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    count = (labels != ignore_index).sum().clamp(min=1)
    return -logp.sum() / count
