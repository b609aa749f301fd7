"""The provider contract (rlhf_fast/backends/base.py) on every backend: torch, host, triton, cuda.

Each provider method writes into outputs poisoned with NaN beforehand (every element must be
written) and is compared with the float64 reference on the same input values by the one tolerance
rule, numerics.assert_close: a float32 or float64 result within 64 eps of its dtype, a bfloat16 or
float16 one within PyTorch's own error in that dtype (plus twice the float32 allowance), one ulp
where the Triton interpreter truncates to bfloat16. Backends that cannot run here are skipped with
their reason. The Triton interpreter takes about 2 ms per token of a row in the [B, T] scans, so
there the long rows of those ops are in the slow tier.

A norm cannot see an error in a tiny probability, so token_logprobs' gradient also meets, element
by element, the first-order error bound of a float32 implementation (``grad_bound``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.backends.registry import provider

from numerics import IGNORE, INTERPRETED, assert_close, backend_params, bt_case, logits_case, require, truncates

# The interpreter evaluates both sides of every tl.where in numpy, and the unselected side of the
# guards (-inf * 0, log 0, 0 / 0 in rows past N) warns; the selected values are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Rows whose |lse| is at least this get their max and sum recomputed by the backward instead of
# reading the saved float32 lse (SAVED_LSE_BOUND in kernels/token_logprobs.py, kSavedLseBound in
# csrc/include/rlhf_fast/token_logprobs.h).
SAVED_LSE_BOUND = 64.0


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows over 16384 logits (32003: 8 chunks of 4096; 128256: 32) add chunks, not code paths, to the
# 4097 to 9001 of the fast tier (two or three chunks): their cases run in the slow tier.
LONG_ROW = 16384


def sized(cases, vocab_at=-1):
    """pytest params of ``cases`` (tuples), in the slow tier where case[vocab_at] > LONG_ROW."""
    return [
        pytest.param(*case, id="-".join(map(str, case)), marks=[pytest.mark.slow] if case[vocab_at] > LONG_ROW else [])
        for case in cases
    ]


def rows_for(vocab: int) -> int:
    """37 rows cross the Triton tiles of 32 and 4 rows (V <= 256); above, a program owns one row."""
    return 37 if vocab <= 256 else 4


# ---------------------------------------------------------------------------------------------
# token_logprobs: forward and backward
# ---------------------------------------------------------------------------------------------


def to_device(logits: torch.Tensor, device: str) -> torch.Tensor:
    """The same values and row stride on ``device``."""
    if device == "cpu":
        return logits
    n, vocab = logits.shape
    full = torch.empty(n, max(logits.stride(0), vocab), dtype=logits.dtype, device=device)
    full[:, :vocab].copy_(logits)
    return full[:, :vocab]


def run_token_logprobs(backend, device, logits, labels, temperature, g_logp, g_entropy, *, with_entropy=True,
                       inplace=False, grad_pad=0, ignore_index=IGNORE, expanded_grad=False):  # fmt: skip
    """Forward and backward through ``backend`` on ``device``, outputs poisoned with NaN; results on the CPU.

    expanded_grad: g_logp reaches the backward as one value expanded with stride 0, as logp.sum()
    hands it back.
    inplace: the backward writes the gradient over (a copy of) the logits it reads. Otherwise the
    gradient goes to a buffer of row stride vocab + grad_pad, and the logits must come back unchanged.
    """
    prov = provider(backend)
    n, vocab = logits.shape
    odt = out_dtype(logits.dtype)
    x, labels = to_device(logits, device), labels.to(device)
    x = x.clone() if inplace else x
    before = x.clone()
    logp, entropy, lse = (torch.full((n,), math.nan, dtype=odt, device=device) for _ in range(3))
    entropy = entropy if with_entropy else None
    prov.token_logprobs_forward(x, labels, logp, entropy, lse, temperature, ignore_index)
    grad = x if inplace else torch.full((n, vocab + grad_pad), math.nan, dtype=x.dtype, device=device)[:, :vocab]
    g_logp = g_logp[:1].to(device).expand(n) if expanded_grad else g_logp.to(device)
    g_entropy = g_entropy.to(device) if with_entropy else None
    prov.token_logprobs_backward(x, labels, lse, entropy, g_logp, g_entropy, grad, temperature, ignore_index)
    if not inplace:
        assert ((x == before) | (x.isnan() & before.isnan())).all(), "the backward wrote to the logits"
    return logp.cpu(), None if entropy is None else entropy.cpu(), lse.cpu(), grad.cpu()


def token_reference(logits, labels, temperature, g_logp, g_entropy, ignore_index=IGNORE):
    """logp, entropy, lse, log p [N, V] and the logits gradient of the float64 reference."""
    x = logits.detach().cpu().double().requires_grad_(True)
    logp, entropy = reference.token_logprobs(
        x, labels.cpu(), temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    ((logp * g_logp.double()).sum() + (entropy * g_entropy.double()).sum()).backward()
    z = x.detach() / temperature
    lse = torch.logsumexp(z, dim=-1)
    return logp.detach(), entropy.detach(), lse, z - lse[:, None], x.grad


def grad_bound(log_p, lse, g_logp, g_entropy, labels, temperature, grad_dtype, exact_grad):
    """Elementwise bound on the gradient error of an implementation computing in float32 (float64
    for float64 logits), propagated from its inputs' rounding.

    Where the backward uses the saved lse (|lse| < SAVED_LSE_BOUND), z_k = x_k / T and lse are
    rounded, so log p_k = z_k - lse is off by up to about delta_k = eps (|z_k| + |lse| + 2): no
    implementation of z - lse in that precision avoids it. Rows at or above the bound recompute
    their max m and log p_k = (x_k - m) / T - log s, off by up to eps (|z_k - z_max| + |lse - z_max|
    + 2): logits sharing an offset of 1e6 then lose nothing to it. (Rows within 1% of the bound get
    the first, larger bound: the kernel decides on its own float32 lse.)
    With dz_k = g (1[k=label] - p_k) - gH p_k (log p_k + H), a change delta in log p_k moves dz_k by
    p_k delta (|g| + |gH| (1 + |log p_k + H|)); the error of H (at most max delta) moves it by
    |gH| p_k max delta. Add 1 - p at the label (eps |g|) and the final rounding to the gradient's
    dtype (one ulp, which also covers a truncation and the roundings of the sum); 4x for slack.
    """
    eps = torch.finfo(out_dtype(grad_dtype)).eps
    p = log_p.exp()
    finite = p > 0
    g, g_h = g_logp.double().abs()[:, None], g_entropy.double().abs()[:, None]
    h = torch.where(finite, -p * log_p, 0.0).sum(-1, keepdim=True)
    lse = lse[:, None]
    z = torch.where(finite, log_p + lse, 0.0)
    z_max = torch.where(finite, z, -torch.inf).amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    recomputed = lse.abs() >= 1.01 * SAVED_LSE_BOUND
    delta = eps * (torch.where(recomputed, (z - z_max).abs() + (lse - z_max).abs(), z.abs() + lse.abs()) + 2)
    delta = torch.where(finite, delta, 0.0)
    log_p_h = torch.where(finite, (log_p + h).abs(), 0.0)
    propagated = p * (delta * (g + g_h * (1 + log_p_h)) + g_h * delta.amax(dim=-1, keepdim=True))
    is_label = torch.arange(log_p.shape[-1])[None, :] == labels.cpu().long()[:, None]
    arithmetic = eps * (g + g_h) * (1 + is_label.double())
    info = torch.finfo(grad_dtype)  # one ulp, and the spacing of float16 subnormals (2^-24)
    return info.eps * (exact_grad.abs() + info.tiny) + 4 * (propagated + arithmetic) / temperature


def check_token_logprobs(backend, device, logits, labels, temperature, *, with_entropy=True, inplace=False,
                         grad_pad=0, ignore_index=IGNORE, expanded_grad=False):  # fmt: skip
    """Forward and backward of one provider against the float64 reference: values and gradient by
    the tolerance rule, the gradient also within ``grad_bound``, ignored rows exactly 0."""
    require(backend, device, logits.dtype)
    n = logits.shape[0]
    odt = out_dtype(logits.dtype)
    g_logp = torch.randn(n, dtype=odt)
    g_logp = g_logp[:1].expand(n) if expanded_grad else g_logp
    g_entropy = torch.randn(n, dtype=odt) if with_entropy else torch.zeros(n, dtype=odt)
    ref_logp, ref_entropy, ref_lse, ref_log_p, ref_grad = token_reference(
        logits, labels, temperature, g_logp, g_entropy, ignore_index
    )
    logp, entropy, lse, grad = run_token_logprobs(
        backend, device, logits, labels, temperature, g_logp, g_entropy, with_entropy=with_entropy,
        inplace=inplace, grad_pad=grad_pad, ignore_index=ignore_index, expanded_grad=expanded_grad,
    )  # fmt: skip
    keep = labels.cpu() != ignore_index
    assert logp.dtype == lse.dtype == odt and grad.dtype == logits.dtype
    assert torch.isfinite(lse).all(), "lse must be written on every row (its value on ignored rows is free)"
    for what, got, exact in (("logp", logp, ref_logp), ("entropy", entropy, ref_entropy), ("lse", lse[keep], ref_lse[keep])):
        if got is not None:
            assert torch.isfinite(got).all(), f"{what} has non-finite values: {got}"
            assert_close(got, exact, what)
    assert (logp[~keep] == 0).all() and (entropy is None or (entropy[~keep] == 0).all()), "ignored rows must be 0"
    assert torch.isfinite(grad).all(), "grad has non-finite values"
    assert (grad[~keep] == 0).all(), "grad of ignored rows must be 0"
    # A row's gradient is a difference of terms the size of its upstream gradients (exactly 0 at
    # V = 1), so rounding is measured against ||(|g| + |g_H|) / T|| where that is larger.
    upstream = ((g_logp.abs() + g_entropy.abs()).double() / temperature).norm().item()
    assert_close(grad, ref_grad, "grad", floor=upstream, truncated=truncates(backend, device, logits.dtype))
    bound = grad_bound(ref_log_p[keep], ref_lse[keep], g_logp[keep], g_entropy[keep], labels.cpu()[keep], temperature,
                       logits.dtype, ref_grad[keep])  # fmt: skip
    err = (grad.double() - ref_grad)[keep].abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"grad off by up to {float(err.max()):.3g}, {worst:.3g} x its elementwise bound"
    return logp, entropy, grad


# Temperature enters as one scaling x / T before anything else, so the vocabularies (one column, a
# tile of rows, one chunk, exactly and just over 4096, eight chunks) take turns with T < 1 and T > 1.
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "vocab,temperature", sized([(1, 1.3), (17, 0.7), (1000, 1.3), (4096, 0.7), (4097, 1.3), (32003, 0.7)], 0)
)
def test_token_logprobs_matches_reference(backend, device, dtype, vocab, temperature):
    logits, labels = logits_case(rows_for(vocab), vocab, dtype)
    check_token_logprobs(backend, device, logits, labels, temperature)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_llama3_vocab(backend, device, dtype):
    logits, labels = logits_case(2, 128256, dtype, ignore_frac=0.0)
    check_token_logprobs(backend, device, logits, labels, 1.3)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype,vocab", sized([(torch.float32, 17), (torch.float32, 32003), *((d, 777) for d in DTYPES)]))
def test_token_logprobs_without_entropy(backend, device, dtype, vocab):
    logits, labels = logits_case(rows_for(vocab), vocab, dtype)
    check_token_logprobs(backend, device, logits, labels, 0.9, with_entropy=False)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype,vocab", sized([(torch.bfloat16, 17), (torch.float32, 300), (torch.bfloat16, 32003)]))
def test_token_logprobs_all_rows_ignored(backend, device, dtype, vocab):
    require(backend, device, dtype)
    logits, labels = logits_case(5, vocab, dtype)
    labels.fill_(IGNORE)
    logits[0] = math.nan  # an ignored row is never read
    logp, entropy, _, grad = run_token_logprobs(backend, device, logits, labels, 1.0, torch.randn(5), torch.randn(5))
    assert (logp == 0).all() and (entropy == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("vocab", sized([(17,), (32003,)]))
def test_token_logprobs_ignored_rows_zero_whatever_lse(backend, device, vocab):
    """The lse of an ignored row is unspecified: the backward zeroes the row without reading it."""
    require(backend, device, torch.float32)
    logits, labels = logits_case(4, vocab, torch.float32, ignore_frac=0.0)
    labels[1:3] = IGNORE
    lse = torch.logsumexp(logits.double(), dim=-1).float()
    lse[1], lse[2] = -1e30, math.nan
    grad = torch.full_like(logits, math.nan, device=device)
    g = torch.ones(4, device=device)
    provider(backend).token_logprobs_backward(
        logits.to(device), labels.to(device), lse.to(device), lse.to(device), g, g, grad, 1.0, IGNORE
    )
    assert (grad[1:3] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_token_logprobs_other_ignore_index(backend, device):
    logits, labels = logits_case(9, 300, torch.float32)
    labels[labels == IGNORE] = 0
    labels[3] = -1
    check_token_logprobs(backend, device, logits, labels, 1.0, ignore_index=-1)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize(
    "dtype,vocab",
    sized([*((d, v) for d in DTYPES for v in (1000, 5000)), *((d, v) for d in (torch.float32, torch.bfloat16) for v in (17, 32003))]),
)
def test_token_logprobs_minus_inf_logits(backend, device, dtype, vocab):
    """-inf away from the label: p = 0 there, zero gradient, no NaN (0 * -inf, -inf - -inf). Row 0:
    its first three quarters (whole chunks) -inf; row 2: only the label finite; row 3: its first
    half -inf; every row: 30% of the other entries -inf."""
    n = 6
    logits, labels = logits_case(n, vocab, dtype, ignore_frac=0.1)
    labels[0], labels[2], labels[3] = vocab - 1, vocab // 2, vocab - 1
    masked = torch.rand(logits.shape) < 0.3
    masked[0, : (vocab * 3) // 4] = True
    masked[3, : vocab // 2] = True
    masked[2] = True
    masked[torch.arange(n), labels.clamp(min=0)] = False
    logits[masked] = -math.inf
    logits[2, vocab // 2] = 1.0
    _, _, grad = check_token_logprobs(backend, device, logits, labels, 0.8)
    assert (grad[masked] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize(
    "dtype,vocab,temperature",
    sized([*((d, 1000, t) for d in (torch.float32, torch.bfloat16) for t in (1.0, 0.7)), *((torch.float32, v, 0.7) for v in (17, 32003))], 1),
)
def test_token_logprobs_logits_of_scale_1e4(backend, device, dtype, vocab, temperature):
    """The online max must keep exp() in range."""
    logits, labels = logits_case(rows_for(vocab), vocab, dtype, scale=1e4, ignore_frac=0.1)
    logp, entropy, _ = check_token_logprobs(backend, device, logits, labels, temperature)
    assert (logp <= 0).all() and (entropy >= 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("vocab", [17, 1000, 5000])
@pytest.mark.parametrize("offset", [40.0, 1e4, 1e6])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_token_logprobs_large_common_offset(backend, device, vocab, offset, temperature, with_entropy):
    """Every other row shares a large offset (a tile of small rows mixes both kinds). Their saved
    float32 lse is off by up to half an ulp (0.03 at 1e6); the backward recomputes such rows, so
    values and gradient meet the offset-free bounds. An offset of 40 straddles SAVED_LSE_BOUND: the
    saved lse serves at T = 1, the recomputation (mostly) at T = 0.7, where lse ~ 40 / 0.7 + max."""
    logits, labels = logits_case(4, vocab, torch.float32, ignore_frac=0.0)
    labels[2] = IGNORE  # rows 1 and 3 (offset) and 0 (none) kept
    logits += offset * (torch.arange(4) % 2).unsqueeze(-1)
    check_token_logprobs(backend, device, logits, labels, temperature, with_entropy=with_entropy)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize(
    "dtype,vocab", sized([*((d, v) for d in DTYPES for v in (1001, 9001)), *((torch.bfloat16, v) for v in (17, 32003))])
)
def test_token_logprobs_row_strided_logits_and_grad(backend, device, dtype, vocab):
    """Row strides that are not multiples of 16 bytes, different for logits and grad; int64 and
    int32 labels."""
    n = rows_for(vocab)
    logits, labels = logits_case(n, vocab, dtype, row_pad=13)
    assert logits.stride(0) == vocab + 13
    check_token_logprobs(backend, device, logits, labels, 1.1, grad_pad=5)
    check_token_logprobs(backend, device, logits, labels.int(), 1.1, grad_pad=13)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize(
    "dtype,vocab",
    sized([*((d, v) for d in DTYPES for v in (1000, 4099)), *((d, v) for d in (torch.float32, torch.bfloat16) for v in (17, 32003))]),
)
def test_token_logprobs_inplace_backward(backend, device, dtype, vocab):
    logits, labels = logits_case(rows_for(vocab), vocab, dtype)
    check_token_logprobs(backend, device, logits, labels, 1.3, inplace=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_token_logprobs_many_rows(backend):
    """More rows than the CUDA kernels' capped grid (64 blocks per SM): their grid-stride loops."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for vocab, rows in ((300, 8 * 64 * sms + 77), (5000, 64 * sms + 33)):
        logits, labels = logits_case(rows, vocab, torch.bfloat16)
        check_token_logprobs(backend, "cuda", logits, labels, 1.0)


