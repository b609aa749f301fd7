"""Triton kernels of GAE, and of the fused PPO advantage pass (KL rewards + GAE + whitening moments).

Shapes: every [B, T] tensor float32 contiguous, mask [B, T] bool (read as uint8), scores [B]
float32. References: ``rlhf_fast.reference.gae`` (the loop), ``gae_scan`` and
``gae_scan_backward`` (the same maps as here); contracts: ``Provider.gae_forward``,
``gae_backward`` and ``ppo_advantages_forward`` in ``rlhf_fast/backends/base.py``.

GAE over the valid tokens of a row is a chain of affine maps on the state (x, y) = (V_next, A):
    valid token t:  x' = V_t,  y' = gamma x + gamma lam y + (r_t - V_t);   masked token: identity.
Each map is (a, b, d, u, v) with x' = a x + u, y' = b x + d y + v, and composing two of them is
associative (``_affine_combine``, derived next to reference.affine_combine). One program owns a
row and walks it right to left in chunks of BLOCK_T: load the chunk reversed, tl.associative_scan
the maps, apply the composed prefixes to the carried state of the tokens to its right, store,
and carry the state after the chunk's last map. T = 32768 is 32 sequential chunk steps.

Bytes per token. gae_forward: reads r, V, mask (9), writes A, R (8). The fused pass reads logp,
ref_logp, V, mask (13) and writes rewards, A, R (12), plus 12 B of moments per row; whitening
then reads A, mask (5) and rewrites A (4). The unfused torch path moves several times that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rewards import ESTIMATOR_CODE, _kl_rewards_chunk, block_t, clamp_value
from .whiten import _merge_moments, whiten_apply


@triton.jit
def _affine_combine(a1, b1, d1, u1, v1, a2, b2, d2, u2, v2):
    """Apply map 1, then map 2: x' = a x + u, y' = b x + d y + v."""
    return a2 * a1, b2 * a1 + d2 * b1, d2 * d1, a2 * u1 + u2, b2 * u1 + d2 * v1 + v2


@triton.jit
def _last(x, j, BLOCK_T: tl.constexpr):
    """The last element of a [BLOCK_T] chunk, as a scalar."""
    return tl.sum(tl.where(j == BLOCK_T - 1, x, 0.0), 0)


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,  # [B, T] float32: read, or written when FROM_KL
    logp_ptr,  # [B, T] float32, read only FROM_KL
    ref_logp_ptr,  # [B, T] float32, read only FROM_KL
    scores_ptr,  # [B] float32, read only FROM_KL
    values_ptr,  # [B, T] float32
    mask_ptr,  # [B, T] uint8 (a bool tensor's bytes)
    advantages_ptr,  # [B, T] float32 out
    returns_ptr,  # [B, T] float32 out
    moments_ptr,  # [B, 3] float32 out (count, mean, M2 of the advantages), written only WITH_MOMENTS
    T,  # tokens per row
    gamma,  # discount
    gamma_lam,  # gamma * lam
    beta,  # KL coefficient, used only FROM_KL
    kl_clamp,  # the KL is clamped to [-kl_clamp, kl_clamp] (inf: no clamp), used only FROM_KL
    FROM_KL: tl.constexpr,  # compute the rewards from logp, ref_logp, scores (and store them)
    ESTIMATOR: tl.constexpr,  # 0 k1, 1 k2, 2 k3, 3 abs
    WITH_MOMENTS: tl.constexpr,  # also write the advantages' row moments, for whitening
    BLOCK_T: tl.constexpr,  # tokens per chunk (power of two)
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T  # int64: B * T may exceed 2^31
    j = tl.arange(0, BLOCK_T)
    next_value = tl.zeros([], tl.float32)  # carried state (x, y) = (V_next, A_next): 0 after the row
    next_adv = tl.zeros([], tl.float32)
    if FROM_KL:
        score = tl.load(scores_ptr + row)
        seen = tl.zeros([], tl.int32)
    if WITH_MOMENTS:
        n = tl.zeros([], tl.float32)
        mean = tl.zeros([], tl.float32)
        m2 = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = T - 1 - start - j  # right to left
        in_row = t >= 0
        valid = (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0) & in_row
        # Masked positions are never read: NaN or inf there cannot reach a result.
        values = tl.load(values_ptr + base + t, mask=valid, other=0.0)
        if FROM_KL:
            rewards, seen = _kl_rewards_chunk(
                logp_ptr + base, ref_logp_ptr + base, t, valid, seen, score, beta, kl_clamp, ESTIMATOR
            )
            tl.store(rewards_ptr + base + t, rewards, mask=in_row)
        else:
            rewards = tl.load(rewards_ptr + base + t, mask=valid, other=0.0)
        a = tl.where(valid, 0.0, 1.0)
        b = tl.where(valid, gamma, 0.0)
        d = tl.where(valid, gamma_lam, 1.0)
        v = rewards - values  # 0 where not valid
        a, b, d, u, v = tl.associative_scan((a, b, d, values, v), 0, _affine_combine)
        x = a * next_value + u
        y = b * next_value + d * next_adv + v
        advantages = tl.where(valid, y, 0.0)
        tl.store(advantages_ptr + base + t, advantages, mask=in_row)
        tl.store(returns_ptr + base + t, tl.where(valid, y + values, 0.0), mask=in_row)
        if WITH_MOMENTS:
            n, mean, m2 = _merge_moments(n, mean, m2, advantages, valid)
        next_value = _last(x, j, BLOCK_T)
        next_adv = _last(y, j, BLOCK_T)
    if WITH_MOMENTS:
        tl.store(moments_ptr + row * 3, n)
        tl.store(moments_ptr + row * 3 + 1, mean)
        tl.store(moments_ptr + row * 3 + 2, m2)


# Backward: A is linear in (r, V). Left to right over valid tokens (reference.gae_scan_backward),
#   G_k = (gA_k + gR_k) + gamma lam G_prev(k),   grad r_k = G_k,   grad V_k = gR_k - G_k + gamma G_prev(k),
# the same affine scan with state (x, y) = (G, G_prev): valid: x' = gamma lam x + g, y' = x.
# Reads gA, gR, mask (9 B per token), writes grad r, grad V (8).


@triton.jit
def _gae_bwd_kernel(
    grad_advantages_ptr,  # [B, T] float32
    grad_returns_ptr,  # [B, T] float32
    mask_ptr,  # [B, T] uint8
    grad_rewards_ptr,  # [B, T] float32 out
    grad_values_ptr,  # [B, T] float32 out
    T,  # tokens per row
    gamma,  # discount
    gamma_lam,  # gamma * lam
    BLOCK_T: tl.constexpr,  # tokens per chunk (power of two)
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    j = tl.arange(0, BLOCK_T)
    g_carry = tl.zeros([], tl.float32)  # (x, y) = (G, G_prev): 0 before the row
    prev_carry = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + j
        in_row = t < T
        valid = (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0) & in_row
        g_adv = tl.load(grad_advantages_ptr + base + t, mask=valid, other=0.0)
        g_ret = tl.load(grad_returns_ptr + base + t, mask=valid, other=0.0)
        a = tl.where(valid, gamma_lam, 1.0)
        b = tl.where(valid, 1.0, 0.0)
        d = tl.where(valid, 0.0, 1.0)
        zero = tl.zeros([BLOCK_T], tl.float32)
        a, b, d, u, v = tl.associative_scan((a, b, d, g_adv + g_ret, zero), 0, _affine_combine)
        g_delta = a * g_carry + u
        g_prev = b * g_carry + d * prev_carry + v
        tl.store(grad_rewards_ptr + base + t, tl.where(valid, g_delta, 0.0), mask=in_row)
        grad_values = g_ret - g_delta + gamma * g_prev
        tl.store(grad_values_ptr + base + t, tl.where(valid, grad_values, 0.0), mask=in_row)
        g_carry = _last(g_delta, j, BLOCK_T)
        prev_carry = _last(g_prev, j, BLOCK_T)


def _launch_forward(rewards, logp, ref_logp, scores, values, mask, advantages, returns, moments,
                    gamma, lam, beta, estimator, kl_clamp=None):  # fmt: skip
    B, T = values.shape
    from_kl = logp is not None
    _gae_fwd_kernel[(B,)](
        rewards,
        logp if from_kl else rewards, ref_logp if from_kl else rewards,  # placeholders, never read
        scores if from_kl else rewards,
        values, mask.view(torch.uint8), advantages, returns,
        moments if moments is not None else advantages,  # placeholder, never written
        T, float(gamma), float(gamma) * float(lam), float(beta), clamp_value(kl_clamp),
        FROM_KL=from_kl, ESTIMATOR=ESTIMATOR_CODE[estimator], WITH_MOMENTS=moments is not None,
        BLOCK_T=block_t(T), num_warps=4,
    )  # fmt: skip


def gae_forward(rewards, values, mask, advantages, returns, gamma, lam):
    """Write advantages and returns [B, T] (see Provider.gae_forward)."""
    B, T = values.shape
    if B == 0 or T == 0:
        return
    _launch_forward(rewards, None, None, None, values, mask, advantages, returns, None, gamma, lam, 0.0, "k1")


def gae_backward(grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam):
    """Write the gradients of rewards and values [B, T] (see Provider.gae_backward)."""
    B, T = mask.shape
    if B == 0 or T == 0:
        return
    _gae_bwd_kernel[(B,)](
        grad_advantages, grad_returns, mask.view(torch.uint8), grad_rewards, grad_values,
        T, float(gamma), float(gamma) * float(lam), BLOCK_T=block_t(T), num_warps=4,
    )  # fmt: skip


def ppo_advantages_forward(
    logp, ref_logp, scores, values, mask, rewards, advantages, returns, beta, estimator, gamma, lam, whiten,
    kl_clamp=None, unbiased=True,
):  # fmt: skip
    """Rewards, advantages and returns in one pass over [B, T]; whitening in a second launch that
    reads only the advantages (see Provider.ppo_advantages_forward)."""
    B, T = values.shape
    if B == 0 or T == 0:
        return
    moments = torch.empty(B, 3, dtype=torch.float32, device=values.device) if whiten else None
    _launch_forward(rewards, logp, ref_logp, scores, values, mask, advantages, returns, moments,
                    gamma, lam, beta, estimator, kl_clamp)  # fmt: skip
    if whiten:
        whiten_apply(advantages, mask, moments, advantages, True, unbiased)
