"""Direct tests of kernels/token_logprobs.py against the float64 reference.

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without a GPU), or on
CUDA when a GPU is present and the interpreter is off. Low-precision logits are compared with the
reference evaluated on the same upcast values, so the only error allowed beyond float32 rounding
is the final rounding of the gradient to the logits' dtype (one ulp of that dtype).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from rlhf_fast import reference  # noqa: E402
from rlhf_fast.backends.base import Provider  # noqa: E402
from rlhf_fast.backends.triton import TritonProvider  # noqa: E402
from rlhf_fast.kernels import token_logprobs as kernels  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter evaluates both sides of every tl.where in numpy, and the unselected side of the
# guards (-inf * 0, log 0, 0 / 0 in rows past N) warns; the selected values are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IGNORE = reference.IGNORE_INDEX
F32_EPS = torch.finfo(torch.float32).eps


def _reference(logits, labels, g_logp, g_entropy, *, dtype, temperature, ignore_index, with_entropy):
    """The reference in ``dtype`` (float64: the oracle; float32: PyTorch's own error) on CPU."""
    x = logits.detach().cpu().to(dtype).requires_grad_()
    out = reference.token_logprobs(
        x, labels.cpu(), temperature=temperature, ignore_index=ignore_index, return_entropy=with_entropy
    )
    logp, entropy = out if with_entropy else (out, None)
    loss = (logp * g_logp.to(dtype)).sum()
    if with_entropy:
        loss = loss + (entropy * g_entropy.to(dtype)).sum()
    loss.backward()
    return {
        "logp": logp.detach(),
        "entropy": None if entropy is None else entropy.detach(),
        "lse": torch.logsumexp(x.detach() / temperature, dim=-1),
        "log_p": torch.log_softmax(x.detach() / temperature, dim=-1),  # [N, V]
        "grad": x.grad,
    }


def _run(logits, labels, *, temperature=1.0, with_entropy=True, ignore_index=IGNORE, inplace=False,
         grad_stride0=False):  # fmt: skip
    """Kernel forward + backward on poisoned outputs, and the references on the same values.

    Returns (ours, ref, torch32): dicts with logp, entropy, lse, grad (entropy None without
    entropy); ref is the float64 reference, torch32 the same PyTorch code in float32.
    """
    n = labels.shape[0]
    g_logp = torch.randn(n)
    g_entropy = torch.randn(n)
    if grad_stride0:  # the upstream gradient of logp.sum(): one value, expanded with stride 0
        g_logp = g_logp[:1].expand(n)
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy)
    ref = _reference(logits, labels, g_logp, g_entropy, dtype=torch.float64, **kwargs)
    ref["g_logp"] = g_logp.double()
    ref["g_entropy"] = g_entropy.double() if with_entropy else torch.zeros(n, dtype=torch.float64)
    ref["temperature"] = temperature
    torch32 = _reference(logits, labels, g_logp, g_entropy, dtype=torch.float32, **kwargs)

    nan = float("nan")
    logp = torch.full((n,), nan, device=DEVICE)
    lse = torch.full((n,), nan, device=DEVICE)
    entropy = torch.full((n,), nan, device=DEVICE) if with_entropy else None
    kernels.token_logprobs_forward(logits, labels, logp, entropy, lse, temperature, ignore_index)

    expected_logits = logits.clone()
    if inplace:
        grad_logits = logits
    else:
        grad_logits = torch.full_like(logits, nan)
    if grad_stride0:
        g_logp_dev = g_logp[:1].to(DEVICE).expand(n)
        assert g_logp_dev.stride(0) == 0
    else:
        g_logp_dev = g_logp.to(DEVICE)
    g_entropy_dev = g_entropy.to(DEVICE) if with_entropy else None
    kernels.token_logprobs_backward(
        logits, labels, lse, entropy, g_logp_dev, g_entropy_dev, grad_logits, temperature, ignore_index
    )
    if not inplace:  # the backward must not touch the logits
        assert torch.equal(logits, expected_logits)
    ours = {"logp": logp, "entropy": entropy, "lse": lse, "grad": grad_logits}
    return ours, ref, torch32