def test_triton_reads_an_expanded_upstream_gradient():
    """logp.sum() hands back a stride-0 gradient; the Triton kernel reads it with that stride (the
    ops make it contiguous for the other providers, whose contract asks for that)."""
    logits, labels = logits_case(6, 1000, torch.float32)
    check_token_logprobs("triton", "cpu" if INTERPRETED else "cuda", logits, labels, 1.0, expanded_grad=True)


# ---------------------------------------------------------------------------------------------
# [B, T] ops: KL-penalised rewards, GAE forward and backward, whitening, the fused PPO pass, and
# group advantages. Inputs are float32 (NaN and inf where masked), the oracle the float64 reference.
# ---------------------------------------------------------------------------------------------

ESTIMATORS = ("k1", "k2", "k3", "abs")
# (rows, tokens): 1030 crosses the Triton kernels' 1024-token chunk, 2047 to 2049 the CUDA kernels'
# (256 threads x 8 tokens), 5000 several of each; "mixed" masks give each row another kind.
BT_SHAPES = ((6, 1), (6, 37), (2, 1030), (6, 2047), (6, 2048), (6, 2049), (6, 5000))
# The Triton interpreter takes about a millisecond per token of a row in a scan (GAE, the fused
# PPO pass), and a program's overhead costs a row about 40 tokens. There its fast tier runs one
# short and one two-chunk shape, its slow tier the rows of up to 2049 tokens, and it skips the
# rest, which would take minutes each.
INTERPRETED_FAST = ((6, 37), (2, 1030))
INTERPRETED_SLOW = 6 * 2049


