"""token_logprobs: the fused backends against PyTorch baselines, logits [N x V].

    python -m rlhf_fast.bench --ops logprobs,logprobs_entropy [--quick] [--shapes ...]

Ops "logprobs" (logp alone) and "logprobs_entropy" (return_entropy=True). Implementations:
  backend=<name>  rlhf_fast.token_logprobs(..., backend=name) for each backend that can serve the
                  device and dtype; the others are listed with the registry's reason
  eager           rlhf_fast.reference.token_logprobs: the readable spec, eager PyTorch
  compile         torch.compile of that reference (skipped, with the error, if compilation fails)
  eager-upcast    reference.token_logprobs_upcast: logits.float(), log_softmax, gather (logp only)
  trl-selective   reference.selective_log_softmax, TRL's formulation (logp only; it loops over
                  rows for bfloat16/float16)
  inplace         ours, auto backend, inplace_backward=True: forward+backward only, the gradient
                  written over the logits
  liger           Liger-Kernel's cross entropy with reduction="none", logp = -loss (logp only; CUDA,
                  when installed)
Liger and inplace write the logits' gradient into the logits, so each runs on a private copy.

Verification against the float64 reference on the same input values: logp (and entropy) on all
rows, the logits gradient on a sample of rows. Forward outputs are held to FWD_TOL (an output in
bf16/fp16 to that dtype's epsilon), the gradient to 2x PyTorch's own error when it computes the
same gradient in the logits' dtype.

Bytes an op must move (e = element size of the logits): forward N*V*e (one read of the logits);
forward+backward 3*N*V*e (forward read, backward read, gradient write): the "three-pass floor"
at copy speed is the suite's ceiling for these ops.

Labels are all valid (no ignore_index) and the temperature is 1, because eager-upcast and
trl-selective support neither; tests/test_token_logprobs.py covers both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.backends.registry import BACKENDS, can_serve

from . import harness
from .case import Case, Check, Impl, liger_problem

FAMILIES = ("logp", "logp+entropy")  # the outputs: logp alone, or (logp, entropy)
LOGP_ONLY = ("eager-upcast", "trl-selective")
# Measured in this order (eager first: every ratio needs it), so a run cut short by --deadline-s
# keeps the fused backends and the torch.compile comparison; trl-selective's row loop is slow.
_FIRST = ("triton", "cuda")
IMPLS = (
    ("eager",)
    + tuple(f"backend={name}" for name in _FIRST if name in BACKENDS)
    + ("compile",)
    + tuple(f"backend={name}" for name in BACKENDS if name not in _FIRST)
    + LOGP_ONLY
)

FWD_TOL = 2e-5
VERIFY_ROWS = 256  # rows whose logits gradient is checked: the first, the last, and a spread between
CHUNK_ELEMENTS = 2**24  # the float64 reference runs in row chunks of this many elements (128 MiB each)


# --------------------------------------------------------------------------- implementations


def _reference_logp(logits, labels):
    return reference.token_logprobs(logits, labels)


def _reference_logp_entropy(logits, labels):
    return reference.token_logprobs(logits, labels, return_entropy=True)


def impl_names(family: str) -> list[str]:
    return [impl for impl in IMPLS if family == "logp" or impl not in LOGP_ONLY]


def unavailable(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``impl`` cannot run on (device, dtype), or None. Baselines run everywhere."""
    if impl.startswith("backend="):
        support = can_serve(impl.removeprefix("backend="), device, dtype)
        return None if support else support.reason
    return None


