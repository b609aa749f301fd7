"""linear_token_logprobs and linear_sft_loss vs the float64 reference on hidden @ weight.T + bias."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.ops.linear_chunks import WeightGradAccumulator, chunk_rows

from numerics import rel_err, require

# (H, V, N): H in {64, 123, 4096 (few tokens)}, V in {1000, 32003}.
SHAPES = [(64, 1000, 21), (123, 1000, 21), (64, 32003, 21), (123, 32003, 13), (4096, 1000, 6)]
CHUNKS = (1, 2, 3)  # chunk counts: one, two, odd
F64_TOL = 1e-10


def chunk_size_for(n_rows: int, n_chunks: int) -> int:
    size = math.ceil(n_rows / n_chunks)
    assert math.ceil(n_rows / size) == n_chunks
    return size


def make_case(hidden_size, vocab, n_rows, dtype, *, with_bias=True, ignore_frac=0.2, leading=None):
    """hidden [N, H] (or ``leading`` + [H]), weight [V, H] (scaled to logits of spread ~2), bias [V], labels."""
    shape = leading if leading is not None else (n_rows,)
    hidden = torch.randn(*shape, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * (2.0 / hidden_size**0.5)
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = -100

    def cast(t):
        return t.to(dtype).requires_grad_() if t is not None else None

    return cast(hidden), cast(weight), cast(bias), labels


def leaves(*tensors):
    return [t for t in tensors if t is not None]


def reference_values(hidden, weight, bias, labels, g_logp, g_entropy, *, temperature=1.0, ignore_index=-100):
    """float64 logp, entropy and gradients of hidden, weight, bias on the same input values."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logp, entropy = reference.linear_token_logprobs(
        h, w, labels, bias=b, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    ((logp * g_logp.double()).sum() + (entropy * g_entropy.double()).sum()).backward()
    return logp.detach(), entropy.detach(), [t.grad for t in leaves(h, w, b)]


def fused_values(hidden, weight, bias, labels, g_logp, g_entropy, **kw):
    logp, entropy = rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **kw)
    ((logp * g_logp.to(logp.dtype)).sum() + (entropy * g_entropy.to(logp.dtype)).sum()).backward()
    return logp.detach(), entropy.detach(), [t.grad for t in leaves(hidden, weight, bias)]


def assert_close(got, want, tol):
    names = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")
    flat_got, flat_want = list(got[:2]) + got[2], list(want[:2]) + want[2]
    for name, a, b in zip(names, flat_got, flat_want):
        assert a is not None and torch.isfinite(a).all(), name
        err = rel_err(a, b)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:.3g}"


def _float64_cases():
    """The host backend (the CPU path) on every shape and chunk count, the bias on for 1 and 3 chunks
    and off for 2; the torch backend on the small-vocabulary shapes."""
    for backend, shapes in (("host", SHAPES), ("torch", SHAPES[:2])):
        for shape in shapes:
            for n_chunks in CHUNKS:
                with_bias = n_chunks != 2
                case_id = "{}-H{}-V{}-N{}".format(backend, *shape) + f"-{n_chunks}chunks-{'bias' if with_bias else 'nobias'}"
                yield pytest.param(backend, shape, n_chunks, with_bias, id=case_id)


@pytest.mark.parametrize("backend,shape,n_chunks,with_bias", _float64_cases())
def test_matches_reference_float64(backend, shape, n_chunks, with_bias):
    require(backend, "cpu", torch.float64)
    hidden_size, vocab, n_rows = shape
    hidden, weight, bias, labels = make_case(hidden_size, vocab, n_rows, torch.float64, with_bias=with_bias)
    g_logp, g_entropy = torch.randn(n_rows, dtype=torch.float64), torch.randn(n_rows, dtype=torch.float64)
    kw = dict(temperature=0.7, backend=backend, chunk_size=chunk_size_for(n_rows, n_chunks))
    got = fused_values(hidden, weight, bias, labels, g_logp, g_entropy, **kw)
    want = reference_values(hidden, weight, bias, labels, g_logp, g_entropy, temperature=0.7)
    assert got[0].dtype == torch.float64
    assert_close(got, want, F64_TOL)
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