def bt_params(shapes, *options, fast=lambda rows, tokens, *option: (rows, tokens) in INTERPRETED_FAST,
              slow=lambda rows, tokens, *option: rows * max(tokens, 40) <= INTERPRETED_SLOW, slow_on_cpu=False):  # fmt: skip
    """(backend, device, rows, tokens, *option) for every backend, shape and combination of options.
    On the interpreter, the cases ``fast`` accepts run in the fast tier, the others that ``slow``
    accepts in the slow tier, and the rest are skipped; ``slow_on_cpu`` puts every CPU case in the
    slow tier."""
    params = []
    for backend_param in backend_params():
        backend, device = backend_param.values
        for (rows, tokens), option in itertools.product(shapes, itertools.product(*options)):
            marks = list(backend_param.marks)
            interpreted = backend == "triton" and device == "cpu"
            if interpreted and not fast(rows, tokens, *option) and not slow(rows, tokens, *option):
                marks.append(pytest.mark.skip(reason="the Triton interpreter would take minutes; GPUs run it"))
            elif (interpreted and not fast(rows, tokens, *option)) or (slow_on_cpu and device == "cpu"):
                marks.append(pytest.mark.slow)
            ids = (backend, device, f"{rows}x{tokens}", *option)
            params.append(pytest.param(backend, device, rows, tokens, *option, id="-".join(map(str, ids)), marks=marks))
    return params