def implementation(impl: str, family: str):
    """(logits [N, V], labels [N]) -> logp [N], or (logp, entropy) for the logp+entropy family."""
    entropy = family == "logp+entropy"
    if impl.startswith("backend="):
        backend = impl.removeprefix("backend=")
        return functools.partial(rlhf_fast.token_logprobs, return_entropy=entropy, backend=backend)
    if impl == "eager":
        return _reference_logp_entropy if entropy else _reference_logp
    if impl == "compile":
        return torch.compile(_reference_logp_entropy if entropy else _reference_logp, dynamic=False)
    if entropy:
        raise ValueError(f"{impl} computes no entropy")
    if impl == "eager-upcast":
        return reference.token_logprobs_upcast
    if impl == "trl-selective":
        return reference.selective_log_softmax
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def _liger_logp():
    from liger_kernel.transformers.functional import liger_cross_entropy

    def logp(logits, labels):
        out = liger_cross_entropy(logits, labels, reduction="none")
        loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        return -loss

    return logp


# --------------------------------------------------------------------------- inputs and steps


@dataclass
class Inputs:
    xs: list[torch.Tensor]  # copies of the logits [N, V] with identical values, leaves requiring grad
    labels: torch.Tensor  # [N] int64, all in [0, V)
    g_logp: torch.Tensor  # [N] float32 upstream gradient of logp
    g_entropy: torch.Tensor  # [N] float32 upstream gradient of the entropy


def make_inputs(n: int, vocab: int, dtype: torch.dtype, device: torch.device, copies: int = 1, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen, dtype=dtype, device=device).mul_(2.0)  # LM-like logit spread
    xs = [x] + [x.clone() for _ in range(copies - 1)]
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    g_logp = torch.randn(n, generator=gen, device=device)
    g_entropy = torch.randn(n, generator=gen, device=device)
    return Inputs([t.requires_grad_() for t in xs], labels, g_logp, g_entropy)


class Step:
    """One measured call on copy ``i % copies``: the forward under no_grad, or forward + backward.

    The backward receives g_logp (and g_entropy), cast once to each output's dtype; the logits'
    gradient is dropped before each run so that backward writes it fresh instead of accumulating.
    """

    def __init__(self, fn, inputs: Inputs, mode: str):
        self.fn, self.inputs, self.mode = fn, inputs, mode
        self._grads: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _grad(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        if (k, dtype) not in self._grads:
            self._grads[k, dtype] = (self.inputs.g_logp, self.inputs.g_entropy)[k].to(dtype)
        return self._grads[k, dtype]

    def __call__(self, i: int):
        x = self.inputs.xs[i % len(self.inputs.xs)]  # a private copy may hold fewer copies
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(x, self.inputs.labels)
        x.grad = None
        out = self.fn(x, self.inputs.labels)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [self._grad(k, o.dtype) for k, o in enumerate(outs)])
        return None

    def clear(self) -> None:
        for x in self.inputs.xs:
            x.grad = None


def memory_step(impl: str, family: str, mode: str, n: int, vocab: int, dtype: str, device: str = "cpu"):
    """A step built from plain values, for a fresh process measuring peak memory (tests/test_token_logprobs.py)."""
    inputs = make_inputs(n, vocab, getattr(torch, dtype), torch.device(device))
    return Step(implementation(impl, family), inputs, mode)


# --------------------------------------------------------------------------- verification


@dataclass
class Expected:
    """The float64 reference on the benchmark's own input values."""

    logp: torch.Tensor  # [N] float64
    entropy: torch.Tensor  # [N] float64
    rows: torch.Tensor  # [R] rows whose gradient is checked
    grads: dict[str, torch.Tensor]  # family -> [R, V] float64 d(loss)/d(logits) on those rows
    torch_grad_err: dict[str, float]  # family -> rel err of PyTorch's gradient in the logits' dtype


def verification_rows(n: int, device: torch.device) -> torch.Tensor:
    if n <= VERIFY_ROWS:
        return torch.arange(n, device=device)
    ends = VERIFY_ROWS // 4
    middle = torch.linspace(ends, n - ends - 1, VERIFY_ROWS - 2 * ends).long()
    return torch.cat([torch.arange(ends), middle, torch.arange(n - ends, n)]).to(device)


def _loss(outs, g_logp, g_entropy):
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = (outs[0] * g_logp.to(outs[0].dtype)).sum()
    if len(outs) > 1:
        loss = loss + (outs[1] * g_entropy.to(outs[1].dtype)).sum()
    return loss