# The interpreter evaluates both sides of every tl.where: the unselected side warns (0 * inf).
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n_chunks", [1, 3])
@pytest.mark.parametrize("shape", [(64, 1000, 21), (123, 1000, 13)], ids=lambda s: "H{}-V{}-N{}".format(*s))
def test_triton_float32(shape, n_chunks):
    """The Triton kernels (interpreted on CPU) on float32 chunks; float32 matmuls, so f32 tolerance."""
    require("triton", "cpu", torch.float32)
    hidden_size, vocab, n_rows = shape
    hidden, weight, bias, labels = make_case(hidden_size, vocab, n_rows, torch.float32)
    g_logp, g_entropy = torch.randn(n_rows), torch.randn(n_rows)
    got = fused_values(hidden, weight, bias, labels, g_logp, g_entropy, backend="triton",
                       chunk_size=chunk_size_for(n_rows, n_chunks), temperature=1.3)  # fmt: skip
    want = reference_values(hidden, weight, bias, labels, g_logp, g_entropy, temperature=1.3)
    assert_close(got, want, 2e-5)


def test_logp_only_leading_dims_and_custom_ignore_index():
    """[B, T, H] hidden, no entropy, an ignore_index that is a valid token id (3)."""
    hidden, weight, bias, labels = make_case(64, 257, 0, torch.float64, leading=(3, 7), ignore_frac=0.0)
    labels[0, :4] = 3
    g = torch.randn(3, 7, dtype=torch.float64)
    logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=3, chunk_size=4)
    assert logp.shape == (3, 7) and (logp[labels == 3] == 0).all()
    (logp * g).sum().backward()
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    want = reference.linear_token_logprobs(h, w, labels, bias=b, ignore_index=3)
    (want * g).sum().backward()
    assert rel_err(logp, want) < F64_TOL
    for got_t, want_t in ((hidden, h), (weight, w), (bias, b)):
        assert rel_err(got_t.grad, want_t.grad) < F64_TOL


def test_single_token_and_empty():
    hidden, weight, bias, labels = make_case(16, 50, 0, torch.float64, leading=(), ignore_frac=0.0)
    logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias)
    assert logp.shape == () and rel_err(logp, reference.linear_token_logprobs(hidden, weight, labels, bias=bias)) < F64_TOL
    hidden, weight, bias, labels = make_case(16, 50, 0, torch.float64, leading=(0,))
    logp, entropy = rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == (0,) and (weight.grad == 0).all() and (bias.grad == 0).all() and hidden.grad.shape == (0, 16)
    loss = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias)
    assert loss.item() == 0


def test_tied_weights():
    """The head is the input embedding: its gradient sums the lookup's and the head's."""
    vocab, hidden_size = 300, 32
    embedding = (torch.randn(vocab, hidden_size, dtype=torch.float64) * 0.3).requires_grad_()
    mix = torch.randn(hidden_size, hidden_size, dtype=torch.float64) / hidden_size**0.5
    tokens = torch.randint(0, vocab, (2, 9))
    labels = torch.randint(0, vocab, (2, 9))
    g_logp, g_entropy = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)

    def run(fn, **kw):
        embedding.grad = None
        hidden = torch.tanh(embedding[tokens] @ mix)
        logp, entropy = fn(hidden, embedding, labels, return_entropy=True, **kw)
        ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
        return embedding.grad.clone()

    got = run(rlhf_fast.linear_token_logprobs, chunk_size=5)
    want = run(reference.linear_token_logprobs)
    assert rel_err(got, want) < F64_TOL