def everywhere(*case):
    return True


def bt_calls(case, *, estimator="k3", gamma=0.99, lam=0.9, whiten=True):
    """{method: (inputs, number of outputs, options, float64 reference outputs (a thunk), floors)}
    of every [B, T] provider method on ``case`` (numerics.bt_case), with the default options and with
    a KL clamp that bites (0.5) and the biased variance. ``floors`` (a thunk) gives each output's
    rel_err floor, None for the default. GAE's oracle is reference.gae_scan, the vectorised form of
    the loop reference.gae (tests/test_advantages.py checks they agree)."""
    mask, logp, ref_logp, scores, values, rewards, (grad_a, grad_r) = case

    def m(t):
        return torch.where(mask, t, 0.0).double()

    def kl_rewards(kl_clamp=None):
        return [reference.kl_penalized_rewards(m(logp), m(ref_logp), scores.double(), mask, beta=0.1,
                                               estimator=estimator, kl_clamp=kl_clamp)]  # fmt: skip

    def gae(kl_clamp=None):
        r = kl_rewards(kl_clamp)[0]
        return (r, *reference.gae_scan(r, m(values), mask, gamma=gamma, lam=lam))

    def ppo(kl_clamp=None, unbiased=True):
        r, adv, ret = gae(kl_clamp)
        return [r, reference.whiten(adv, mask, unbiased=unbiased) if whiten else adv, ret]

    def ppo_floors(kl_clamp=None):
        return [None, whitened_floor(gae(kl_clamp)[1], mask) if whiten else None, None]

    def grad_values_floors():
        # grad V_k = gR_k - G_k + gamma G_prev is a difference of the running sums G (= grad r):
        # its rounding is measured against their size.
        grad_rewards = reference.gae_scan_backward(m(grad_a), m(grad_r), mask, gamma=gamma, lam=lam)[0]
        return [None, max(grad_rewards.norm().item(), 0.01 * grad_rewards.numel() ** 0.5)]

    def whiten_floors():
        return [whitened_floor(m(values), mask)]

    def default():
        return [None, None, None]

    ppo_inputs = (logp, ref_logp, scores, values, mask)
    return {
        "kl_rewards_forward": ((logp, ref_logp, scores, mask), 1, (0.1, estimator), kl_rewards, default),
        "kl_rewards_forward(kl_clamp=0.5)": ((logp, ref_logp, scores, mask), 1, (0.1, estimator, 0.5),
                                             lambda: kl_rewards(0.5), default),
        "gae_forward": ((rewards, values, mask), 2, (gamma, lam),
                        lambda: reference.gae_scan(m(rewards), m(values), mask, gamma=gamma, lam=lam), default),
        "gae_backward": ((grad_a, grad_r, mask), 2, (gamma, lam),
                         lambda: reference.gae_scan_backward(m(grad_a), m(grad_r), mask, gamma=gamma, lam=lam),
                         grad_values_floors),
        "whiten_forward": ((values, mask), 1, (True,), lambda: [reference.whiten(m(values), mask)], whiten_floors),
        "whiten_forward(shift_mean=False)": ((values, mask), 1, (False,),
                                             lambda: [reference.whiten(m(values), mask, shift_mean=False)], whiten_floors),
        "whiten_forward(unbiased=False)": ((values, mask), 1, (True, False),
                                           lambda: [reference.whiten(m(values), mask, unbiased=False)], whiten_floors),
        "ppo_advantages_forward": (ppo_inputs, 3, (0.1, estimator, gamma, lam, whiten), ppo, ppo_floors),
        "ppo_advantages_forward(kl_clamp=0.5, unbiased=False)": (
            ppo_inputs, 3, (0.1, estimator, gamma, lam, whiten, 0.5, False), lambda: ppo(0.5, False),
            lambda: ppo_floors(0.5)),
    }  # fmt: skip


