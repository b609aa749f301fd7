"""The "torch" backend: the PyTorch reference run through the provider interface.

It materialises float32 intermediates, a slice of rows at a time (the fused backends stream them
instead), and serves every device and floating dtype: the fallback of last resort and the
baseline of the benchmarks.
"""

from __future__ import annotations

import torch

from .. import reference
from ..kl_estimators import kl_values  # float32-accurate k3 (the reference's is float64-grade)
from .base import BT_OPS, TOKEN_OPS, YES, Provider, Support

# token_logprobs works on [rows, V] slices of at most this many elements (16 MiB in float32) and
# keeps at most two float32 temporaries of a slice alive (one without entropy). Forward + backward
# then peaks at the [N, V] gradient the op allocates plus two slices, where eager log_softmax +
# gather holds its [N, V] output for the backward and allocates two more [N, V] tensors in it.
CHUNK_ELEMENTS = 2**22
# A floor for log p and d = z - max: e^-1000 is 0 in float32 and float64 alike, so flooring changes
# no probability, and a -inf logit contributes 0 * -1000 = 0 instead of 0 * -inf = NaN.
LOG_FLOOR = -1000.0


def _row_chunks(logits: torch.Tensor):
    """Row slices of [N, V] logits, each of at most CHUNK_ELEMENTS elements (at least one row)."""
    n_rows, vocab = logits.shape
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _shifted(x: torch.Tensor, dtype: torch.dtype, temperature: float):
    """d = (x - m) / T as a new [rows, V] tensor of ``dtype``, and m = the row max [rows, 1].

    The difference is taken before the division, as the kernels do: x - m is exact for logits that
    share a large offset, where x / T - m / T would carry the rounding of x / T (2^-24 |x / T|).
    A row with no finite max (all -inf, or NaN) gets m = 0, so that -inf stays -inf and not NaN.
    """
    row_max = x.amax(dim=-1, keepdim=True).to(dtype)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    return torch.sub(x, row_max).div_(temperature), row_max  # bf16 - float32 promotes: one temporary


def _owned_columns(labels, keep, vocab_offset: int, vocab: int):
    """([N] bool: kept rows whose label is a column of these logits, [N, 1] int64 column or 0)."""
    columns = labels.long() - vocab_offset
    owned = keep & (columns >= 0) & (columns < vocab)
    return owned, torch.where(owned, columns, 0).unsqueeze(-1)


class TorchProvider(Provider):
    name = "torch"
    ops = TOKEN_OPS | BT_OPS

    def available(self) -> Support:
        return YES

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        return YES

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index, vocab_offset=0):
        keep = labels != ignore_index
        owned, safe_labels = _owned_columns(labels, keep, vocab_offset, logits.shape[1])
        for rows in _row_chunks(logits):
            d, row_max = _shifted(logits[rows], logp.dtype, temperature)  # d = (x - max) / T <= 0
            log_p_label = d.gather(-1, safe_labels[rows]).squeeze(-1)
            if entropy is None:
                log_sum = d.exp_().sum(-1).log()
            else:
                # s = sum e^d, t = sum e^d d, entropy = log s - t / s, as the kernels: both terms are
                # >= 0 (d is relative to the max), so nothing cancels even in a one-hot row.
                e = d.clamp_(min=LOG_FLOOR).exp()
                s = e.sum(-1)
                t = e.mul_(d).sum(-1)
                log_sum = s.log()
                entropy[rows] = torch.where(keep[rows], log_sum - t / s, 0.0)
            logp[rows] = torch.where(owned[rows], log_p_label - log_sum, 0.0)
            lse[rows] = torch.where(keep[rows], row_max.squeeze(-1) / temperature + log_sum, 0.0)

    def token_logprobs_backward(self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature,
                                ignore_index, vocab_offset=0, log_mass=None):  # fmt: skip
        # The saved lse is not read: at logits near 1e6 a float32 lse is off by up to half an ulp
        # (0.03), an error every p = e^(z - lse) would share. The row's max and sum are recomputed
        # as in the forward instead, which costs this provider one max reduction per row.
        #   d/dz_k = g (1[k = label] - p_k) - g_H p_k (log p_k + H) = 1[k = label] g - p_k coef_k,
        #   coef_k = g + g_H (log p_k + H);  d/dx_k = d/dz_k / T.
        # A vocabulary shard's log p_k is its own softmax's plus log_mass (kernels/token_logprobs.py).
        compute_dtype = lse.dtype
        keep = labels != ignore_index
        owned, safe_labels = _owned_columns(labels, keep, vocab_offset, logits.shape[1])
        g = torch.where(keep, grad_logp, 0.0).unsqueeze(-1)
        g_label = torch.where(owned, grad_logp, 0.0).unsqueeze(-1)
        mass = None if log_mass is None else torch.where(keep, log_mass, 0.0).to(compute_dtype).unsqueeze(-1)
        if entropy is not None:
            g_h = torch.where(keep, grad_entropy, 0.0).unsqueeze(-1)
            h = torch.where(keep, entropy, 0.0).unsqueeze(-1)
        for rows in _row_chunks(logits):
            d, _ = _shifted(logits[rows], compute_dtype, temperature)
            log_s = d.exp().sum(-1, keepdim=True).log_()
            if mass is not None:
                log_s.sub_(mass[rows])
            log_p = d.sub_(log_s)
            if entropy is None:
                grad = log_p.exp_().mul_(-g[rows])
            else:
                p = log_p.exp()
                # log p floored so that a -inf logit (p = 0) gives 0 * finite = 0.
                coef = log_p.clamp_(min=LOG_FLOOR).add_(h[rows]).mul_(g_h[rows]).add_(g[rows])
                grad = p.mul_(coef).neg_()
            grad.scatter_add_(-1, safe_labels[rows], g_label[rows])
            grad.div_(temperature)
            # Ignored rows are 0 whatever their logits hold: NaN * 0 would be NaN.
            grad.masked_fill_(~keep[rows].unsqueeze(-1), 0.0)
            grad_logits[rows].copy_(grad)

    # [B, T] ops: the reference formulas in float32, GAE as the vectorised affine scan
    # (reference.gae_scan) rather than the loop over T.

    def kl_rewards_forward(self, logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp=None):
        kl = kl_values(torch.where(mask, logp, 0.0), torch.where(mask, ref_logp, 0.0), estimator)
        if kl_clamp is not None:
            kl = kl.clamp(-kl_clamp, kl_clamp)
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

    def whiten_forward(self, x, mask, out, shift_mean, unbiased=True):
        out.copy_(reference.whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased))

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