def test_frozen_head_and_no_grad(monkeypatch):
    """A frozen head gets no gradient and no [V, H] sum is even allocated for it."""
    import rlhf_fast.ops.linear_chunks as chunks

    def no_weight_sum(*args):
        raise AssertionError("a weight-gradient sum allocated for a frozen head")

    hidden, weight, bias, labels = make_case(32, 100, 10, torch.float64)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    g = torch.randn(10, dtype=torch.float64)
    monkeypatch.setattr(chunks, "WeightGradAccumulator", no_weight_sum)
    (rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=3) * g).sum().backward()
    rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias, chunk_size=3).backward()
    monkeypatch.undo()
    hidden.grad = None
    (rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=3) * g).sum().backward()
    assert weight.grad is None and bias.grad is None
    h = hidden.detach().clone().requires_grad_()
    (reference.linear_token_logprobs(h, weight, labels, bias=bias) * g).sum().backward()
    assert rel_err(hidden.grad, h.grad) < F64_TOL
    with torch.no_grad():
        logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias)
        loss = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias)
    assert not logp.requires_grad and not loss.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_eager_error(dtype):
    """Half-precision inputs: our error vs the float64 reference is within 2x eager PyTorch's own
    (same input values, eager computing in that dtype), gradients included."""
    require("host", "cpu", dtype)
    hidden, weight, bias, labels = make_case(96, 1000, 64, dtype)
    g_logp, g_entropy = torch.randn(64), torch.randn(64)
    got = fused_values(hidden, weight, bias, labels, g_logp, g_entropy, chunk_size=24, backend="host")
    want = reference_values(hidden, weight, bias, labels, g_logp, g_entropy)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    eager = eager_values(h, w, b, labels, g_logp, g_entropy)
    names = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")
    for name, a, e, r in zip(names, list(got[:2]) + got[2], list(eager[:2]) + eager[2], list(want[:2]) + want[2]):
        budget = 2 * rel_err(e, r) + 1e-6
        print(f"{name}: ours {rel_err(a, r):.3g}, eager {dtype} {rel_err(e, r):.3g}")
        assert rel_err(a, r) <= budget, f"{name}: {rel_err(a, r):.3g} > {budget:.3g}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_the_head_in_autocast_dtype(hidden_dtype, device):
    """Under autocast (float32 weights, hidden float32 or already bf16) the head runs in bf16 as
    F.linear would: error within the bf16 budget (1e-2, or 2x eager autocast's where that is
    larger) vs the float64 reference on the same values, and each gradient in its input's own
    dtype (the weight's float32, not bf16-rounded). Eager is F.linear + log_softmax under the same
    autocast (its log_softmax runs in float32 on CUDA, in bf16 on CPU)."""
    if device == "cpu":
        require("host", "cpu", torch.bfloat16)
    cases = make_case(96, 1000, 64, torch.float32)
    hidden, weight, bias = (t.detach().to(device).requires_grad_() for t in cases[:3])
    labels = cases[3].to(device)
    hidden = hidden.detach().to(hidden_dtype).requires_grad_()
    g_logp, g_entropy = torch.randn(64, device=device), torch.randn(64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = fused_values(hidden, weight, bias, labels, g_logp, g_entropy, chunk_size=24)
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        eager = eager_values(h, w, b, labels, g_logp, g_entropy)
    want = reference_values(hidden, weight, bias, labels, g_logp, g_entropy)
    assert [t.dtype for t in got[2]] == [hidden_dtype, torch.float32, torch.float32]
    assert got[0].dtype == torch.float32
    names = ("logp", "entropy", "grad hidden", "grad weight", "grad bias")
    for name, a, e, r in zip(names, list(got[:2]) + got[2], list(eager[:2]) + eager[2], list(want[:2]) + want[2]):
        budget = max(2 * rel_err(e, r), 1e-2)
        assert rel_err(a, r) <= budget, f"{name}: {rel_err(a, r):.3g} > {budget:.3g}"
    assert rel_err(got[0], want[0]) > 1e-6, "the head did not run in bf16"


def test_autocast_losses_match_their_eager_autocast():
    """linear_sft_loss and fused_linear_policy_loss under autocast: the value within 2x the error of
    eager autocast (F.linear's bf16 logits, then the loss) against the float64 reference, gradients
    in the inputs' dtypes. (Policy ratios up to ~100 turn the logits' bf16 rounding into a few %.)"""
    require("host", "cpu", torch.bfloat16)
    hidden, weight, bias, labels = make_case(64, 1000, 48, torch.float32)
    mask, labels_bt = labels.view(6, 8) != -100, labels.view(6, 8)
    old, advantages = torch.randn(6, 8) - 7, torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sft = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias)
        policy, _ = rlhf_fast.fused_linear_policy_loss(
            hidden.view(6, 8, -1), weight, labels_bt, old, advantages, mask, bias=bias
        )
        eager_logits = torch.nn.functional.linear(hidden, weight, bias).detach()
    (sft + policy).backward()
    h, w, b = (t.detach().double() for t in (hidden, weight, bias))

    def losses(logits):
        policy_inputs = (labels_bt, old.double(), advantages.double(), mask)
        return reference.sft_loss(logits, labels), reference.fused_policy_loss(logits.view(6, 8, -1), *policy_inputs)[0]

    want, eager = losses(reference.linear_logits(h, w, b)), losses(eager_logits.double())
    for got, want_t, eager_t in zip((sft, policy), want, eager):
        err, eager_err = abs(got.item() - want_t.item()), abs(eager_t.item() - want_t.item())
        assert got.dtype == torch.float32 and err <= 2 * eager_err + 1e-5 * abs(want_t.item()), (err, eager_err)
    assert [t.grad.dtype for t in (hidden, weight, bias)] == [torch.float32] * 3