def whitened_floor(x, mask):
    """(x - mean) / std rounds like x's entries divided by x's spread: a whitened output's rounding is
    measured against ||x|| / std(x), which exceeds its own size when the entries sit close together
    (two valid tokens 1% apart amplify float32 rounding 100 times)."""
    valid = x[mask]
    if valid.numel() < 2:
        return None
    return max(valid.norm().item() / max(valid.std(correction=0).item(), 1e-4), 0.01 * x.numel() ** 0.5)


def check_bt(backend, device, calls, *, scan=0):
    """Each call of ``calls`` (from bt_calls) through the provider, outputs poisoned with NaN: finite,
    0 where masked, and within the tolerance rule of the float64 reference."""
    prov = provider(backend)
    for method, (inputs, n_out, options, exact, floors) in calls.items():
        mask = inputs[-1]
        outs = [torch.full(mask.shape, math.nan, device=device) for _ in range(n_out)]
        getattr(prov, method.split("(")[0])(*(x.to(device) for x in inputs), *outs, *options)
        for i, (got, ref, floor) in enumerate(zip((o.cpu() for o in outs), exact(), floors())):
            assert torch.isfinite(got).all(), f"{method} output {i}: not finite"
            assert (got[~mask] == 0).all(), f"{method} output {i}: nonzero at a masked position"
            assert_close(got, ref, f"{method} output {i}", floor=floor, scan=scan)


