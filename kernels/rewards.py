"""Triton kernels of the KL-penalised rewards: rewards = -beta * kl(logp, ref_logp) + score at the last valid token.

Shapes: logp, ref_logp, rewards [B, T] float32 contiguous, mask [B, T] bool (read as uint8),
scores [B] float32. The reference is ``rlhf_fast.reference.kl_penalized_rewards``; the provider
contract is ``Provider.kl_rewards_forward`` in ``rlhf_fast/backends/base.py``. One program walks
one row right to left in chunks of BLOCK_T, so the first valid token it meets is the row's last
and gets the score; the KL is clamped to [-kl_clamp, kl_clamp] when one is given. Moves 13 bytes per token (2 reads of 4, the mask byte, 1 write of 4).

``_kl`` and ``_kl_rewards_chunk`` are shared with the fused PPO advantage kernel (kernels/gae.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

ESTIMATOR_CODE = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}  # compile-time switch of _kl


@triton.jit
def _kl(logp, ref_logp, ESTIMATOR: tl.constexpr):
    """kl_penalty(logp, ref_logp) elementwise; ESTIMATOR 0 k1, 1 k2, 2 k3, 3 abs."""
    d = logp - ref_logp
    if ESTIMATOR == 0:
        kl = d
    elif ESTIMATOR == 1:
        kl = 0.5 * d * d
    elif ESTIMATOR == 2:
        # k3 = e^x - 1 - x, x = -d. As written it drowns in the rounding of e^x for small |x|;
        # below 0.5 use the Taylor series to x^8 (relative error < 4e-8). Same as rlhf_fast/kl_estimators.py k3_of.
        x = -d
        small = tl.abs(x) < 0.5
        xs = tl.where(small, x, 0.0)
        poly = 1.0 / 40320.0
        poly = poly * xs + 1.0 / 5040.0
        poly = poly * xs + 1.0 / 720.0
        poly = poly * xs + 1.0 / 120.0
        poly = poly * xs + 1.0 / 24.0
        poly = poly * xs + 1.0 / 6.0
        poly = poly * xs + 0.5
        kl = tl.where(small, xs * xs * poly, tl.maximum(tl.exp(x) - 1.0 - x, 0.0))
    else:
        kl = tl.abs(d)
    return kl


@triton.jit
def _clamp(kl, limit):
    """kl clamped to [-limit, limit] by compare-select: NaN stays NaN, limit = inf changes nothing."""
    kl = tl.where(kl > limit, limit, kl)
    return tl.where(kl < -limit, -limit, kl)


@triton.jit
def _kl_rewards_chunk(
    logp_ptr,  # [B, T] float32 (already offset to the row)
    ref_logp_ptr,  # [B, T] float32 (already offset to the row)
    t,  # [BLOCK_T] positions of this chunk, decreasing
    valid,  # [BLOCK_T] bool: mask and in range
    seen,  # int32: valid tokens of this row right of this chunk
    score,  # float32: scores[row]
    beta,  # KL coefficient
    kl_clamp,  # the KL is clamped to [-kl_clamp, kl_clamp]; inf: no clamp
    ESTIMATOR: tl.constexpr,
):
    """Rewards of one reversed chunk (0 where not valid) and the updated count of valid tokens seen."""
    # Masked positions are not even read: whatever they hold (NaN, inf) cannot reach a result.
    logp = tl.load(logp_ptr + t, mask=valid, other=0.0)
    ref_logp = tl.load(ref_logp_ptr + t, mask=valid, other=0.0)
    rewards = -beta * _clamp(_kl(logp, ref_logp, ESTIMATOR), kl_clamp)
    # Walking right to left, the row's last valid token is the first one met: the running count
    # (inclusive) is 1 there and nothing was seen in earlier chunks.
    count = tl.cumsum(valid.to(tl.int32), 0) + seen
    rewards += tl.where(valid & (count == 1), score, 0.0)
    return tl.where(valid, rewards, 0.0), seen + tl.sum(valid.to(tl.int32), 0)


@triton.jit
def _kl_rewards_kernel(
    logp_ptr,  # [B, T] float32
    ref_logp_ptr,  # [B, T] float32
    scores_ptr,  # [B] float32
    mask_ptr,  # [B, T] uint8 (a bool tensor's bytes)
    rewards_ptr,  # [B, T] float32 out
    T,  # tokens per row
    beta,  # KL coefficient
    kl_clamp,  # the KL is clamped to [-kl_clamp, kl_clamp]; inf: no clamp
    ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 abs
    BLOCK_T: tl.constexpr,  # tokens per chunk (power of two)
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T  # int64: B * T may exceed 2^31
    score = tl.load(scores_ptr + row)
    seen = tl.zeros([], tl.int32)
    j = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        t = T - 1 - start - j
        in_row = t >= 0
        valid = (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0) & in_row
        rewards, seen = _kl_rewards_chunk(
            logp_ptr + base, ref_logp_ptr + base, t, valid, seen, score, beta, kl_clamp, ESTIMATOR
        )
        tl.store(rewards_ptr + base + t, rewards, mask=in_row)


def block_t(T: int) -> int:
    """Chunk length of the per-row [B, T] kernels: the row itself up to 1024 tokens."""
    return min(1024, triton.next_power_of_2(max(T, 1)))


def clamp_value(kl_clamp) -> float:
    """The kernels' kl_clamp argument: the clamp, or inf for none."""
    return math.inf if kl_clamp is None else float(kl_clamp)


def kl_rewards_forward(logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp=None):
    """Write rewards [B, T] (see Provider.kl_rewards_forward)."""
    B, T = logp.shape
    if B == 0 or T == 0:
        return
    _kl_rewards_kernel[(B,)](
        logp, ref_logp, scores, mask.view(torch.uint8), rewards, T, float(beta), clamp_value(kl_clamp),
        ESTIMATOR=ESTIMATOR_CODE[estimator], BLOCK_T=block_t(T), num_warps=4,
    )  # fmt: skip