def eager_values(hidden, weight, bias, labels, g_logp, g_entropy):
    """Eager PyTorch in the inputs' dtype: F.linear's logits (under autocast: its dtype, the bias
    added before the one rounding) and log_softmax in that dtype."""
    log_p = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias), dim=-1)
    keep = labels != -100
    logp = log_p.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(log_p.exp() * log_p).sum(-1) * keep
    ((logp.float() * g_logp).sum() + (entropy.float() * g_entropy).sum()).backward()
    return logp.detach(), entropy.detach(), [hidden.grad, weight.grad, bias.grad]


@pytest.mark.parametrize("backend", ["torch", "host"])
@pytest.mark.parametrize("n_chunks", CHUNKS)
def test_sft_loss_matches_reference(backend, n_chunks):
    require(backend, "cpu", torch.float64)
    hidden, weight, bias, labels = make_case(48, 1000, 0, torch.float64, leading=(3, 5))
    loss = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias, backend=backend,
                                     chunk_size=chunk_size_for(15, n_chunks))  # fmt: skip
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    want = reference.linear_sft_loss(h, w, labels, bias=b)
    assert loss.dtype == torch.float64 and abs(loss.item() - want.item()) < 1e-12
    # A non-unit upstream gradient, and two backwards of one graph.
    (0.37 * loss).backward(retain_graph=True)
    (0.37 * loss).backward()
    (0.74 * want).backward()
    for got_t, want_t in ((hidden, h), (weight, w), (bias, b)):
        assert rel_err(got_t.grad, want_t.grad) < F64_TOL


@pytest.mark.parametrize("backend", ["torch", "host"])
def test_ignored_rows_are_skipped_with_zero_results(backend):
    """Every label ignored, and one kept row among ignored ones: logp, entropy and every gradient
    of the skipped rows are exactly 0, the kept row matches the reference."""
    require(backend, "cpu", torch.float64)
    hidden, weight, bias, labels = make_case(16, 40, 6, torch.float64, ignore_frac=1.0)
    logp, entropy = rlhf_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert (logp == 0).all() and (entropy == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (bias.grad == 0).all()
    for t in (hidden, weight, bias):
        t.grad = None
    labels[3] = 7
    g = torch.randn(6, dtype=torch.float64)
    got = fused_values(hidden, weight, bias, labels, g, g.flip(0), backend=backend, chunk_size=1)
    want = reference_values(hidden, weight, bias, labels, g, g.flip(0))
    assert_close(got, want, F64_TOL)
    assert (got[2][0][[0, 1, 2, 4, 5]] == 0).all()


def test_sft_loss_all_ignored():
    hidden, weight, bias, labels = make_case(16, 40, 6, torch.float64, ignore_frac=1.0)
    loss = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias)
    loss.backward()
    assert loss.item() == 0 and (hidden.grad == 0).all() and (weight.grad == 0).all() and (bias.grad == 0).all()