def only(calls, method):
    """The calls of one provider method, under each of its option sets."""
    return {name: call for name, call in calls.items() if name.split("(")[0] == method}


@pytest.mark.parametrize("backend,device,rows,tokens,estimator", bt_params(BT_SHAPES, ESTIMATORS, slow=everywhere))
def test_kl_rewards(backend, device, rows, tokens, estimator):
    require(backend, device, torch.float32, "kl_rewards")
    check_bt(backend, device, only(bt_calls(bt_case(rows, tokens), estimator=estimator), "kl_rewards_forward"))


@pytest.mark.parametrize("backend,device,rows,tokens", bt_params(BT_SHAPES))
def test_gae(backend, device, rows, tokens):
    require(backend, device, torch.float32, "gae")
    calls = bt_calls(bt_case(rows, tokens))
    check_bt(backend, device, only(calls, "gae_forward") | only(calls, "gae_backward"))


@pytest.mark.parametrize("backend,device,rows,tokens", bt_params(BT_SHAPES, slow=everywhere))
def test_whiten(backend, device, rows, tokens):
    require(backend, device, torch.float32, "whiten")
    check_bt(backend, device, only(bt_calls(bt_case(rows, tokens)), "whiten_forward"))


# On the interpreter, long rows with k3 only: the estimator is elementwise, and test_kl_rewards runs
# every one of them at every shape.
@pytest.mark.parametrize(
    "backend,device,rows,tokens,estimator",
    bt_params(
        BT_SHAPES, ESTIMATORS,
        fast=lambda rows, tokens, estimator: (rows, tokens) in INTERPRETED_FAST and estimator == "k3",
        slow=lambda rows, tokens, estimator: rows * tokens <= INTERPRETED_SLOW and (estimator == "k3" or tokens < 2000),
    ),
)
def test_ppo_advantages(backend, device, rows, tokens, estimator):
    require(backend, device, torch.float32, "ppo_advantages")
    check_bt(backend, device, only(bt_calls(bt_case(rows, tokens), estimator=estimator), "ppo_advantages_forward"))