def expected_values(inputs: Inputs, families) -> Expected:
    x, labels = inputs.xs[0].detach(), inputs.labels
    n, vocab = x.shape
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    logp, entropy = [], []
    with torch.no_grad():
        for start in range(0, n, chunk):
            lp, ent = reference.token_logprobs(
                x[start : start + chunk].double(), labels[start : start + chunk], return_entropy=True
            )
            logp.append(lp)
            entropy.append(ent)
    rows = verification_rows(n, x.device)
    grads, torch_errs = {}, {}
    for family in families:
        fn = _reference_logp_entropy if family == "logp+entropy" else _reference_logp
        g_logp, g_entropy = inputs.g_logp[rows], inputs.g_entropy[rows]
        exact = x[rows].double().requires_grad_()
        _loss(fn(exact, labels[rows]), g_logp, g_entropy).backward()
        same_dtype = x[rows].clone().requires_grad_()
        _loss(fn(same_dtype, labels[rows]), g_logp, g_entropy).backward()
        grads[family] = exact.grad
        torch_errs[family] = harness.rel_err(same_dtype.grad, exact.grad)
    return Expected(torch.cat(logp), torch.cat(entropy), rows, grads, torch_errs)


def _tolerance(dtype: torch.dtype) -> float:
    """FWD_TOL for float32/float64 results; an impl that returns bf16/fp16 gets that dtype's epsilon."""
    return max(FWD_TOL, torch.finfo(dtype).eps) if dtype in (torch.bfloat16, torch.float16) else FWD_TOL


def verify(fn, inputs: Inputs, expected: Expected, family: str, with_grad: bool) -> dict:
    """Errors and tolerances of one implementation; ``problem`` says what failed (None when all passed)."""
    report: dict = {"problem": None, "grad_problem": None}
    x = inputs.xs[0]
    with torch.no_grad():
        out = fn(x, inputs.labels)
    outs = out if isinstance(out, tuple) else (out,)
    report["tol_fwd"] = _tolerance(outs[0].dtype)
    report["err_logp"] = harness.rel_err(outs[0], expected.logp)
    problems = []
    if not report["err_logp"] <= report["tol_fwd"]:
        problems.append(f"logp rel err {report['err_logp']:.3g} > {report['tol_fwd']:.3g}")
    if family == "logp+entropy":
        report["err_entropy"] = harness.rel_err(outs[1], expected.entropy)
        if not report["err_entropy"] <= report["tol_fwd"]:
            problems.append(f"entropy rel err {report['err_entropy']:.3g} > {report['tol_fwd']:.3g}")
    report["problem"] = "; ".join(problems) or None
    del out, outs
    if not with_grad:
        return report
    step = Step(fn, inputs, "fwd+bwd")
    step(0)
    grad = x.grad[expected.rows]
    step.clear()
    torch_err = expected.torch_grad_err[family]
    report["torch_grad_err"] = torch_err
    # A baseline that returns bf16/fp16 (trl-selective) is held to its output's precision instead.
    report["tol_grad"] = max(report["tol_fwd"], 2 * torch_err + 1e-6)
    report["err_grad"] = harness.rel_err(grad, expected.grads[family])
    if not report["err_grad"] <= report["tol_grad"]:
        report["grad_problem"] = f"grad rel err {report['err_grad']:.3g} > {report['tol_grad']:.3g}"
    return report


# --------------------------------------------------------------------------- the suite's cases


