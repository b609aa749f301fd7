"""Triton kernel of group-relative advantages (GRPO, Dr. GRPO, RLOO) on [B] sequence scores.

Rows form contiguous groups of G; a program owns GROUPS groups as a [GROUPS, BLOCK_G] tile. The
reference is ``rlhf_fast.reference.group_advantages``; the contract is
``Provider.group_advantages_forward``. Each group is centred on its first member before the sum,
so a group of identical scores gives exactly 0 (the mean of identical floats may not round back
to them) and large common offsets cancel before they can swamp the spread. 8 bytes per score.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_CODE = {"grpo": 0, "drgrpo": 1, "rloo": 2}  # compile-time switch
TILE = 1024  # scores per program


@triton.jit
def _group_advantages_kernel(
    scores_ptr,  # [B] float32
    out_ptr,  # [B] float32 out
    n_groups,  # B / G
    G,  # group size
    eps,  # added to the std (grpo)
    MODE: tl.constexpr,  # 0 grpo: dev / (std + eps); 1 drgrpo: dev; 2 rloo: dev * G / (G - 1)
    GROUPS: tl.constexpr,  # groups per program (power of two)
    BLOCK_G: tl.constexpr,  # next power of two >= G
):
    groups = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    cols = tl.arange(0, BLOCK_G)
    group_ok = groups < n_groups
    valid = group_ok[:, None] & (cols < G)[None, :]
    first = groups.to(tl.int64) * G
    s = tl.load(scores_ptr + first[:, None] + cols[None, :], mask=valid, other=0.0)
    s0 = tl.load(scores_ptr + first, mask=group_ok, other=0.0)
    centered = tl.where(valid, s - s0[:, None], 0.0)
    dev = tl.where(valid, centered - (tl.sum(centered, 1) / G)[:, None], 0.0)
    if MODE == 0:
        std = tl.sqrt(tl.sum(dev * dev, 1) / (G - 1))
        out = dev / (std + eps)[:, None]
    elif MODE == 2:
        out = dev * (G / (G - 1.0))
    else:
        out = dev
    tl.store(out_ptr + first[:, None] + cols[None, :], out, mask=valid)


def group_advantages_forward(scores, out, group_size, mode, eps):
    """Write out [B] (see Provider.group_advantages_forward)."""
    n_groups = scores.shape[0] // group_size
    if n_groups == 0:
        return
    block_g = triton.next_power_of_2(group_size)
    groups = max(1, TILE // block_g)
    _group_advantages_kernel[(triton.cdiv(n_groups, groups),)](
        scores, out, n_groups, group_size, float(eps),
        MODE=MODE_CODE[mode], GROUPS=groups, BLOCK_G=block_g, num_warps=4,
    )  # fmt: skip