@pytest.mark.parametrize(
    "backend,device,rows,tokens,pattern,discounts",
    bt_params([(4, 3000)], ["right", "left", "holes", "empty"], [(1.0, 1.0), (0.0, 0.5), (0.9, 0.0)], slow=lambda *case: False),
)
def test_bt_ops_masks_and_discounts(backend, device, rows, tokens, pattern, discounts):
    require(backend, device, torch.float32, "ppo_advantages")
    gamma, lam = discounts
    check_bt(backend, device, bt_calls(bt_case(rows, tokens, pattern), gamma=gamma, lam=lam))


@pytest.mark.parametrize("backend,device,rows,tokens", bt_params([(64, 4096), (1, 32768), (3000, 7)], slow_on_cpu=True))
def test_bt_ops_at_scale(backend, device, rows, tokens):
    """Long rows (16 CUDA chunks), many rows, every op, undiscounted: the longest sums."""
    require(backend, device, torch.float32, "ppo_advantages")
    check_bt(backend, device, bt_calls(bt_case(rows, tokens), gamma=1.0, lam=1.0), scan=tokens)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize(
    "mode,group_size",
    [("grpo", 2), ("grpo", 7), ("grpo", 8), ("drgrpo", 1), ("drgrpo", 8), ("rloo", 8), ("rloo", 64), ("grpo", 1000)],
)
def test_group_advantages(backend, device, mode, group_size):
    require(backend, device, torch.float32, "group_advantages")
    scores = torch.randn(group_size * (40 if group_size <= 64 else 5)) * 2 + 100
    scores[:group_size] = 3.25  # a group of identical scores: exactly 0
    got = torch.full_like(scores, math.nan, device=device)
    provider(backend).group_advantages_forward(scores.to(device), got, group_size, mode, 1e-6)
    got = got.cpu()
    assert (got[:group_size] == 0).all()
    assert_close(got, reference.group_advantages(scores.double(), group_size, mode=mode, eps=1e-6), mode)


