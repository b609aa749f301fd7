"""Triton kernels of token_logprobs: log p(label) and entropy of softmax(logits / T), forward and backward.

Shapes: logits [N, V] (stride(1) == 1, any row stride), labels [N]; logp, lse, entropy [N] float32.
The reference is ``rlhf_fast.reference.token_logprobs``; the provider contract is in
``rlhf_fast/backends/base.py``. Both kernels stream each row once in chunks of BLOCK_V and keep
every intermediate in float32 registers: no [N, V] float32 tensor is ever materialised.

A program owns ROWS rows (a [ROWS, BLOCK_V] tile): one row for large vocabularies, several for
small ones so that a 17-wide row does not leave most of a warp idle. ``_launch_config`` is the one
place that picks the tile; ``compile_targets`` lists everything it can pick, for the compile test.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# |lse| from which the backward recomputes a row's max and sum rather than trust the float32 lse
# saved by the forward (see the backward kernel). The host and CUDA kernels use the same bound
# (kSavedLseBound in csrc/include/rlhf_fast/token_logprobs.h).
SAVED_LSE_BOUND = tl.constexpr(64.0)

# Forward moves N*V*e bytes (e = element size of logits) + 16*N (labels, label logit, 3 outputs):
# one read of the logits, so its roofline is the device's read bandwidth.
# Online log-sum-exp per chunk, relative to the running max m of the raw logits x, with
# d = (x - m) / T: the difference is taken before the scaling, so that logits sharing a large
# offset (1e6) lose nothing to it, where x / T - m / T would carry the rounding of x / T.
#   s = sum e^d,   t = sum e^d d   (t relative to m, so |z| ~ 1e4 loses no digits)
# When the max moves from m to m' (alpha = e^delta, delta = (m - m') / T):
#   s' = alpha s,      t' = alpha (t + delta s)
# At the end: lse = m / T + log s, logp = d_label - log s, entropy = -sum p log p = log s - t / s.


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # [N, V] float32/bfloat16/float16, stride(1) == 1
    labels_ptr,  # [N] int32/int64
    logp_ptr,  # [N] float32 out
    lse_ptr,  # [N] float32 out: logsumexp(logits / T), saved for the backward
    entropy_ptr,  # [N] float32 out, written only WITH_ENTROPY (else any placeholder)
    N,  # rows
    V,  # vocabulary
    stride_logits_n,  # elements between rows of logits
    inv_temperature,  # 1 / T
    ignore_index,  # label value of rows that get logp = entropy = 0
    vocab_offset,  # the logits are columns [vocab_offset, vocab_offset + V) of the labels' vocabulary
    WITH_ENTROPY: tl.constexpr,  # also accumulate t and write entropy
    ROWS: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary chunk per step (power of two)
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    row_start = logits_ptr + rows.to(tl.int64) * stride_logits_n  # int64: N*V may exceed 2^31
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    keep = labels != ignore_index
    columns = labels.to(tl.int64) - vocab_offset  # the label's column here, if this shard owns it
    owned = keep & (columns >= 0) & (columns < V)

    m = tl.full([ROWS], float("-inf"), tl.float32)  # running max of the raw logits x
    s = tl.zeros([ROWS], tl.float32)  # sum e^d, d = (x - m) / T
    t = tl.zeros([ROWS], tl.float32)  # sum e^d d
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_mask[:, None] & (cols < V)[None, :]
        # Masked lanes read -inf: the identity of max, and e^{-inf} = 0 for the sums.
        x = tl.load(row_start[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A row with no finite value yet keeps m = -inf; use 0 as its reference point so that
        # e^d is e^{-inf} = 0 and never e^{-inf - (-inf)} = NaN.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        delta = (m - ref) * inv_temperature
        alpha = tl.exp(delta)  # 0 while m = -inf
        d = (x - ref[:, None]) * inv_temperature
        e = tl.exp(d)
        if WITH_ENTROPY:
            # s = 0 exactly when m = -inf; delta * s would then be -inf * 0 = NaN.
            shift = tl.where(s > 0.0, delta * s, 0.0)
            # x = -inf gives e = 0 and d = -inf: count that term as 0, not NaN.
            ed = tl.where(e > 0.0, e * d, 0.0)
            t = alpha * (t + shift) + tl.sum(ed, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    log_s = tl.log(s)
    ref = tl.where(m == float("-inf"), 0.0, m)
    lse = ref * inv_temperature + log_s
    safe_columns = tl.where(owned, columns, 0)
    x_label = tl.load(row_start + safe_columns, mask=row_mask & owned, other=0.0)
    logp = (x_label.to(tl.float32) - ref) * inv_temperature - log_s
    tl.store(logp_ptr + rows, tl.where(owned, logp, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WITH_ENTROPY:
        entropy = log_s - t / s
        tl.store(entropy_ptr + rows, tl.where(keep, entropy, 0.0), mask=row_mask)


# Backward moves 2*N*V*e bytes (one read of logits, one write of grad) + ~24*N: two of the three
# passes over [N, V] in a training step (forward read, backward read, backward write).
# With z = x / T, log p_k = z_k - lse, p_k = e^{log p_k}, H = -sum p log p:
#   d logp / d z_k = 1[k == label] - p_k
#   d H / d z_k    = -p_k (log p_k + H)       (from dH/dz_k = -sum_j (1 + log p_j) dp_j/dz_k)
# so dz_k = g_logp (1[k == label] - p_k) - g_H p_k (log p_k + H) and dx_k = dz_k / T.
#
# The saved lse is a float32 within half an ulp of the true one, an error every p_k of the row
# shares: 2^-24 |lse| relative, 0.03 at lse ~ 1e6. Below SAVED_LSE_BOUND that is no more than the
# rounding of z = x / T itself (2^-24 |z|, which PyTorch's float32 log_softmax(x / T) carries too),
# and log p_k = z_k - lse: one read of the row. A kept row whose |lse| reaches the bound first
# recomputes its max m and s = sum e^{(x - m) / T}, as the forward, and takes
# log p_k = (x_k - m) / T - log s, as accurate as the forward: one more read of those rows only.
# Saving m with lse in the forward would cost 8 bytes a row instead of a read, but a second saved
# tensor is not in the op's contract (lse alone is); typical LM logits (|lse| ~ 10-50) never pay.
# Both cases are log p_k = (x_k - shift) / T - base, with (shift, base) = (0, lse) or (m, log s).
#
# A vocabulary shard (SHARD; ops/vocab_parallel.py) holds the columns [vocab_offset, vocab_offset + V):
# lse, m and s are the shard's own, and the whole vocabulary's log p_k is the shard's minus the
# shard's log share of the probability mass (log_mass <= 0, from the all-reduced row statistics),
# so base -= log_mass. The label's one-hot term lands on column label - vocab_offset, which lies
# outside [0, V) when another shard owns the label.


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,  # [N, V] float32/bfloat16/float16, stride(1) == 1
    labels_ptr,  # [N] int32/int64
    lse_ptr,  # [N] float32, from the forward
    entropy_ptr,  # [N] float32, from the forward; read only WITH_ENTROPY
    grad_logp_ptr,  # [N] float32, upstream gradient of logp
    grad_entropy_ptr,  # [N] float32, upstream gradient of entropy; read only WITH_ENTROPY
    grad_logits_ptr,  # [N, V] out, logits' dtype; may alias logits_ptr (in-place backward)
    N,  # rows
    V,  # vocabulary
    stride_logits_n,  # elements between rows of logits
    stride_grad_logits_n,  # elements between rows of grad_logits
    stride_grad_logp,  # elements between entries of grad_logp (0 for an expanded scalar)
    stride_grad_entropy,  # elements between entries of grad_entropy
    inv_temperature,  # 1 / T
    ignore_index,  # label value of rows whose gradient is 0
    vocab_offset,  # the logits are columns [vocab_offset, vocab_offset + V) of the labels' vocabulary
    log_mass_ptr,  # [N] float32: the shard's log share of the whole softmax; read only SHARD
    SHARD: tl.constexpr,  # a vocabulary shard: log p gains log_mass (see the comment above)
    WITH_ENTROPY: tl.constexpr,  # add the entropy term
    ROWS: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary chunk per step (power of two)
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)  # int64: N*V may exceed 2^31
    x_start = logits_ptr + rows64 * stride_logits_n
    g_start = grad_logits_ptr + rows64 * stride_grad_logits_n
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    keep = labels != ignore_index
    columns = labels.to(tl.int64) - vocab_offset  # outside [0, V) where another shard owns the label
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    # Ignored rows get zero upstream gradients and are zeroed again below, whatever lse holds.
    g_logp = tl.load(grad_logp_ptr + rows64 * stride_grad_logp, mask=row_mask & keep, other=0.0)
    if WITH_ENTROPY:
        h = tl.load(entropy_ptr + rows, mask=row_mask & keep, other=0.0)
        g_h = tl.load(grad_entropy_ptr + rows64 * stride_grad_entropy, mask=row_mask & keep, other=0.0)

    cols0 = tl.arange(0, BLOCK_V)
    # log p = (x - shift) / T - base: (0, lse), or (m, log s) recomputed where lse is too coarse.
    recompute = row_mask & keep & ~(tl.abs(lse) < SAVED_LSE_BOUND)  # NaN lse: recompute too
    shift = tl.zeros([ROWS], tl.float32)
    base = lse
    if tl.max(recompute.to(tl.int32), axis=0) > 0:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = recompute[:, None] & (cols < V)[None, :]
            x = tl.load(x_start[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in the forward
            e = tl.exp((x - ref[:, None]) * inv_temperature)
            s = tl.exp((m - ref) * inv_temperature) * s + tl.sum(e, axis=1)
            m = m_new
        shift = tl.where(recompute & (m != float("-inf")), m, 0.0)
        base = tl.where(recompute, tl.log(s), lse)
    if SHARD:
        base -= tl.load(log_mass_ptr + rows, mask=row_mask & keep, other=0.0)

    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_mask[:, None] & (cols < V)[None, :]
        offsets = cols[None, :]
        # Each element is read before it is written, so grad_logits may be the logits themselves.
        x = tl.load(x_start[:, None] + offsets, mask=mask, other=float("-inf"))
        log_p = (x.to(tl.float32) - shift[:, None]) * inv_temperature - base[:, None]
        p = tl.exp(log_p)
        coef = g_logp[:, None]
        if WITH_ENTROPY:
            coef = coef + g_h[:, None] * (log_p + h[:, None])
        # p = 0 with log p = -inf (a -inf logit) would give 0 * -inf = NaN; its gradient is 0.
        dz = tl.where(p > 0.0, -p * coef, 0.0)
        dz += tl.where(cols[None, :] == columns[:, None], g_logp[:, None], 0.0)
        dz = tl.where(keep[:, None], dz, 0.0)
        dx = dz * inv_temperature
        tl.store(g_start[:, None] + offsets, dx.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# Tiles: (max V, BLOCK_V, ROWS, forward num_warps, backward num_warps); first match wins, None =
# any V. Small tiles hold 1024 elements, 8 per thread. With unaligned rows (V = 17) Triton cannot
# vectorise and lays one row along a warp, so a thread of the [32, 32] tile holds 8 rows of per-row
# state (pointers, labels, m, s, t); a [64, 64] tile spilled (255 registers and a stack frame on
# sm_90), which tests/test_triton_compile.py now catches.
# Large V, measured on an H100 (torch 2.11, Triton 3.6) at bf16 [16384 x 128256], device copy
# 3.03 TB/s (read + write): forward with entropy, 4096-wide chunks: 4 warps 1.42 ms (97% of copy
# bandwidth), 8 warps 1.65, 16 warps 2.32 (its three block reductions per chunk cost more with
# more warps); 2048- or 8192-wide chunks were no faster. Backward: 8 warps 2.95 ms (2.85 TB/s),
# 4 warps 2.98, 16 warps 2.92. Without entropy the forward ran 1.37 ms with 4 warps, 1.38 with 8.
_TILES = (
    (32, 32, 32, 4, 4),
    (256, 256, 4, 4, 4),
    (1024, 1024, 1, 4, 4),
    (None, 4096, 1, 4, 8),
)


def _launch_config(V: int, backward: bool = False):
    """(BLOCK_V, ROWS, num_warps) of the forward (or backward) kernel for a vocabulary of V."""
    for max_v, block_v, rows, fwd_warps, bwd_warps in _TILES:
        if max_v is None or V <= max_v:
            return block_v, rows, bwd_warps if backward else fwd_warps
    raise AssertionError("unreachable: the last tile takes any V")


def token_logprobs_forward(logits, labels, logp, entropy, lse, temperature, ignore_index, vocab_offset=0):
    """Write logp, lse and (if entropy is not None) entropy for [N, V] logits. See Provider."""
    N, V = logits.shape
    if N == 0:
        return
    block_v, rows, num_warps = _launch_config(V)
    with_entropy = entropy is not None
    grid = (triton.cdiv(N, rows),)
    _token_logprobs_fwd_kernel[grid](
        logits, labels, logp, lse,
        entropy if with_entropy else lse,  # placeholder, never touched
        N, V, logits.stride(0), 1.0 / temperature, ignore_index, vocab_offset,
        WITH_ENTROPY=with_entropy, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip


def token_logprobs_backward(
    logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature, ignore_index, vocab_offset=0,
    log_mass=None,
):  # fmt: skip
    """Write d(loss)/d(logits) into grad_logits (may be logits itself). See Provider."""
    N, V = logits.shape
    if N == 0:
        return
    block_v, rows, num_warps = _launch_config(V, backward=True)
    with_entropy = entropy is not None
    grid = (triton.cdiv(N, rows),)
    _token_logprobs_bwd_kernel[grid](
        logits, labels, lse,
        entropy if with_entropy else lse,  # placeholders, never read
        grad_logp,
        grad_entropy if with_entropy else grad_logp,
        grad_logits,
        N, V, logits.stride(0), grad_logits.stride(0),
        grad_logp.stride(0), grad_entropy.stride(0) if with_entropy else 0,
        1.0 / temperature, ignore_index, vocab_offset,
        lse if log_mass is None else log_mass,  # placeholder, never read
        SHARD=log_mass is not None, WITH_ENTROPY=with_entropy, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip


_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.int32: "i32", torch.int64: "i64"}  # fmt: skip


def compile_targets():
    """Every kernel configuration the launch functions can pick, as plain data for triton.compile.

    One dict per configuration: ``kernel`` (the JIT function), ``signature`` ({arg: Triton type,
    "constexpr" for compile-time switches}), ``constexprs`` ({arg: value}), ``num_warps`` and a
    short ``name``. Integer arguments are listed as i32, as the launcher specialises them for
    sizes below 2^31.
    """
    targets = []
    for _, block_v, rows, fwd_warps, bwd_warps in _TILES:
        for logits_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for labels_dtype in (torch.int32, torch.int64):
                for with_entropy in (False, True):
                    x = "*" + _TRITON_DTYPE[logits_dtype]
                    lab = "*" + _TRITON_DTYPE[labels_dtype]
                    constexprs = {"WITH_ENTROPY": with_entropy, "ROWS": rows, "BLOCK_V": block_v}
                    fwd = {
                        "logits_ptr": x, "labels_ptr": lab, "logp_ptr": "*fp32",
                        "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                        "N": "i32", "V": "i32", "stride_logits_n": "i32",
                        "inv_temperature": "fp32", "ignore_index": "i32", "vocab_offset": "i32",
                    }  # fmt: skip
                    bwd = {
                        "logits_ptr": x, "labels_ptr": lab, "lse_ptr": "*fp32",
                        "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
                        "grad_entropy_ptr": "*fp32", "grad_logits_ptr": x,
                        "N": "i32", "V": "i32", "stride_logits_n": "i32",
                        "stride_grad_logits_n": "i32", "stride_grad_logp": "i32",
                        "stride_grad_entropy": "i32",
                        "inv_temperature": "fp32", "ignore_index": "i32", "vocab_offset": "i32",
                        "log_mass_ptr": "*fp32",
                    }  # fmt: skip
                    tag = f"{x[1:]}_{lab[1:]}_H{int(with_entropy)}_R{rows}_B{block_v}"
                    for kernel, signature, kind, num_warps, switches in (
                        (_token_logprobs_fwd_kernel, fwd, "fwd", fwd_warps, constexprs),
                        (_token_logprobs_bwd_kernel, bwd, "bwd", bwd_warps, {**constexprs, "SHARD": False}),
                        (_token_logprobs_bwd_kernel, bwd, "bwd_shard", bwd_warps, {**constexprs, "SHARD": True}),
                    ):
                        targets.append({
                            "name": f"token_logprobs_{kind}_{tag}_w{num_warps}",
                            "kernel": kernel,
                            "signature": {**signature, **{k: "constexpr" for k in switches}},
                            "constexprs": dict(switches),
                            "num_warps": num_warps,
                        })  # fmt: skip
    return targets
