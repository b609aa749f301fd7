"""Triton kernel of fused_policy_loss's gradient in one kernel: log-probs, entropy, the separable
objective's per-token gradient and the logits' gradient, each row read from HBM once.

Shapes: logits [N, V] (stride(1) == 1, any row stride), labels [N]; every other row tensor [N]
float32 contiguous. The provider contract is ``Provider.policy_epilogue_forward`` in
``rlhf_fast/backends/base.py``; the math it must equal is the composed path of
``rlhf_fast/ops/fused_policy_loss.py`` (token_logprobs, then the objective of
``rlhf_fast/objectives.py`` under autograd, then token_logprobs' backward).

One program owns ROWS rows, as in kernels/token_logprobs.py (same tiles), and runs three steps:
  1. pass 1 over the row: online max, s = sum e^d, t = sum e^d d (token_logprobs' forward, the
     same numerics), then lse, logp of the label and the entropy;
  2. the epilogue on [ROWS] registers: d loss / d logp_t and d loss / d H_t from logp_t, H_t and
     the token's own inputs (old_logp, advantage, the aggregation weight, ref_logp);
  3. pass 2 over the row: the gradient of token_logprobs' backward, written in the logits' dtype
     (into the logits themselves for an in-place backward: each element is read before written).
Bytes: N*V*e read by pass 1, N*V*e read again by pass 2 and N*V*e written, + ~52*N for the row
tensors. Pass 2 reads a row its program has just read, which is meant to hit L2 (a 128256-wide
bf16 row is 250 KB), so that HBM sees N*V*e read once and written once; the composed path moves
3*N*V*e through HBM (forward read, backward read and write). On an H200 (2026-12-04, PPO, bf16
[16384 x 128256]) the loss's fwd+bwd took 5.44 ms against 8.49 ms for the composed path, but the
kernel's share was about that of the forward and backward kernels together: with one row per
program and several programs per multiprocessor, hundreds of rows are in flight, more than L2
holds, so pass 2 reads HBM again. csrc/cuda/policy_epilogue.cu has a launch shape with one
1024-thread block per multiprocessor for this (RLHF_FAST_CUDA_EPILOGUE=l2); a persistent Triton
launch like it is not written yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.rewards import ESTIMATOR_CODE, _kl
from rlhf_fast.kernels.token_logprobs import _TILES, _TRITON_DTYPE

# The separable objectives this kernel computes (compile-time switch OBJECTIVE).
OBJECTIVE_CODE = {"ppo": 0, "cispo": 1, "gpg": 2, "sapo": 3}
NO_KL = -1  # KL switch when the loss has no KL term




def _warps(rows: int, bwd_warps: int) -> int:
    """token_logprobs' tiles with its backward's warps (pass 2 is that kernel), except the 32-row
    tile: there the epilogue's dozen extra values per row, 8 rows per thread with 4 warps, spilled
    (40 registers and an 8-byte stack frame on sm_90, float32 cispo with KL and entropy); with 8
    warps a thread holds 4 rows. tests/test_triton_compile.py checks every configuration."""
    return 8 if rows == 32 else bwd_warps


def _launch_config(V: int):
    """(BLOCK_V, ROWS, num_warps) for a vocabulary of V: the first tile of _TILES that takes V."""
    for max_v, block_v, rows, _, bwd_warps in _TILES:
        if max_v is None or V <= max_v:
            return block_v, rows, _warps(rows, bwd_warps)
    raise AssertionError("unreachable: the last tile takes any V")


@triton.jit
def _objective_grad(logp, old_logp, adv, low, high, dual_clip, tau_pos, tau_neg, OBJECTIVE: tl.constexpr):
    """d loss_t / d logp_t of the objective's per-token loss (rlhf_fast/objectives.py), as its
    autograd computes it. Infinite bounds stand for the absent ones."""
    log_ratio = logp - old_logp
    if OBJECTIVE == 0:
        # ppo: loss = -A r, constant where the clip or the dual clip bites or A = 0 (frozen), so
        # that a huge log-ratio there never reaches exp(). REINFORCE: low = -inf, high = inf.
        raw_ratio = tl.exp(log_ratio)
        clipped = ((adv > 0.0) & (raw_ratio > high)) | ((adv < 0.0) & (raw_ratio < low))
        dual = (adv < 0.0) & (raw_ratio > dual_clip)
        frozen = clipped | dual | (adv == 0.0)
        grad = tl.where(frozen, 0.0, -adv * tl.exp(tl.where(frozen, 0.0, log_ratio)))
    elif OBJECTIVE == 1:
        # cispo: loss = -sg(clamp(r, low, high)) A logp. Compare-selects keep a NaN ratio NaN, as torch.clamp.
        weight = tl.exp(log_ratio)
        weight = tl.where(weight < low, low, weight)
        weight = tl.where(weight > high, high, weight)
        grad = -weight * adv
    elif OBJECTIVE == 2:
        # gpg: loss = -A logp.
        grad = -adv
    else:
        # sapo: loss = -A (4 / tau) sigmoid(tau (r - 1)), r = exp(clamp(log r, -20, 20)); the
        # clamp passes the gradient on [-20, 20] only (a NaN log-ratio too gets none, as in torch).
        inside = (log_ratio >= -20.0) & (log_ratio <= 20.0)
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        grad = tl.where(inside, -adv * (4.0 / tau) * gate * (1.0 - gate) * tau * ratio, 0.0)
    return grad


@triton.jit
def _kl_grad(logp, ref_logp, kl_clamp, ESTIMATOR: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
             CLAMPED: tl.constexpr):  # fmt: skip
    """d kl_t / d logp_t of rlhf_fast/kl_estimators.py kl_loss_values, as its autograd computes it."""
    d = logp - ref_logp
    if STRAIGHT_THROUGH:  # "k1+", "k3+", "abs+": k2's gradient, whatever the value and its clamp
        grad = d
    else:
        if ESTIMATOR == 0:
            grad = tl.full(d.shape, 1.0, tl.float32)
        elif ESTIMATOR == 1:
            grad = d
        elif ESTIMATOR == 2:
            # k3 = e^x - 1 - x, x = -d: the derivative of k3_of's two branches, e^x - 1 above
            # |x| = 0.5 and below it the derivative of its Taylor polynomial, sum_{n=1..7} x^n / n!.
            x = -d
            small = tl.abs(x) < 0.5
            xs = tl.where(small, x, 0.0)
            poly = 1.0 / 5040.0
            poly = poly * xs + 1.0 / 720.0
            poly = poly * xs + 1.0 / 120.0
            poly = poly * xs + 1.0 / 24.0
            poly = poly * xs + 1.0 / 6.0
            poly = poly * xs + 0.5
            poly = poly * xs + 1.0
            grad = -tl.where(small, xs * poly, tl.exp(tl.where(small, 0.0, x)) - 1.0)
        else:
            grad = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, d * 0.0))  # sign(d); NaN stays NaN
        if CLAMPED:  # torch.clamp passes the gradient where the value lies in [-c, c]
            kl = _kl(logp, ref_logp, ESTIMATOR)
            grad = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), grad, 0.0)
    return grad


@triton.jit
def _policy_epilogue_kernel(
    logits_ptr,  # [N, V] float32/bfloat16/float16, stride(1) == 1
    labels_ptr,  # [N] int32/int64
    old_logp_ptr,  # [N] float32
    advantages_ptr,  # [N] float32
    pg_weight_ptr,  # [N] float32: d loss / d (objective's loss_t), the aggregation's weight times the rollout weight
    weight_ptr,  # [N] float32: d loss / d (per-token term), the aggregation's weight (KL and entropy terms)
    ref_logp_ptr,  # [N] float32; read only when KL != NO_KL
    logp_ptr,  # [N] float32 out
    entropy_ptr,  # [N] float32 out
    lse_ptr,  # [N] float32 out: logsumexp(logits / T), for a recomputed backward
    grad_logp_ptr,  # [N] float32 out: d loss / d logp_t
    grad_entropy_ptr,  # [N] float32 out: d loss / d H_t
    grad_logits_ptr,  # [N, V] out, logits' dtype; may alias logits_ptr (in-place)
    N,  # rows
    V,  # vocabulary
    stride_logits_n,  # elements between rows of logits
    stride_grad_logits_n,  # elements between rows of grad_logits
    inv_temperature,  # 1 / T
    ignore_index,  # label value of rows that get logp = entropy = 0 and a zero gradient
    clip_low,  # ppo / cispo: lower bound of the ratio (-inf: none)
    clip_high,  # ppo / cispo: upper bound of the ratio (inf: none)
    dual_clip,  # ppo: dual-clip constant (inf: none)
    tau_pos,  # sapo: gate temperature where A > 0
    tau_neg,  # sapo: gate temperature where A <= 0
    kl_coef,  # weight of the KL term
    kl_clamp,  # |kl| bound; read only CLAMPED
    entropy_coef,  # weight of the entropy bonus (subtracted)
    OBJECTIVE: tl.constexpr,  # OBJECTIVE_CODE
    KL: tl.constexpr,  # ESTIMATOR_CODE of the KL term, or NO_KL
    STRAIGHT_THROUGH: tl.constexpr,  # the estimator ends in "+": k2's gradient
    CLAMPED: tl.constexpr,  # the KL value is clamped to [-kl_clamp, kl_clamp]
    ENTROPY_GRAD: tl.constexpr,  # entropy_coef != 0: add the entropy term to the gradient
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
    # Pass 1: kernels/token_logprobs.py's forward, with its comments' numerics.
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_mask[:, None] & (cols < V)[None, :]
        x = tl.load(x_start[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        delta = (m - ref) * inv_temperature
        alpha = tl.exp(delta)
        d = (x - ref[:, None]) * inv_temperature
        e = tl.exp(d)
        shift = tl.where(s > 0.0, delta * s, 0.0)
        ed = tl.where(e > 0.0, e * d, 0.0)
        t = alpha * (t + shift) + tl.sum(ed, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    ref = tl.where(m == float("-inf"), 0.0, m)
    safe_labels = tl.where(keep, labels, 0).to(tl.int64)
    x_label = tl.load(x_start + safe_labels, mask=row_mask & keep, other=0.0).to(tl.float32)
    logp = tl.where(keep, (x_label - ref) * inv_temperature - log_s, 0.0)
    h = tl.where(keep, log_s - t / s, 0.0)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(entropy_ptr + rows, h, mask=row_mask)
    tl.store(lse_ptr + rows, ref * inv_temperature + log_s, mask=row_mask)

    # The epilogue: the per-token gradients, as the composed path's autograd chains them.
    inputs = row_mask & keep
    old_logp = tl.load(old_logp_ptr + rows, mask=inputs, other=0.0)
    adv = tl.load(advantages_ptr + rows, mask=inputs, other=0.0)
    pg_weight = tl.load(pg_weight_ptr + rows, mask=inputs, other=0.0)
    weight = tl.load(weight_ptr + rows, mask=inputs, other=0.0)
    g_logp = pg_weight * _objective_grad(logp, old_logp, adv, clip_low, clip_high, dual_clip, tau_pos, tau_neg,
                                         OBJECTIVE)  # fmt: skip
    if KL != -1:
        ref_logp = tl.load(ref_logp_ptr + rows, mask=inputs, other=0.0)
        g_logp += (weight * kl_coef) * _kl_grad(logp, ref_logp, kl_clamp, KL, STRAIGHT_THROUGH, CLAMPED)
    g_logp = tl.where(keep, g_logp, 0.0)
    g_h = tl.where(keep, weight * -entropy_coef, 0.0)
    tl.store(grad_logp_ptr + rows, g_logp, mask=row_mask)
    tl.store(grad_entropy_ptr + rows, g_h, mask=row_mask)

    # Pass 2: token_logprobs' backward, with log p = (x - m) / T - log s from pass 1 (exact at any
    # |lse|, so no recompute), dz_k = g_logp (1[k == label] - p_k) - g_H p_k (log p_k + H).
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_mask[:, None] & (cols < V)[None, :]
        offsets = cols[None, :]
        x = tl.load(x_start[:, None] + offsets, mask=mask, other=float("-inf"))
        log_p = (x.to(tl.float32) - ref[:, None]) * inv_temperature - log_s[:, None]
        p = tl.exp(log_p)
        coef = g_logp[:, None]
        if ENTROPY_GRAD:
            coef = coef + g_h[:, None] * (log_p + h[:, None])
        dz = tl.where(p > 0.0, -p * coef, 0.0)
        dz += tl.where(cols[None, :] == labels[:, None], g_logp[:, None], 0.0)
        dz = tl.where(keep[:, None], dz, 0.0)
        tl.store(g_start[:, None] + offsets, (dz * inv_temperature).to(grad_logits_ptr.dtype.element_ty), mask=mask)


def kernel_switches(options, with_kl: bool, entropy_coef: float) -> dict:
    """The compile-time switches of a call: PolicyLossOptions -> plain values."""
    estimator = options.kl_estimator
    return {
        "OBJECTIVE": OBJECTIVE_CODE[options.objective],
        "KL": ESTIMATOR_CODE[estimator.removesuffix("+")] if with_kl else NO_KL,
        "STRAIGHT_THROUGH": with_kl and estimator.endswith("+"),
        "CLAMPED": with_kl and options.kl_clamp is not None,
        "ENTROPY_GRAD": entropy_coef != 0.0,
    }


def _ratio_bounds(options) -> tuple[float, float]:
    """(low, high) of the ratio for ppo and cispo, infinite where the objective has none."""
    inf = float("inf")
    eps, eps_high = options.clip_eps, options.clip_eps_high
    if options.objective == "cispo":  # clip_eps None: no lower bound; no upper one when both are None
        high = eps_high if eps_high is not None else eps
        return (-inf if eps is None else 1 - eps), (inf if high is None else 1 + high)
    if eps is None:  # ppo's REINFORCE
        return -inf, inf
    return 1 - eps, 1 + (eps if eps_high is None else eps_high)


def policy_epilogue_forward(logits, labels, old_logp, advantages, pg_weight, weight, ref_logp, logp, entropy, lse,
                            grad_logp, grad_entropy, grad_logits, temperature, ignore_index, options, entropy_coef):  # fmt: skip
    """Write logp, entropy, lse, the token gradients and the logits' gradient. See Provider."""
    N, V = logits.shape
    if N == 0:
        return
    block_v, rows, num_warps = _launch_config(V)
    with_kl = ref_logp is not None and options.kl_coef != 0.0
    low, high = _ratio_bounds(options)
    inf = float("inf")
    _policy_epilogue_kernel[(triton.cdiv(N, rows),)](
        logits, labels, old_logp, advantages, pg_weight, weight,
        ref_logp if with_kl else old_logp,  # placeholder, never read
        logp, entropy, lse, grad_logp, grad_entropy, grad_logits,
        N, V, logits.stride(0), grad_logits.stride(0), 1.0 / temperature, ignore_index,
        low, high, inf if options.dual_clip is None else options.dual_clip,
        options.sapo_tau_pos, options.sapo_tau_neg, options.kl_coef,
        inf if options.kl_clamp is None else options.kl_clamp, entropy_coef,
        **kernel_switches(options, with_kl, entropy_coef), ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip


def compile_targets():
    """Every configuration the launcher can pick, as kernels/token_logprobs.py's compile_targets
    (same fields). Per tile and logits dtype: every objective without KL or entropy, and the
    heaviest epilogue of each (k3 clamped, entropy term); int64 labels, as the op passes them."""
    targets = []
    for _, block_v, rows, _, bwd_warps in _TILES:
        num_warps = _warps(rows, bwd_warps)
        for logits_dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = "*" + _TRITON_DTYPE[logits_dtype]
            signature = {
                "logits_ptr": x, "labels_ptr": "*i64", "old_logp_ptr": "*fp32", "advantages_ptr": "*fp32",
                "pg_weight_ptr": "*fp32", "weight_ptr": "*fp32", "ref_logp_ptr": "*fp32",
                "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32",
                "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "grad_logits_ptr": x,
                "N": "i32", "V": "i32", "stride_logits_n": "i32", "stride_grad_logits_n": "i32",
                "inv_temperature": "fp32", "ignore_index": "i32",
                "clip_low": "fp32", "clip_high": "fp32", "dual_clip": "fp32", "tau_pos": "fp32",
                "tau_neg": "fp32", "kl_coef": "fp32", "kl_clamp": "fp32", "entropy_coef": "fp32",
            }  # fmt: skip
            for objective, code in OBJECTIVE_CODE.items():
                for heavy in (False, True):
                    switches = {"OBJECTIVE": code, "KL": ESTIMATOR_CODE["k3"] if heavy else NO_KL,
                                "STRAIGHT_THROUGH": False, "CLAMPED": heavy, "ENTROPY_GRAD": heavy,
                                "ROWS": rows, "BLOCK_V": block_v}  # fmt: skip
                    tag = f"{objective}{'_kl_h' if heavy else ''}_{x[1:]}_R{rows}_B{block_v}_w{num_warps}"
                    targets.append({
                        "name": f"policy_epilogue_{tag}",
                        "kernel": _policy_epilogue_kernel,
                        "signature": {**signature, **{k: "constexpr" for k in switches}},
                        "constexprs": switches,
                        "num_warps": num_warps,
                    })  # fmt: skip
    return targets