# ---------------------------------------------------------------------------------------------
# Providers say whether they can serve a call, and why not
# ---------------------------------------------------------------------------------------------


def test_triton_provider_explains_itself():
    pytest.importorskip("triton")
    from rlhf_fast.backends.base import Provider
    from rlhf_fast.backends.triton import TritonProvider
    from rlhf_fast.kernels import token_logprobs as kernels

    prov = TritonProvider()
    assert isinstance(prov, Provider) and prov.name == "triton" and prov.available()
    assert bool(prov.supports(torch.device("cpu"), torch.bfloat16)) == INTERPRETED
    assert not prov.supports(torch.device("cuda"), torch.float64)
    assert "float64" in prov.supports(torch.device("cuda"), torch.float64).reason
    assert prov.supports(torch.device("cuda"), torch.float16)
    assert kernels.SAVED_LSE_BOUND.value == SAVED_LSE_BOUND  # grad_bound's split of the rows


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from rlhf_fast.backends.triton import TritonProvider

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    answer = TritonProvider().supports(torch.device("cpu"), torch.float32)
    assert not answer and "TRITON_INTERPRET=1" in answer.reason


def test_cuda_provider_explains_itself():
    support = provider("cuda").available()
    if not torch.cuda.is_available():
        assert not support and ("CUDA" in support.reason or "_C" in support.reason)
