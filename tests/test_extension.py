"""rlhf_fast._C: its kernels (host, and CUDA where a GPU is) against the float64 reference, the
build report, and the CUDA kernels' register budget (nvcc + ptxas, no GPU needed).

Values and gradients are compared with rlhf_fast.reference.token_logprobs run in float64 on the
CPU on the same (upcast) input values, the gradient by autograd with random upstream gradients
for logp and entropy. Every output is poisoned with NaN before the kernel runs. Tolerances:
  float32 / float64: 1e-5 / 1e-12 relative (norm-wise, tests/numerics.rel_err).
  bfloat16 / float16 logits: the same for logp and entropy (float32 outputs); the gradient is
      stored in the logits' dtype, so its budget adds 1.5x the error of rounding the exact
      gradient to that dtype (PyTorch's own error in that precision).
  logits of scale 1e4, or sharing an offset of 1e4 or 1e6: the same float32 bounds. Their saved
      lse, a float32 good to 2^-24 of itself, would give every p = exp(x / T - lse) of the row that
      relative error; the backward recomputes such rows' max and sum instead (kSavedLseBound).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference

from numerics import PROVIDERS, load_build_script, provider_on, rel_err

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}
ON = [pytest.param("host", id="host"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(n, vocab, dtype, *, scale=3.0, ignore_frac=0.25, label_dtype=torch.int64, row_pad=0):
    """CPU logits [n, vocab] (a view with row stride vocab + row_pad when row_pad > 0) and labels."""
    full = (torch.randn(n, vocab + row_pad, dtype=torch.float64) * scale).to(dtype)
    logits = full[:, :vocab]
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_frac] = IGNORE
    return logits, labels.to(label_dtype)


def to_device(logits: torch.Tensor, device: str) -> torch.Tensor:
    """The same values and row stride on ``device``."""
    if device == "cpu":
        return logits
    n, vocab = logits.shape
    full = torch.empty(n, max(logits.stride(0), vocab), dtype=logits.dtype, device=device)
    full[:, :vocab].copy_(logits)
    return full[:, :vocab]


def reference_outputs(logits, labels, temperature, g_logp, g_entropy):
    x = logits.detach().cpu().double().requires_grad_(True)
    logp, entropy = reference.token_logprobs(
        x, labels.cpu(), temperature=temperature, ignore_index=IGNORE, return_entropy=True
    )
    ((logp * g_logp.double()).sum() + (entropy * g_entropy.double()).sum()).backward()
    lse = torch.logsumexp(x.detach() / temperature, dim=-1)
    return logp.detach(), entropy.detach(), lse, x.grad


def run(prov, device, logits, labels, temperature, g_logp, g_entropy, *, with_entropy=True, inplace=False,
        grad_pad=0):
    """Forward and backward through ``prov`` on ``device``; outputs back on the CPU."""
    n, vocab = logits.shape
    odt = out_dtype(logits.dtype)
    x, labels = to_device(logits, device), labels.to(device)
    logp, entropy, lse = (torch.full((n,), math.nan, dtype=odt, device=device) for _ in range(3))
    prov.token_logprobs_forward(x, labels, logp, entropy if with_entropy else None, lse, temperature, IGNORE)
    if inplace:
        grad = x.clone()  # the kernel's logits *and* its output
        x = grad
    else:
        grad = torch.full((n, vocab + grad_pad), math.nan, dtype=logits.dtype, device=device)[:, :vocab]
    prov.token_logprobs_backward(
        x, labels, lse, entropy if with_entropy else None, g_logp.to(device),
        g_entropy.to(device) if with_entropy else None, grad, temperature, IGNORE,
    )
    return logp.cpu(), entropy.cpu(), lse.cpu(), grad.cpu()


def grad_err(grad, ref_grad, g_logp, g_entropy, temperature):
    """||grad - ref|| relative to ||ref||, or to the upstream gradients' size ||(|g| + |g_H|) / T|| when
    larger: a row's gradient is a difference of terms that size (with V = 1 it is exactly 0), so
    float32 rounding is measured against it."""
    upstream = ((g_logp.abs() + g_entropy.abs()).double() / temperature).norm().item()
    return (grad.double() - ref_grad).norm().item() / max(ref_grad.norm().item(), upstream)


def check(name, logits, labels, temperature, *, with_entropy=True, inplace=False, grad_pad=0, grad_tol=0.0):
    """Forward and backward of one provider vs the float64 reference; grad_tol adds to the budget."""
    prov, device = provider_on(name, logits.dtype)
    n = logits.shape[0]
    odt = out_dtype(logits.dtype)
    g_logp = torch.randn(n, dtype=odt)
    g_entropy = torch.randn(n, dtype=odt) if with_entropy else torch.zeros(n, dtype=odt)
    ref_logp, ref_entropy, ref_lse, ref_grad = reference_outputs(logits, labels, temperature, g_logp, g_entropy)
    logp, entropy, lse, grad = run(prov, device, logits, labels, temperature, g_logp, g_entropy,
                                   with_entropy=with_entropy, inplace=inplace, grad_pad=grad_pad)
    tol = TOL[logits.dtype]
    keep = labels != IGNORE
    assert logp.dtype == odt and grad.dtype == logits.dtype
    assert not logp.isnan().any() and not lse.isnan().any() and not grad.isnan().any()
    assert rel_err(logp, ref_logp) <= tol, f"logp rel err {rel_err(logp, ref_logp):.3g}"
    assert rel_err(lse[keep], ref_lse[keep]) <= tol, f"lse rel err {rel_err(lse[keep], ref_lse[keep]):.3g}"
    if with_entropy:
        assert not entropy.isnan().any()
        assert rel_err(entropy, ref_entropy) <= tol, f"entropy rel err {rel_err(entropy, ref_entropy):.3g}"
        assert (entropy[~keep] == 0).all()
    assert (logp[~keep] == 0).all() and (grad[~keep] == 0).all()
    rounding = grad_err(ref_grad.to(logits.dtype), ref_grad, g_logp, g_entropy, temperature)
    budget = (1.5 * rounding if logits.dtype in (torch.bfloat16, torch.float16) else 0.0) + tol + grad_tol
    err = grad_err(grad, ref_grad, g_logp, g_entropy, temperature)
    assert err <= budget, f"grad rel err {err:.3g} > {budget:.3g}"
    return logp, entropy, grad


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 17, 1000, 4096, 4097, 32003])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_matches_reference(name, dtype, vocab, temperature):
    logits, labels = make_case(12, vocab, dtype)
    check(name, logits, labels, temperature)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocab(name, dtype):
    logits, labels = make_case(2, 128256, dtype, ignore_frac=0.0)
    check(name, logits, labels, 1.3)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_entropy(name, dtype):
    logits, labels = make_case(9, 777, dtype)
    check(name, logits, labels, 0.9, with_entropy=False)


@pytest.mark.parametrize("name", ON)
def test_all_rows_ignored(name):
    prov, device = provider_on(name, torch.float32)
    logits, labels = make_case(5, 300, torch.float32)
    labels.fill_(IGNORE)
    logits[0] = math.nan  # an ignored row is never read
    logp, entropy, lse, grad = run(prov, device, logits, labels, 1.0, torch.randn(5), torch.randn(5))
    assert (logp == 0).all() and (entropy == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 5000])
def test_minus_inf_logits(name, dtype, vocab):
    """-inf away from the label: p = 0 there, zero gradient, no NaN (0 * -inf, -inf - -inf)."""
    logits, labels = make_case(16, vocab, dtype, ignore_frac=0.1)
    masked = torch.rand(logits.shape) < 0.3
    masked[:, : vocab // 2] |= torch.arange(16).unsqueeze(1) == 5  # a row whose first half is -inf
    masked[torch.arange(16), labels.clamp(min=0)] = False
    logits[masked] = -math.inf
    logits[3] = -math.inf  # everything but the label
    logits[3, labels[3].clamp(min=0)] = 1.0
    _, _, grad = check(name, logits, labels, 0.8)
    assert (grad[masked] == 0).all()


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_of_scale_1e4(name, dtype, temperature):
    logits, labels = make_case(16, 1000, dtype, scale=1e4, ignore_frac=0.1)
    logp, entropy, _ = check(name, logits, labels, temperature)
    assert (logp <= 0).all() and (entropy >= 0).all()


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("vocab", [1000, 5000])
@pytest.mark.parametrize("offset", [40.0, 1e4, 1e6])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_large_common_offset(name, vocab, offset, temperature, with_entropy):
    """Every other row shares a large offset: values and gradient within the float32 bounds, as
    without it (40 stays below kSavedLseBound, where the saved lse is used; 1e4 and 1e6 are above)."""
    logits, labels = make_case(16, vocab, torch.float32, ignore_frac=0.1)
    logits += offset * (torch.arange(16) % 2).unsqueeze(-1)
    check(name, logits, labels, temperature, with_entropy=with_entropy)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1001, 9001])
def test_row_strided_logits_and_grad(name, dtype, vocab):
    """Row strides that are not multiples of 16 bytes, different for logits and grad."""
    logits, labels = make_case(11, vocab, dtype, row_pad=13)
    assert logits.stride(0) == vocab + 13
    check(name, logits, labels, 1.1, grad_pad=5)
    check(name, logits, labels, 1.1, grad_pad=13)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int32_labels(name, dtype):
    logits, labels = make_case(10, 513, dtype, label_dtype=torch.int32)
    check(name, logits, labels, 0.7)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 4099])
def test_inplace_backward(name, dtype, vocab):
    logits, labels = make_case(8, vocab, dtype)
    check(name, logits, labels, 1.3, inplace=True)


@pytest.mark.gpu
def test_cuda_many_rows():
    """More rows than the capped grid (64 blocks per SM): the kernels' grid-stride loops."""
    prov, device = provider_on("cuda", torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for vocab, rows in ((300, 8 * 64 * sms + 77), (5000, 64 * sms + 33)):
        logits, labels = make_case(rows, vocab, torch.bfloat16)
        g = torch.randn(rows)
        cpu = run(*provider_on("host", torch.bfloat16), logits, labels, 1.0, g, g)
        gpu = run(prov, device, logits, labels, 1.0, g, g)
        for a, b in zip(cpu[:3], gpu[:3]):
            assert rel_err(b, a) < 1e-5
        assert rel_err(gpu[3], cpu[3]) < 1e-2


def test_cuda_provider_explains_itself():
    support = PROVIDERS["cuda"][0].available()
    if not torch.cuda.is_available():
        assert not support and ("CUDA" in support.reason or "_C" in support.reason)


def test_thread_count_does_not_change_results():
    provider_on("host", torch.bfloat16)
    from rlhf_fast.backends.extension import dtype_code, extension

    logits, labels = make_case(64, 3001, torch.bfloat16)
    outputs = []
    for threads in (1, 2, 3):
        logp, entropy, lse = (torch.full((64,), math.nan) for _ in range(3))
        p = extension().TokenLogprobsForwardParams(
            logits=logits.data_ptr(), labels=labels.data_ptr(), logp=logp.data_ptr(), entropy=entropy.data_ptr(),
            lse=lse.data_ptr(), n_rows=64, vocab=3001, logits_row_stride=logits.stride(0),
            dtype=dtype_code(logits.dtype), labels_dtype=dtype_code(labels.dtype), temperature=1.0,
            ignore_index=IGNORE,
        )
        extension().host.token_logprobs_forward(p, num_threads=threads)
        outputs.append(torch.stack([logp, entropy, lse]))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_build_info():
    provider_on("host", torch.float32)
    from rlhf_fast.backends.extension import extension

    info = extension().build_info()
    assert set(info) >= {"version", "cuda_built", "cuda_version", "cuda_archs", "host_compiler", "reason_no_cuda"}
    assert isinstance(info["version"], str) and info["version"]
    assert isinstance(info["host_compiler"], str) and info["host_compiler"]
    if info["cuda_built"]:
        assert info["reason_no_cuda"] is None and info["cuda_version"]
        assert info["cuda_archs"] and all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
        assert hasattr(extension(), "cuda") and hasattr(extension().cuda, "token_logprobs_forward")
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == [] and info["reason_no_cuda"]
        assert not hasattr(extension(), "cuda")
    assert extension().DTYPE_CODES == {
        "float32": 0, "bfloat16": 1, "float16": 2, "float64": 3, "int32": 4, "int64": 5,
    }


def test_ptxas_parser():
    build = load_build_script()
    report = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers
"""
    kernels = build.parse_ptxas_report(report)
    assert [(k.name, k.arch, k.registers, k.spill_stores, k.spill_loads) for k in kernels] == [
        ("_Z3fooPf", "sm_90", 255, 8, 4), ("_Z3barPf", "sm_90", 32, 0, 0)
    ]
    assert [k.name for k in build.spill_problems(kernels)] == ["_Z3fooPf"]
    assert build.gencode_flags(["80", "90"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]"
    ]
    assert build.cuda_archs("9.0;80") == ["80", "90"]


NVCC = shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_kernels_do_not_spill():
    build = load_build_script()
    include = ROOT / "csrc" / "include"

    def compile_arch(arch: str) -> str:
        cmd = [NVCC, *build.NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{include}",
               "--cubin", "-o", "/dev/null"]
        reports = []
        for source in build.CUDA_SOURCES:
            done = subprocess.run(cmd + [str(ROOT / source)], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            reports.append(done.stdout + done.stderr)
        return "\n".join(reports)

    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(compile_arch, ["80", "90"]))
    for arch, report in zip(["sm_80", "sm_90"], reports):
        kernels = build.parse_ptxas_report(report)
        assert len(kernels) >= 2 and {k.arch for k in kernels} == {arch}
        assert not build.spill_problems(kernels), build.format_ptxas_table(build.spill_problems(kernels))