@pytest.mark.parametrize("vocab", [7, 8, 1, 9001])  # 9001: halves of more than UPCAST_ROWS rows
def test_weight_grad_accumulator_narrows_in_place(vocab):
    """A 2-byte weight's gradient: float32 sum over chunks, one rounding at the end, exact-size storage."""
    hidden_size, chunks = 24, 40
    acc = WeightGradAccumulator(vocab, hidden_size, torch.bfloat16, torch.device("cpu"), torch.float32)
    total = torch.zeros(vocab, hidden_size)
    for _ in range(chunks):
        g = torch.randn(5, vocab).to(torch.bfloat16)
        h = torch.randn(5, hidden_size).to(torch.bfloat16)
        acc.add(g, h)
        total += g.float().t() @ h.float()
    out = acc.result()
    assert out.dtype == torch.bfloat16 and out.shape == (vocab, hidden_size) and out.is_contiguous()
    # Equal to the float32 sum rounded once (the additions may round differently: within one f32 ulp).
    assert torch.equal(out, total.to(torch.bfloat16)) or rel_err(out, total) < 2 * 2**-9
    assert out.untyped_storage().nbytes() <= 2 * vocab * hidden_size + 2 * hidden_size


@pytest.mark.parametrize("backend", ["torch", "host"])
def test_weight_grad_summed_in_the_weights_dtype(backend):
    """accum_dtype=None: a bf16 weight's gradient is summed in bf16, one rounding per chunk (no
    float32 [V, H] buffer): within a few bf16 roundings per chunk of the float32 sum, and the same
    values as the default everywhere else; hidden's gradient and the loss do not depend on it."""
    require(backend, "cpu", torch.bfloat16)
    hidden, weight, bias, labels = make_case(32, 300, 40, torch.bfloat16)
    results = {}
    for accum in (torch.float32, None):
        for t in (hidden, weight, bias):
            t.grad = None
        loss = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias, backend=backend, chunk_size=8,
                                         accum_dtype=accum)  # fmt: skip
        loss.backward()
        results[accum] = (loss.detach(), hidden.grad, weight.grad)
    (loss32, gh32, gw32), (loss16, gh16, gw16) = results[torch.float32], results[None]
    assert gw16.dtype == torch.bfloat16 and gw16.shape == weight.shape
    assert torch.equal(loss32, loss16) and torch.equal(gh32, gh16)
    chunks = math.ceil(int((labels != -100).sum()) / 8)
    assert 0 < rel_err(gw16, gw32) < 2 * chunks * 2**-8


def test_accum_dtype_choices():
    """float32 (default), None (the weight's dtype) or the weight's dtype itself; nothing else.
    A float32 weight's sum is float32 either way, a float64 weight's float64."""
    from rlhf_fast.ops.linear_logprobs import weight_grad_sum_dtype

    bf16, f32, f64 = (torch.empty(2, 2, dtype=d) for d in (torch.bfloat16, torch.float32, torch.float64))
    assert weight_grad_sum_dtype(torch.float32, bf16) == torch.float32
    assert weight_grad_sum_dtype(None, bf16) == weight_grad_sum_dtype(torch.bfloat16, bf16) == torch.bfloat16
    assert weight_grad_sum_dtype(None, f32) == weight_grad_sum_dtype(torch.float32, f32) == torch.float32
    assert weight_grad_sum_dtype(torch.float32, f64) == weight_grad_sum_dtype(None, f64) == torch.float64
    kwargs = _bad()
    for bad in (torch.float16, torch.int32, "float32"):
        with pytest.raises(ValueError, match=r"accum_dtype must be torch.float32 .* or None .*torch.float32\); got"):
            rlhf_fast.linear_sft_loss(kwargs["hidden"], kwargs["weight"], kwargs["labels"], accum_dtype=bad)


