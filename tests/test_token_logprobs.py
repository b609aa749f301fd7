"""token_logprobs and sft_loss on every available backend vs the float64 reference."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import rlhf_fast
from rlhf_fast import _validate as check
from rlhf_fast import reference
from rlhf_fast.ops.token_logprobs import _forward_op

from numerics import assert_close, backend_params, poison, random_mask, rel_err, require, truncates



def random_case(shape, vocab, dtype, device, *, scale=3.0, ignore_frac=0.2, label_dtype=torch.int64):
    logits = (torch.randn(*shape, vocab, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, vocab, shape, dtype=label_dtype)
    labels[torch.rand(shape) < ignore_frac] = -100
    return logits, labels.to(device)


def reference_grads(logits, labels, g_logp, g_ent, temperature):
    """Values and logits gradient of the float64 reference on the same input values."""
    x = logits.detach().double().requires_grad_(True)
    logp, ent = reference.token_logprobs(x, labels, temperature=temperature, return_entropy=True)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def fused_grads(logits, labels, g_logp, g_ent, temperature, backend, **kw):
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = rlhf_fast.token_logprobs(
        x, labels, temperature=temperature, return_entropy=True, backend=backend, **kw
    )
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def check_against_reference(logits, labels, temperature, backend):
    """Values and gradient against the float64 reference by the tolerance rule (numerics.assert_close),
    which prints PyTorch's own error where the gradient is stored in low precision."""
    g_logp = torch.randn(labels.shape, device=logits.device)
    g_ent = torch.randn(labels.shape, device=logits.device)
    ref = reference_grads(logits, labels, g_logp, g_ent, temperature)
    got = fused_grads(logits, labels, g_logp, g_ent, temperature, backend)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert got[0].dtype == out_dtype and got[1].dtype == out_dtype
    assert got[2].dtype == logits.dtype and got[2].shape == logits.shape
    for name, a, b in zip(("logp", "entropy"), got[:2], ref[:2]):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, name)
    # A row's gradient has norm ~ its upstream gradient (exactly 0 at V = 1): compare against sqrt(N).
    floor = max(labels.numel(), 1) ** 0.5
    assert_close(got[2], ref[2], "grad", floor=floor, truncated=truncates(backend, logits.device, logits.dtype))
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 17, 1000, 32003])
def test_matches_reference(backend, device, dtype, vocab):
    require(backend, device, dtype)
    rows = 48 if vocab < 32003 else 6
    logits, labels = random_case((rows,), vocab, dtype, device)
    check_against_reference(logits, labels, 0.7 if vocab % 2 else 1.3, backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_vocab_few_rows(backend, device, dtype):
    require(backend, device, dtype)
    logits, labels = random_case((2,), 128256, dtype, device, ignore_frac=0.0)
    check_against_reference(logits, labels, 1.0, backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_leading_dims_and_layouts(backend, device):
    require(backend, device, torch.float32)
    vocab = 257
    for shape in [(), (5,), (3, 4), (2, 3, 2)]:
        logits, labels = random_case(shape, vocab, torch.float32, device)
        check_against_reference(logits, labels, 1.0, backend)
    wide, labels = random_case((6, 5), vocab + 31, torch.float32, device)
    labels = labels.clamp(max=vocab - 1)
    labels[0, 0] = -100
    check_against_reference(wide[..., :vocab], labels, 1.0, backend)  # row stride > V
    check_against_reference(wide[::2, :, :vocab], labels[::2], 1.0, backend)  # strided batch
    check_against_reference(wide[..., :vocab].transpose(0, 1), labels.t(), 1.0, backend)  # copied
    check_against_reference(wide[:, 0, :vocab], labels[:, 0].to(torch.int32), 1.0, backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_extreme_logits(backend, device):
    require(backend, device, torch.float32)
    logits, labels = random_case((64,), 1000, torch.float32, device, ignore_frac=0.1)
    far = torch.rand(logits.shape, device=device) < 0.3
    far[torch.arange(64), labels.clamp(min=0)] = False
    far[:4, :] = True  # whole rows of -inf but the label
    far[torch.arange(4), labels[:4].clamp(min=0)] = False
    check_against_reference(logits.masked_fill(far, -math.inf), labels, 0.7, backend)
    # lse ~ 1e4 is stored in float32 (ulp ~ 1e-3), too coarse for p = e^(z - lse): the backward
    # recomputes such rows' max and sum, and holds the float32 tolerance.
    check_against_reference(logits * 1e4, labels, 1.0, backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("vocab", [17, 5000])
@pytest.mark.parametrize("offset", [40.0, 1e4, 1e6])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset(backend, device, vocab, offset, temperature):
    """Every other row shares a large offset (so that a tile of rows mixes both kinds): logp,
    entropy and gradient to float32 accuracy, as without the offset. The float32 lse of such a
    row is off by up to half an ulp (0.03 at 1e6), which the backward must not pass on to p."""
    require(backend, device, torch.float32)
    logits, labels = random_case((32,), vocab, torch.float32, device, ignore_frac=0.1)
    shift = offset * (torch.arange(32, device=device) % 2).unsqueeze(-1)
    check_against_reference(logits + shift, labels, temperature, backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("vocab", [17, 200, 5000])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_ignored_rows_may_hold_anything(backend, device, vocab, return_entropy):
    """NaN, inf and -inf in ignored rows reach no output and no gradient: kept rows come out bitwise
    as with clean ignored rows, ignored rows get logp = entropy = 0 and a gradient of exactly 0."""
    require(backend, device, torch.float32)
    rows = 24
    logits, labels = random_case((rows,), vocab, torch.float32, device, ignore_frac=0.0)
    labels[::3] = -100
    ignored = labels == -100
    junk = poison(logits, torch.rand(logits.shape, device=device) < 0.5)  # NaN, inf, -inf scattered
    junk[0], junk[3], junk[6] = math.nan, math.inf, -math.inf  # and whole rows of each
    poisoned = torch.where(ignored.unsqueeze(-1), junk, logits)
    g_logp = torch.randn(rows, device=device)
    g_ent = torch.randn(rows, device=device)

    def run(x):
        x = x.clone().requires_grad_(True)
        out = rlhf_fast.token_logprobs(x, labels, return_entropy=return_entropy, backend=backend)
        logp, ent = out if return_entropy else (out, torch.zeros_like(out))
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp.detach(), ent.detach(), x.grad

    clean, dirty = run(logits), run(poisoned)
    for name, want, got in zip(("logp", "entropy", "grad"), clean, dirty):
        assert torch.equal(got[~ignored], want[~ignored]), f"{name} of kept rows changed"
        assert (got[ignored] == 0).all() and not got[ignored].isnan().any(), f"{name} of ignored rows"


@pytest.mark.parametrize("backend,device", backend_params())
def test_masked_positions_of_fused_policy_loss(backend, device):
    """fused_policy_loss turns masked positions into ignored rows: whatever logits they hold, their
    gradient is 0 and the other positions' gradient is that of clean logits."""
    require(backend, device, torch.float32)
    rows, tokens, vocab = 4, 9, 40
    mask = random_mask(rows, tokens, "mixed", device)
    logits = torch.randn(rows, tokens, vocab, device=device) * 2
    labels = torch.randint(0, vocab, (rows, tokens), device=device)
    old_logp = reference.token_logprobs(logits, labels) + 0.1 * torch.randn(rows, tokens, device=device)
    advantages = torch.randn(rows, tokens, device=device)
    poisoned = torch.where(mask.unsqueeze(-1), logits, poison(logits, torch.zeros_like(logits, dtype=torch.bool)))

    def grad(x):
        x = x.clone().requires_grad_(True)
        loss, _ = rlhf_fast.fused_policy_loss(x, labels, old_logp, advantages, mask, entropy_coef=0.01, backend=backend)
        loss.backward()
        return x.grad

    clean, dirty = grad(logits), grad(poisoned)
    assert (dirty[~mask] == 0).all() and not dirty.isnan().any()
    assert torch.equal(dirty[mask], clean[mask])


@pytest.mark.parametrize("backend,device", backend_params())
def test_all_ignored_and_empty(backend, device):
    require(backend, device, torch.float32)
    logits, labels = random_case((7,), 100, torch.float32, device)
    labels.fill_(-100)
    check_against_reference(logits, labels, 1.0, backend)
    loss = rlhf_fast.sft_loss(logits.requires_grad_(True), labels, backend=backend)
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()
    empty = torch.randn(0, 4, 11, device=device, requires_grad=True)
    logp = rlhf_fast.token_logprobs(empty, torch.zeros(0, 4, dtype=torch.long, device=device), backend=backend)
    logp.sum().backward()
    assert logp.shape == (0, 4) and empty.grad.shape == empty.shape


@pytest.mark.parametrize("backend,device", backend_params())
def test_caller_tensors_unchanged_and_inplace_opt_in(backend, device):
    require(backend, device, torch.float32)
    logits, labels = random_case((9,), 300, torch.float32, device)
    logits_before, labels_before = logits.clone(), labels.clone()
    g = torch.randn(9, device=device)
    x = logits.clone().requires_grad_(True)
    (rlhf_fast.token_logprobs(x, labels, backend=backend) * g).sum().backward()
    assert torch.equal(x.detach(), logits_before) and torch.equal(labels, labels_before)
    expected_grad = x.grad.clone()

    work = logits.clone()
    leaf = work.requires_grad_(True)
    view = leaf * 1.0  # a non-leaf the backward may overwrite
    (rlhf_fast.token_logprobs(view, labels, inplace_backward=True, backend=backend) * g).sum().backward()
    assert torch.allclose(leaf.grad, expected_grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(view.detach(), expected_grad, rtol=1e-6, atol=1e-7), "in-place backward did not write logits"


@pytest.mark.parametrize("backend", ["torch", "host"])
def test_gradcheck_float64(backend):
    require(backend, "cpu", torch.float64)
    logits = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (5,))
    labels[1] = -100

    def both(x):
        return rlhf_fast.token_logprobs(x, labels, temperature=0.8, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(both, (logits,))


@pytest.mark.parametrize("backend", ["torch", "host"])
def test_opcheck(backend):
    require(backend, "cpu", torch.float32)
    logits = torch.randn(6, 19, requires_grad=True)
    labels = torch.randint(0, 19, (6,))
    for with_entropy in (False, True):
        torch.library.opcheck(_forward_op, (logits, labels, 0.9, -100, with_entropy, False, backend))


def test_compile_fullgraph():
    def loss_fn(logits, labels):
        logp, ent = rlhf_fast.token_logprobs(logits, labels, return_entropy=True)
        return -(logp.sum() + 0.01 * ent.sum()) + rlhf_fast.sft_loss(logits, labels)

    logits = torch.randn(4, 8, 37, requires_grad=True)
    labels = torch.randint(0, 37, (4, 8))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(logits, labels)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    loss_fn(logits, labels).backward()
    assert torch.allclose(loss, loss_fn(logits, labels)) and torch.allclose(grad, logits.grad)


_PEAK_CHILD = """
import sys
from rlhf_fast.bench import harness
from rlhf_fast.bench.bench_logprobs import memory_step
impl, family, mode, n, vocab = sys.argv[1:]
print(harness.rss_peak_mb(memory_step(impl, family, mode, int(n), int(vocab), "float32")))
"""


def _peak_mb(impl: str, family: str, mode: str, n: int, vocab: int) -> float:
    """Peak RSS growth (MiB) of one bench_logprobs step beyond its inputs, in a fresh process."""
    args = [sys.executable, "-c", _PEAK_CHILD, impl, family, mode, str(n), str(vocab)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout.strip()
    try:
        return float(out)
    except ValueError:
        pytest.skip(f"cannot measure peak RSS here: {out}")


@pytest.mark.slow
@pytest.mark.parametrize("n,vocab", [(128, 32000), (1024, 32000)])
def test_torch_backend_peak_memory_within_eager(n, vocab):
    """The torch backend (the fallback where the extension is not built) needs no more memory than
    eager log_softmax + gather (rlhf_fast.reference), forward or forward + backward, with or
    without entropy. [128 x 32000] fits in one of its row slices, [1024 x 32000] takes eight.
    Measured at float32 [4096 x 32000] (500 MiB of logits), MiB beyond the inputs: fwd+bwd logp
    eager 1500, torch 516 (3000 before it worked in row slices); with entropy 2625 and 544 (4000)."""
    for mode in ("fwd", "fwd+bwd"):
        for family in ("logp", "logp+entropy"):
            eager = _peak_mb("eager", family, mode, n, vocab)
            ours = _peak_mb("backend=torch", family, mode, n, vocab)
            print(f"{mode} {family}: eager {eager:.1f} MiB, torch backend {ours:.1f} MiB")
            assert ours <= eager, f"{mode} {family}: torch backend peaks at {ours:.1f} MiB, eager at {eager:.1f}"


def test_sft_loss_matches_reference():
    logits, labels = random_case((3, 10), 50, torch.float32, "cpu")
    x = logits.clone().requires_grad_(True)
    y = logits.double().requires_grad_(True)
    got = rlhf_fast.sft_loss(x, labels, temperature=1.1)
    want = reference.sft_loss(y, labels, temperature=1.1)
    got.backward(), want.backward()
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    assert rel_err(x.grad, y.grad) < 2e-5


def test_module():
    module = rlhf_fast.nn.TokenLogProbs(temperature=0.5, return_entropy=True)
    logits, labels = random_case((4,), 30, torch.float32, "cpu")
    logp, ent = module(logits, labels)
    ref_logp, ref_ent = reference.token_logprobs(logits, labels, temperature=0.5, return_entropy=True)
    assert rel_err(logp, ref_logp) < 2e-5 and rel_err(ent, ref_ent) < 2e-5
    assert "temperature=0.5" in repr(module)


def test_backend_context_and_env(monkeypatch):
    logits, labels = random_case((4,), 30, torch.float32, "cpu")
    with rlhf_fast.use_backend("torch"):
        assert rlhf_fast.backends.default_backend() == "torch"
        rlhf_fast.token_logprobs(logits, labels)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND"):
        rlhf_fast.token_logprobs(logits, labels)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "torch")
    assert rlhf_fast.backends.default_backend() == "torch"


def test_explicit_backend_that_cannot_serve_says_why():
    logits, labels = random_case((4,), 30, torch.float32, "cpu")
    with pytest.raises(rlhf_fast.BackendUnavailable, match="cuda"):
        rlhf_fast.token_logprobs(logits, labels, backend="cuda")


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda x, y: (x, y[:, :-1]), ValueError, r"labels must have shape \(3, 4\)"),
        (lambda x, y: (x, y.float()), TypeError, "labels must have dtype"),
        (lambda x, y: (x, torch.full_like(y, 11)), ValueError, r"labels must be in \[0, 11\).*got 11"),
        (lambda x, y: (x, torch.full_like(y, -1)), ValueError, "got -1"),
        (lambda x, y: (x.long(), y), TypeError, "logits must have dtype"),
        (lambda x, y: (x[..., :0], y), ValueError, "non-empty vocabulary"),
        (lambda x, y: (x.to("meta"), y), ValueError, "same device as logits"),
    ],
)
def test_bad_inputs(make, error, pattern):
    logits, labels = torch.randn(3, 4, 11), torch.randint(0, 11, (3, 4))
    x, y = make(logits, labels)
    with pytest.raises(error, match=pattern):
        rlhf_fast.token_logprobs(x, y)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be"):
        rlhf_fast.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


@pytest.mark.parametrize("temperature", [1e-38, 1e-20, 0.99e-4])
def test_temperature_below_the_bound(temperature):
    """A temperature that would overflow logits / temperature is refused, naming value and bound
    (1e-38 used to pass and give NaN at logits of 4)."""
    labels, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    ops = [
        lambda: rlhf_fast.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature),
        lambda: rlhf_fast.fused_policy_loss(torch.randn(2, 3, 5), labels, torch.randn(2, 3), torch.randn(2), mask,
                                            temperature=temperature),
        lambda: rlhf_fast.linear_token_logprobs(hidden, weight, labels, temperature=temperature),
        lambda: rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, torch.randn(2, 3), torch.randn(2), mask,
                                                   temperature=temperature),
    ]  # fmt: skip
    for op in ops:
        with pytest.raises(ValueError, match=rf"temperature must be >= 0\.0001 .*got {temperature:g}$"):
            op()


@pytest.mark.parametrize("backend,device", backend_params())
def test_smallest_temperature(backend, device):
    require(backend, device, torch.float32)
    logits, labels = random_case((16,), 300, torch.float32, device)
    check_against_reference(logits, labels, check.MIN_TEMPERATURE, backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        rlhf_fast.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_64bit_offsets_gpu(backend):
    """N x V > 2^31 elements: offsets must be 64-bit (bf16, ~4.3 GB of logits)."""
    require(backend, "cuda", torch.bfloat16)
    vocab, rows = 128256, 16800  # 2.15e9 elements
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    tail = slice(rows - 8, rows)
    logp = rlhf_fast.token_logprobs(logits, labels, backend=backend)
    want = reference.token_logprobs(logits[tail].double(), labels[tail])
    assert rel_err(logp[tail], want) < 2e-5
    x = logits.requires_grad_(True)
    (rlhf_fast.token_logprobs(x, labels, backend=backend, inplace_backward=True)[tail].sum()).backward()
    ref_x = logits[tail].detach().double().requires_grad_(True)
    reference.token_logprobs(ref_x, labels[tail]).sum().backward()
    assert rel_err(x.grad[tail].float(), ref_x.grad) < 1e-2
