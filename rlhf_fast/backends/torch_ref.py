"""The "torch" backend: the PyTorch reference run through the provider interface.

It materialises [N, V] intermediates (that is what the fused backends avoid) and serves every
device and floating dtype, so it is the fallback of last resort and the baseline of the benchmarks.
"""

from __future__ import annotations

import torch

from .. import reference
from ..kl_estimators import kl_values  # float32-accurate k3 (the reference's is float64-grade)
from .base import BT_OPS, TOKEN_OPS, YES, Provider, Support


class TorchProvider(Provider):
    name = "torch"
    ops = TOKEN_OPS | BT_OPS

    def available(self) -> Support:
        return YES

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        return YES

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index):
        compute_dtype = logp.dtype
        # log p = (z - max) - log sum exp(z - max), as the kernels: z - max is exact, where z - lse
        # would carry lse's rounding (an ulp of |z|: 2e-3 at logits of 3e4, all of log p near 0).
        shifted = logits.to(compute_dtype) / temperature
        row_max = shifted.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf rows
        shifted -= row_max
        log_sum = shifted.exp().sum(-1, keepdim=True).log()
        keep = labels != ignore_index
        safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
        label_shifted = shifted.gather(-1, safe_labels.unsqueeze(-1))
        logp.copy_(torch.where(keep, (label_shifted - log_sum).squeeze(-1), torch.zeros_like(logp)))
        lse.copy_((row_max + log_sum).squeeze(-1))
        if entropy is not None:
            # -sum p log p rather than lse - E[z]: the latter cancels catastrophically when
            # the distribution is nearly one-hot and the logits are large.
            log_p = shifted.sub_(log_sum)
            p = log_p.exp()
            row_entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
            entropy.copy_(torch.where(keep, row_entropy, torch.zeros_like(row_entropy)))

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

    # [B, T] ops: the reference formulas in float32, GAE as the vectorised affine scan
    # (reference.gae_scan) rather than the loop over T.

    def kl_rewards_forward(self, logp, ref_logp, scores, mask, rewards, beta, estimator):
        kl = kl_values(torch.where(mask, logp, 0.0), torch.where(mask, ref_logp, 0.0), estimator)
        out = torch.where(mask, -beta * kl, 0.0)
        last = reference.last_valid_index(mask)
        at_last = torch.arange(mask.shape[-1], device=mask.device) == last.unsqueeze(-1)
        rewards.copy_(out + torch.where(at_last, scores.unsqueeze(-1), 0.0))

    def gae_forward(self, rewards, values, mask, advantages, returns, gamma, lam):
        adv, ret = reference.gae_scan(rewards, values, mask, gamma=gamma, lam=lam)
        advantages.copy_(adv)
        returns.copy_(ret)

    def gae_backward(self, grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam):
        g_r, g_v = reference.gae_scan_backward(grad_advantages, grad_returns, mask, gamma=gamma, lam=lam)
        grad_rewards.copy_(g_r)
        grad_values.copy_(g_v)

    def whiten_forward(self, x, mask, out, shift_mean):
        out.copy_(reference.whiten(x, mask, shift_mean=shift_mean))

    def group_advantages_forward(self, scores, out, group_size, mode, eps):
        # Centre each group on its first member: identical scores then give exactly 0.
        s = scores.view(-1, group_size)
        centered = s - s[:, :1]
        offset = centered.mean(dim=-1, keepdim=True)
        dev = centered - offset
        if mode == "grpo":
            std = torch.sqrt((dev * dev).sum(dim=-1, keepdim=True) / (group_size - 1))
            dev = dev / (std + eps)
        elif mode == "rloo":
            dev = dev * (group_size / (group_size - 1))
        out.copy_(dev.view(-1))