def _grad_tolerance(ref, labels, dtype):
    """Elementwise bound on a float32 kernel's gradient error, propagated from its inputs' rounding.

    Where the backward uses the saved lse (|lse| < SAVED_LSE_BOUND), z_k = x_k / T and lse are
    float32, so log p_k = z_k - lse is off by up to about delta_k = eps * (|z_k| + |lse| + 2): no
    float32 implementation of z - lse avoids it. Rows at or above the bound recompute their max m
    and log p_k = (x_k - m) / T - log s, off by up to eps * (|z_k - z_max| + |lse - z_max| + 2):
    logits sharing an offset of 1e6 then lose nothing to it. (Rows within 1% of the bound get the
    first, larger bound: the kernel decides on its own float32 lse.)
    With dz_k = g (1[k=label] - p_k) - gH p_k (log p_k + H), a change delta in log p_k moves dz_k by
    p_k delta (|g| + |gH| (1 + |log p_k + H|)); the error of H (at most max delta) moves it by
    |gH| p_k max delta. Add 1 - p at the label (eps |g|) and the final rounding to the logits' dtype
    (one ulp, which also covers the float32 roundings of the sum).
    """
    log_p, t = ref["log_p"], ref["temperature"]
    p = log_p.exp()
    finite = p > 0
    g, g_h = ref["g_logp"][:, None].abs(), ref["g_entropy"][:, None].abs()
    h = torch.where(finite, -p * log_p, 0.0).sum(-1, keepdim=True)
    lse = ref["lse"][:, None]
    z = torch.where(finite, log_p + lse, 0.0)
    z_max = torch.where(finite, z, -torch.inf).amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    recomputed = lse.abs() >= 1.01 * kernels.SAVED_LSE_BOUND.value
    delta = F32_EPS * (torch.where(recomputed, (z - z_max).abs() + (lse - z_max).abs(), z.abs() + lse.abs()) + 2)
    delta = torch.where(finite, delta, 0.0)
    delta_row = delta.amax(dim=-1, keepdim=True)
    log_p_h = torch.where(finite, (log_p + h).abs(), 0.0)
    propagated = p * (delta * (g + g_h * (1 + log_p_h)) + g_h * delta_row)
    is_label = torch.arange(log_p.shape[-1])[None, :] == labels.cpu().long()[:, None]
    arithmetic = F32_EPS * (g + g_h) * (1 + is_label.double())
    info = torch.finfo(dtype)  # one ulp, and the spacing of float16 subnormals (2^-24)
    rounding = info.eps * (ref["grad"].abs() + info.tiny)
    return rounding + 4 * (propagated + arithmetic) / t


def _check(result, logits, labels, temperature, ignore_index=IGNORE):
    """Float32 accuracy for logp/entropy/lse; the gradient within ``_grad_tolerance``."""
    ours, ref, torch32 = result
    keep = (labels != ignore_index).cpu()
    z_max = (logits.detach().double().abs().cpu() / temperature).nan_to_num(posinf=0, neginf=0).amax()
    # float32 rounding of z (magnitude up to z_max) and of the accumulated sums
    atol = 64 * F32_EPS * (1.0 + float(z_max))
    for key in ("logp", "entropy"):
        if ref[key] is None:
            assert ours[key] is None
            continue
        got = ours[key].cpu().double()
        assert torch.isfinite(got).all(), f"{key} has non-finite values: {got}"
        assert (got[~keep] == 0).all(), f"{key} of ignored rows must be 0"
        torch.testing.assert_close(got, ref[key], rtol=1e-5, atol=atol, msg=lambda m: f"{key}: {m}")
    lse = ours["lse"].cpu().double()
    torch.testing.assert_close(lse[keep], ref["lse"][keep], rtol=1e-5, atol=atol)

    grad = ours["grad"].cpu()
    assert grad.dtype == logits.dtype
    assert torch.isfinite(grad).all(), "grad has non-finite values"
    assert (grad[~keep] == 0).all(), "grad of ignored rows must be 0"
    ref_grad = ref["grad"]
    tol = _grad_tolerance(ref, labels, logits.dtype)[keep]
    err = (grad.double() - ref_grad)[keep].abs()
    torch_err = (torch32["grad"].double() - ref_grad)[keep].abs()
    worst = (err / tol).max() if err.numel() else 0.0
    assert worst <= 1.0, (
        f"grad off by up to {float(err.max()):.3g}, {float(worst):.3g} x tolerance; "
        f"PyTorch float32 off by up to {float(torch_err.max()):.3g}, "
        f"{float((torch_err / tol).max()):.3g} x tolerance"
    )
    return float(worst), float((torch_err / tol).max()) if err.numel() else 0.0