class LogprobsCase(Case):
    op = "logprobs"
    family = "logp"
    compile_in_quick = ("cpu", "cuda")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._private: dict[str, Inputs] = {}

    def input_bytes(self):
        return self.dims["N"] * self.dims["V"] * self.dtype.itemsize

    def implementations(self):
        impls = []
        for name in impl_names(self.family):
            build = lambda name=name: implementation(name, self.family)  # noqa: E731
            if name.startswith("backend="):
                reason = unavailable(name, self.device, self.dtype)
                impls.append(Impl(name, skip=reason, ours=True) if reason else Impl(name, make=build, ours=True))
            else:
                impls.append(Impl(name, make=build, slow=name in ("compile", "trl-selective")))
        inplace = functools.partial(rlhf_fast.token_logprobs, return_entropy=self.family != "logp", inplace_backward=True)
        impls.append(Impl("inplace", make=lambda: inplace, ours=True, modes=("fwd+bwd",)))
        if self.family == "logp":
            reason = liger_problem(self.device)
            impls.append(Impl("liger", skip=reason) if reason else Impl("liger", make=_liger_logp))
        return impls

    def make_inputs(self, copies):
        return make_inputs(self.dims["N"], self.dims["V"], self.dtype, self.device, copies)

    def oracle(self, inputs):
        return expected_values(inputs, [self.family])

    def inputs_for(self, impl, inputs):
        if impl.name not in ("liger", "inplace"):
            return inputs
        if impl.name not in self._private:
            x = inputs.xs[0].detach().clone().requires_grad_()
            self._private[impl.name] = Inputs([x], inputs.labels, inputs.g_logp, inputs.g_entropy)
        return self._private[impl.name]

    def check(self, impl, fn, inputs, expected, eager, with_grad):
        report = verify(fn, inputs, expected, self.family, with_grad)
        result = Check()
        result.add("logp", report["err_logp"], report["tol_fwd"], "fwd")
        if "err_entropy" in report:
            result.add("entropy", report["err_entropy"], report["tol_fwd"], "fwd")
        if with_grad:
            result.add("grad", report["err_grad"], report["tol_grad"], "bwd")
        return result

    def step(self, fn, inputs, mode):
        return Step(fn, inputs, mode)

    def work(self, mode):
        logits = self.dims["N"] * self.dims["V"] * self.dtype.itemsize
        return (logits if mode == "fwd" else 3 * logits), 0.0


class LogprobsEntropyCase(LogprobsCase):
    op = "logprobs_entropy"
    family = "logp+entropy"
    compile_in_quick = ("cpu",)


def _nv(n, v, *tags):
    return ({"N": n, "V": v}, tags)


VOCABS = (32000, 128256, 151936)  # Llama 2, Llama 3, Qwen 2.5
TINY = [
    _nv(32, 1000, "headline", "sweep-vocab", "sweep-tokens"),
    _nv(32, 3000, "sweep-vocab"),
    _nv(128, 1000, "sweep-tokens"),
]
CPU_QUICK = [_nv(512, 32000, "headline", "sweep-tokens")] + [_nv(128, v, "sweep-vocab") for v in VOCABS] + [
    _nv(n, 32000, "sweep-tokens") for n in (128, 1024)
]
CPU_FULL = [_nv(4096, 32000, "headline", "sweep-tokens")] + [_nv(1024, v, "sweep-vocab") for v in VOCABS] + [
    _nv(n, 32000, "sweep-tokens") for n in (256, 1024)
]
CUDA = [_nv(16384, 128256, "headline", "sweep-tokens")] + [_nv(4096, v, "sweep-vocab") for v in VOCABS] + [
    _nv(n, 128256, "sweep-tokens") for n in (1024, 4096, 32768)
]
SHAPES = {
    "logprobs": {
        "tiny": TINY,
        ("cpu", True): CPU_QUICK,
        ("cpu", False): CPU_FULL,
        ("cuda", True): CUDA,
        ("cuda", False): CUDA,
    },
    "logprobs_entropy": {
        "tiny": TINY[:1],
        ("cpu", True): CPU_QUICK[:1],
        ("cpu", False): CPU_FULL,
        ("cuda", True): CUDA[:1],
        ("cuda", False): CUDA,
    },
}
CASES = {"logprobs": LogprobsCase, "logprobs_entropy": LogprobsEntropyCase}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