def test_unit_upstream_gradient_hands_over_the_saved_gradients():
    """loss.backward() takes the gradients computed in the forward without a [V, H] copy; a retained
    graph's second backward still sees them intact (autograd copies when they are still saved)."""
    hidden, weight, bias, labels = make_case(16, 50, 9, torch.float64)
    loss = rlhf_fast.linear_sft_loss(hidden, weight, labels, bias=bias)
    grad_w, = torch.autograd.grad(loss, weight, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(weight.grad, 2 * grad_w) and weight.grad.data_ptr() != grad_w.data_ptr()
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    reference.linear_sft_loss(h, w, labels, bias=b).backward()
    assert rel_err(grad_w, w.grad) < F64_TOL and rel_err(hidden.grad, 2 * h.grad) < F64_TOL


def test_chunk_rows():
    assert chunk_rows(4100, 512) == 832  # 5 balanced chunks, not 4 x 1024 + 4
    assert chunk_rows(16384, 4096) == 1024
    assert chunk_rows(16384, 8192) == 2048
    assert chunk_rows(16384, 4096, accum_bytes=2) == 512  # a bf16 sum: half the traffic per chunk
    assert chunk_rows(16384, 8192, accum_bytes=2) == 1024
    assert chunk_rows(100, 64) == 100 and chunk_rows(0, 64) == 1
    assert chunk_rows(100, 64, requested=7) == 7 and chunk_rows(5, 64, requested=7) == 5


def _bad(**overrides):
    hidden, weight, bias, labels = make_case(8, 20, 4, torch.float32)
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        (lambda: _bad(weight=torch.randn(20, 9)), ValueError, r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 8"),
        (lambda: _bad(bias=torch.randn(21)), ValueError, r"bias must have shape \(20,\)"),
        (lambda: _bad(weight=torch.randn(20, 8, 1)), ValueError, "weight must be 2-D"),
        (lambda: _bad(weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "weight must have hidden's dtype"),
        (lambda: _bad(bias=torch.randn(20, dtype=torch.float64)), TypeError, "bias must have dtype"),
        (lambda: _bad(labels=torch.full((4,), 20)), ValueError, r"labels must be in \[0, 20\)"),
        (lambda: _bad(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
        (lambda: _bad(weight=torch.randn(0, 8)), ValueError, "non-empty vocabulary"),
        (lambda: _bad(hidden=torch.zeros(4, 8, dtype=torch.long)), TypeError, "hidden must have dtype"),
    ],
)
def test_bad_inputs(args, error, pattern):
    kwargs = args()
    hidden, weight, labels = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels")
    with pytest.raises(error, match=pattern):
        rlhf_fast.linear_token_logprobs(hidden, weight, labels, **kwargs)
    with pytest.raises(error, match=pattern):
        rlhf_fast.linear_sft_loss(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    kwargs = _bad()
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
        rlhf_fast.linear_token_logprobs(kwargs["hidden"], kwargs["weight"], kwargs["labels"], chunk_size=chunk_size)


def test_module():
    hidden, weight, bias, labels = make_case(16, 30, 5, torch.float64)
    module = rlhf_fast.nn.LinearTokenLogProbs(temperature=0.5, return_entropy=True, chunk_size=2)
    logp, entropy = module(hidden, weight, labels, bias)
    want = reference.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.5, return_entropy=True)
    assert rel_err(logp, want[0]) < F64_TOL and rel_err(entropy, want[1]) < F64_TOL
    assert "chunk_size=2" in repr(module)
    loss = rlhf_fast.nn.LinearSFTLoss(chunk_size=2)(hidden, weight, labels, bias)
    assert abs(loss.item() - reference.linear_sft_loss(hidden, weight, labels, bias=bias).item()) < 1e-12


# --------------------------------------------------------------------------- peak memory (CPU)

_PEAK_PROBE = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    import torch
    import rlhf_fast
    from rlhf_fast import reference

    def status(field):
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])

    impl, n, hidden_size, vocab = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(1)

    def inputs(rows):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(rows, hidden_size, generator=gen).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_()
        return hidden, weight, torch.randint(0, vocab, (rows,), generator=gen), torch.randn(rows, generator=gen)

    def step(hidden, weight, labels, g):
        if impl == "eager":
            logp = reference.token_logprobs(hidden @ weight.T, labels)
        else:
            logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels)
        (logp * g).sum().backward()

    step(*inputs(64))  # lazy imports, thread pools, allocator arenas: not the op's footprint
    args = inputs(n)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    step(*args)
    print((status("VmHWM") - before) / 1024)
    """
)


def peak_mib(impl: str, n: int, hidden_size: int, vocab: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, "-c", _PEAK_PROBE, impl, str(n), str(hidden_size), str(vocab)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc/self/clear_refs")
def test_peak_memory_cpu():
    """N = 4096, H = 512, V = 32000 float32, forward + backward: measured peak RSS growth of the
    fused op under 1/5 of eager PyTorch's (token_logprobs of hidden @ weight.T), each in a fresh process."""
    start = time.perf_counter()
    probes = {impl: peak_mib(impl, 4096, 512, 32000) for impl in ("eager", "fused")}
    peaks = {}
    for impl, probe in probes.items():
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, f"{impl} probe failed:\n{err[-2000:]}"
        peaks[impl] = float(out.strip().splitlines()[-1])
    print(f"peak RSS growth: eager {peaks['eager']:.0f} MiB, fused {peaks['fused']:.0f} MiB "
          f"({peaks['fused'] / peaks['eager']:.3f}x) in {time.perf_counter() - start:.1f} s")  # fmt: skip
    assert peaks["fused"] < peaks["eager"] / 5