def _inputs(n, v, dtype, *, scale=3.0, label_dtype=torch.int64):
    """Fresh random logits (the conftest seeds each test and prints the seed of a failure)."""
    logits = (torch.randn(n, v) * scale).to(dtype)
    labels = torch.randint(0, v, (n,))
    labels[1 % n] = IGNORE
    return logits.to(DEVICE), labels.to(device=DEVICE, dtype=label_dtype)


@pytest.mark.parametrize("v", [1, 17, 1000, 32003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_matches_reference(v, dtype, temperature):
    n = 37 if v <= 1000 else 5  # small vocabularies pack several rows per program: cross a boundary
    logits, labels = _inputs(n, v, dtype)
    result = _run(logits, labels, temperature=temperature)
    _check(result, logits, labels, temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama3_vocab(dtype):
    logits, labels = _inputs(2, 128256, dtype)
    labels[1] = 5  # both rows kept
    result = _run(logits, labels)
    _check(result, logits, labels, 1.0)


@pytest.mark.parametrize("v", [17, 1000, 32003])
def test_without_entropy(v):
    logits, labels = _inputs(6, v, torch.float32)
    result = _run(logits, labels, temperature=0.7, with_entropy=False)
    _check(result, logits, labels, 0.7)


@pytest.mark.parametrize("v", [17, 32003])
def test_all_rows_ignored(v):
    logits, labels = _inputs(5, v, torch.bfloat16)
    labels.fill_(IGNORE)
    ours, _, _ = _run(logits, labels)
    assert (ours["logp"] == 0).all() and (ours["entropy"] == 0).all()
    assert (ours["grad"] == 0).all()


@pytest.mark.parametrize("v", [17, 32003])
def test_ignored_rows_zero_whatever_lse(v):
    """Ignored rows get a zero gradient even when their saved lse is meaningless."""
    logits, labels = _inputs(4, v, torch.float32)
    labels[2] = IGNORE
    lse = torch.logsumexp(logits.double(), dim=-1).float()
    lse[1], lse[2] = -1e30, float("nan")
    grad = torch.full_like(logits, float("nan"))
    g = torch.ones(4, device=DEVICE)
    kernels.token_logprobs_backward(logits, labels, lse, lse, g, g, grad, 1.0, IGNORE)
    assert (grad[1:3] == 0).all()
    assert torch.isfinite(grad).all()


def test_other_ignore_index():
    logits, labels = _inputs(9, 300, torch.float32)
    labels[labels == IGNORE] = 0
    labels[3] = -1
    result = _run(logits, labels, ignore_index=-1)
    _check(result, logits, labels, 1.0, ignore_index=-1)


@pytest.mark.parametrize("v", [17, 1000, 32003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_logits(v, dtype):
    """-inf away from the label: whole leading chunks of -inf, scattered -inf, a lone finite label."""
    n = 6
    logits, labels = _inputs(n, v, dtype)
    labels = labels.cpu()
    logits = logits.cpu()
    inf = float("-inf")
    logits[0, : (v * 3) // 4] = inf  # row 0: the first chunk(s) are all -inf
    labels[0] = v - 1
    logits[2, :] = inf  # row 2: only the label is finite
    labels[2] = v // 2
    logits[2, v // 2] = 0.5
    scatter = torch.rand(n, v) < 0.3
    scatter[torch.arange(n), labels.clamp(min=0)] = False
    logits[3:][scatter[3:]] = inf  # rows 3..: 30% of entries at -inf
    logits, labels = logits.to(DEVICE), labels.to(DEVICE)
    result = _run(logits, labels, temperature=1.3)
    _check(result, logits, labels, 1.3)


@pytest.mark.parametrize("v", [17, 1000, 32003])
def test_large_logits(v):
    """Logits of scale 1e4: the online max must keep exp() in range."""
    logits, labels = _inputs(4, v, torch.float32, scale=1e4)
    result = _run(logits, labels, temperature=0.7)
    _check(result, logits, labels, 0.7)


@pytest.mark.parametrize("v", [17, 1000, 5000])
@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset(v, offset, temperature):
    """Every other row shares a large offset (a tile of small rows mixes both kinds). Their saved
    float32 lse is off by up to half an ulp (0.03 at 1e6); the backward recomputes such rows, so
    their gradient meets the offset-free bound of _grad_tolerance, as logp and entropy do."""
    logits, labels = _inputs(8, v, torch.float32)
    logits += offset * (torch.arange(8, device=DEVICE) % 2).unsqueeze(-1)
    for with_entropy in (True, False):
        result = _run(logits, labels, temperature=temperature, with_entropy=with_entropy)
        _check(result, logits, labels, temperature)


@pytest.mark.parametrize("v", [17, 1000, 32003])
def test_row_strided_int32_labels(v):
    """Rows of a wider buffer (stride(0) > V), int32 labels, a strided grad_logits."""
    buf = (torch.randn(7, v + 13) * 2).to(torch.bfloat16).to(DEVICE)
    logits = buf[:, 5 : 5 + v]
    labels = torch.randint(0, v, (7,), dtype=torch.int32)
    labels[4] = IGNORE
    labels = labels.to(DEVICE)
    assert logits.stride(0) == v + 13
    result = _run(logits, labels, temperature=1.3)
    _check(result, logits, labels, 1.3)


@pytest.mark.parametrize("v", [17, 32003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(v, dtype):
    logits, labels = _inputs(5, v, dtype)
    original = logits.clone()
    result = _run(logits, labels, temperature=0.7, inplace=True)
    assert result[0]["grad"].data_ptr() == logits.data_ptr()
    _check(result, original, labels, 0.7)


def test_expanded_upstream_gradient():
    """logp.sum() hands back a stride-0 gradient; the kernel must read it with that stride."""
    logits, labels = _inputs(6, 1000, torch.float32)
    result = _run(logits, labels, grad_stride0=True)
    _check(result, logits, labels, 1.0)


def test_provider():
    provider = TritonProvider()
    assert isinstance(provider, Provider) and provider.name == "triton"
    assert provider.available()
    cpu = torch.device("cpu")
    assert bool(provider.supports(cpu, torch.bfloat16)) == INTERPRET
    assert not provider.supports(torch.device("cuda"), torch.float64)
    assert "float64" in provider.supports(torch.device("cuda"), torch.float64).reason
    assert provider.supports(torch.device("cuda"), torch.float16)

    logits, labels = _inputs(4, 50, torch.float32)
    logp = torch.full((4,), float("nan"), device=DEVICE)
    lse = torch.full((4,), float("nan"), device=DEVICE)
    provider.token_logprobs_forward(logits, labels, logp, None, lse, 1.0, IGNORE)
    ref = reference.token_logprobs(logits.double().cpu(), labels.cpu())
    torch.testing.assert_close(logp.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_provider_cpu_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    answer = TritonProvider().supports(torch.device("cpu"), torch.float32)
    assert not answer and "TRITON_INTERPRET=1" in answer.reason
