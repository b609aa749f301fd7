"""Triton kernels of masked whitening: (x - mean) / sqrt(var + 1e-8) over the valid tokens of a [B, T] batch,
var the unbiased (M2 / (n - 1)) or biased (M2 / n) variance.

Shapes: x, out [B, T] float32 contiguous, mask [B, T] bool (read as uint8). The reference is
``rlhf_fast.reference.whiten``; the contract is ``Provider.whiten_forward``. Two launches, no host
synchronisation:
1. per row, (count, mean, M2) of the valid x in one read (``_row_moments_kernel``; the fused PPO
   advantage kernel in kernels/gae.py writes the same triple for its advantages as it goes);
2. every program merges the B triples (Chan et al.'s parallel variance: no E[x^2] - mean^2
   cancellation) and whitens its rows (``_whiten_apply_kernel``).
Bytes per token: 5 read in step 1, 5 read + 4 written in step 2; 12 B per row of moments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rewards import block_t

WHITEN_EPS = 1e-8  # rlhf_fast.reference.WHITEN_EPS
MAX_APPLY_PROGRAMS = 1024  # each apply program re-merges all B moments: cap the programs, not B


@triton.jit
def _merge_moments(n, mean, m2, x, valid):
    """Fold the valid entries of chunk x into running (count, mean, M2), all float32 scalars."""
    n_c = tl.sum(valid.to(tl.float32), 0)
    mean_c = tl.sum(tl.where(valid, x, 0.0), 0) / tl.maximum(n_c, 1.0)
    dev = tl.where(valid, x - mean_c, 0.0)
    m2_c = tl.sum(dev * dev, 0)
    n_new = n + n_c
    delta = mean_c - mean
    share = n_c / tl.maximum(n_new, 1.0)
    return n_new, mean + delta * share, m2 + m2_c + delta * delta * n * share


@triton.jit
def _row_moments_kernel(
    x_ptr,  # [B, T] float32
    mask_ptr,  # [B, T] uint8
    moments_ptr,  # [B, 3] float32 out: count, mean, M2 of the row's valid x
    T,  # tokens per row
    BLOCK_T: tl.constexpr,  # tokens per chunk (power of two)
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    n = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        valid = (tl.load(mask_ptr + base + t, mask=t < T, other=0) != 0) & (t < T)
        x = tl.load(x_ptr + base + t, mask=valid, other=0.0)
        n, mean, m2 = _merge_moments(n, mean, m2, x, valid)
    tl.store(moments_ptr + row * 3, n)
    tl.store(moments_ptr + row * 3 + 1, mean)
    tl.store(moments_ptr + row * 3 + 2, m2)


@triton.jit
def _whiten_apply_kernel(
    x_ptr,  # [B, T] float32
    mask_ptr,  # [B, T] uint8
    moments_ptr,  # [B, 3] float32: per-row count, mean, M2
    out_ptr,  # [B, T] float32 out; may be x_ptr (each element is read before it is written)
    B,  # rows
    T,  # tokens per row
    rows_per_program,  # rows whitened by each program
    eps,  # added to the variance
    SHIFT_MEAN: tl.constexpr,  # False adds the mean back
    UNBIASED: tl.constexpr,  # variance = M2 / (n - 1), else M2 / n (both divisors floored at 1)
    BLOCK_B: tl.constexpr,  # rows of moments merged per step (power of two)
    BLOCK_T: tl.constexpr,  # tokens per chunk (power of two)
):
    # Batch moments from the per-row triples: total n, mean = sum n_b mean_b / n, then
    # M2 = sum M2_b + n_b (mean_b - mean)^2 in a second sweep (exact, no cancellation).
    rb = tl.arange(0, BLOCK_B)
    n = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(0, B, BLOCK_B):
        r = start + rb
        n_b = tl.load(moments_ptr + r * 3, mask=r < B, other=0.0)
        mean_b = tl.load(moments_ptr + r * 3 + 1, mask=r < B, other=0.0)
        n += tl.sum(n_b, 0)
        total += tl.sum(n_b * mean_b, 0)
    mean = total / tl.maximum(n, 1.0)
    m2 = tl.zeros([], tl.float32)
    for start in range(0, B, BLOCK_B):
        r = start + rb
        n_b = tl.load(moments_ptr + r * 3, mask=r < B, other=0.0)
        mean_b = tl.load(moments_ptr + r * 3 + 1, mask=r < B, other=0.0)
        m2_b = tl.load(moments_ptr + r * 3 + 2, mask=r < B, other=0.0)
        m2 += tl.sum(m2_b + n_b * (mean_b - mean) * (mean_b - mean), 0)
    if UNBIASED:
        dof = tl.maximum(n - 1.0, 1.0)
    else:
        dof = tl.maximum(n, 1.0)
    std = tl.sqrt(m2 / dof + eps)

    for i in range(0, rows_per_program):
        row = tl.program_id(0) * rows_per_program + i
        base = row.to(tl.int64) * T
        row_length = tl.where(row < B, T, 0)  # the last program may own fewer rows
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            in_row = t < row_length
            valid = (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0) & in_row
            x = tl.load(x_ptr + base + t, mask=valid, other=0.0)
            y = (x - mean) / std
            if not SHIFT_MEAN:
                y += mean
            tl.store(out_ptr + base + t, tl.where(valid, y, 0.0), mask=in_row)


def whiten_apply(x, mask, moments, out, shift_mean, unbiased=True):
    """Launch step 2: whiten x [B, T] into out with the per-row moments [B, 3]."""
    B, T = x.shape
    rows_per_program = triton.cdiv(B, MAX_APPLY_PROGRAMS)
    grid = (triton.cdiv(B, rows_per_program),)
    _whiten_apply_kernel[grid](
        x, mask.view(torch.uint8), moments, out, B, T, rows_per_program, WHITEN_EPS,
        SHIFT_MEAN=bool(shift_mean), UNBIASED=bool(unbiased), BLOCK_B=min(1024, triton.next_power_of_2(B)), BLOCK_T=block_t(T),
        num_warps=4,
    )  # fmt: skip


def whiten_forward(x, mask, out, shift_mean, unbiased=True):
    """Write out = reference.whiten(x, mask, shift_mean) (see Provider.whiten_forward)."""
    B, T = x.shape
    if B == 0 or T == 0:
        return
    moments = torch.empty(B, 3, dtype=torch.float32, device=x.device)
    _row_moments_kernel[(B,)](x, mask.view(torch.uint8), moments, T, BLOCK_T=block_t(T), num_warps=4)
    whiten_apply(x, mask, moments, out, shift_mean, unbiased)