# --------------------------------------------------------------------------- GPU


def _timed_peak(fn, clear, reps=3):
    """(median ms, peak MiB beyond the inputs) of fn() on the current CUDA device, after a warm-up."""
    fn()
    clear()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.gpu
def test_llama3_shape_bf16_gpu():
    """bf16 N = 16384, H = 4096, V = 128256, forward + backward, against eager PyTorch (logits in bf16)
    and a float32 oracle: our error at most 2x eager's. Prints time and peak memory of both."""
    n, hidden_size, vocab = 16384, 4096, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, hidden_size, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) / 32).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    g_logp = torch.randn(n, device="cuda", generator=gen)

    def clear():
        hidden.grad = weight.grad = None

    def run(fn):
        logp = fn(hidden, weight, labels)
        (logp * g_logp).sum().backward()
        return logp.detach()

    def eager(h, w, y):
        return reference.token_logprobs(h @ w.T, y)

    def fused_bf16_sum(h, w, y):
        return rlhf_fast.linear_token_logprobs(h, w, y, accum_dtype=None)

    results = {}
    for name, fn in (("fused", rlhf_fast.linear_token_logprobs), ("fused-bf16acc", fused_bf16_sum), ("eager", eager)):
        ms, peak = _timed_peak(lambda: run(fn), clear)
        clear()
        logp = run(fn)
        results[name] = (ms, peak, logp, hidden.grad, weight.grad)
        clear()
        torch.cuda.empty_cache()
    # float32 oracle on the same bf16 values, in row chunks (the weight's gradient accumulates).
    h32, w32 = hidden.detach().float(), weight.detach().float().requires_grad_()
    logp32, gh32 = torch.empty(n, device="cuda"), torch.empty_like(h32)
    for start in range(0, n, 2048):
        rows = slice(start, start + 2048)
        h = h32[rows].clone().requires_grad_()
        logp = reference.token_logprobs(h @ w32.T, labels[rows])
        (logp * g_logp[rows]).sum().backward()
        logp32[rows], gh32[rows] = logp.detach(), h.grad
    fused, eager_r = results["fused"], results["eager"]
    for k, name, want in ((2, "logp", logp32), (3, "grad hidden", gh32), (4, "grad weight", w32.grad)):
        ours, theirs = rel_err(fused[k], want), rel_err(eager_r[k], want)
        print(f"{name}: fused rel err {ours:.3g}, eager bf16 {theirs:.3g}")
        assert ours <= 2 * theirs + 1e-6, name
    print(f"fwd+bwd: fused {fused[0]:.1f} ms, {fused[1]:.0f} MiB peak; eager {eager_r[0]:.1f} ms, {eager_r[1]:.0f} MiB peak "
          f"(memory {fused[1] / eager_r[1]:.3f}x, time {fused[0] / eager_r[0]:.2f}x)")  # fmt: skip
    assert fused[1] < eager_r[1] / 5
    # accum_dtype=None: the same logp and hidden gradient; the weight gradient summed in bf16 over
    # 32 chunks (bf16 tolerance), and a peak at least 3/4 of the float32 sum's extra 2 V H bytes lower.
    low = results["fused-bf16acc"]
    for k, name, want in ((2, "logp", logp32), (3, "grad hidden", gh32), (4, "grad weight", w32.grad)):
        ours, theirs = rel_err(low[k], want), rel_err(eager_r[k], want)
        print(f"{name}: fused-bf16acc rel err {ours:.3g}, eager bf16 {theirs:.3g}")
        assert ours <= (1e-2 if name == "grad weight" else 2 * theirs + 1e-6), name
    saved_mib = (fused[1] - low[1])
    print(f"fwd+bwd: fused-bf16acc {low[0]:.1f} ms, {low[1]:.0f} MiB peak ({saved_mib:.0f} MiB below the float32 sum)")
    assert saved_mib > 0.75 * 2 * vocab * hidden_size / 2**20
