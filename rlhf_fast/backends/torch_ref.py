"""The "torch" backend: the PyTorch reference run through the provider interface.

It materialises [N, V] intermediates (that is what the fused backends avoid) and serves every
device and floating dtype, so it is the fallback of last resort and the baseline of the benchmarks.
"""

from __future__ import annotations

import torch

from .base import YES, Provider, Support


class TorchProvider(Provider):
    name = "torch"

    def available(self) -> Support:
        return YES

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        return YES

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index):
        compute_dtype = logp.dtype
        z = logits.to(compute_dtype) / temperature
        row_lse = torch.logsumexp(z, dim=-1)
        keep = labels != ignore_index
        safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
        label_z = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        logp.copy_(torch.where(keep, label_z - row_lse, torch.zeros_like(row_lse)))
        lse.copy_(row_lse)
        if entropy is not None:
            # -sum p log p rather than lse - E[z]: the latter cancels catastrophically when
            # the distribution is nearly one-hot and the logits are large.
            log_p = z - row_lse.unsqueeze(-1)
            p = log_p.exp()
            row_entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
            entropy.copy_(torch.where(keep, row_entropy, torch.zeros_like(row_lse)))

    def token_logprobs_backward(
        self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature, ignore_index
    ):
        compute_dtype = lse.dtype
        z = logits.to(compute_dtype) / temperature
        log_p = z - lse.unsqueeze(-1)
        p = log_p.exp()
        keep = labels != ignore_index
        safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
        g_logp = torch.where(keep, grad_logp, torch.zeros_like(grad_logp)).unsqueeze(-1)
        grad_z = -g_logp * p
        grad_z.scatter_add_(-1, safe_labels.unsqueeze(-1), g_logp)
        if entropy is not None:
            g_h = torch.where(keep, grad_entropy, torch.zeros_like(grad_entropy)).unsqueeze(-1)
            safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
            grad_z -= g_h * p * (safe_log_p + entropy.unsqueeze(-1))
        grad_logits.copy_(grad_z / temperature)
