"""token_logprobs in the suite: bench_logprobs.py's implementations and oracle as suite cases.

Ops "logprobs" (logp alone) and "logprobs_entropy" (return_entropy=True), [N x V] logits.
Implementations are bench_logprobs.IMPLS (eager, each backend, torch.compile, the logits.float()
upcast, TRL's selective_log_softmax), "inplace" (ours, auto backend, inplace_backward=True:
forward+backward only, the gradient written over the logits) plus Liger-Kernel's cross entropy
with reduction="none" (logp = -loss; CUDA, when installed). Liger and inplace write the logits'
gradient into the logits, so each runs on a private copy of the inputs.
"""

from __future__ import annotations

import functools

import torch

import rlhf_fast

from . import bench_logprobs as bl
from .case import Case, Check, Impl, liger_problem


class _Rotate:
    """bench_logprobs.Step on copy i % (copies it has): a private copy may hold fewer copies."""

    def __init__(self, step: bl.Step, copies: int):
        self.inner, self.copies = step, copies

    def __call__(self, i: int):
        return self.inner(i % self.copies)

    def clear(self) -> None:
        self.inner.clear()


def _liger_logp():
    from liger_kernel.transformers.functional import liger_cross_entropy

    def logp(logits, labels):
        out = liger_cross_entropy(logits, labels, reduction="none")
        loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        return -loss

    return logp


class LogprobsCase(Case):
    op = "logprobs"
    family = "logp"
    compile_in_quick = ("cpu", "cuda")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._private: dict[str, bl.Inputs] = {}

    def input_bytes(self):
        return self.dims["N"] * self.dims["V"] * self.dtype.itemsize

    def implementations(self):
        impls = []
        for name in bl.impl_names(self.family):
            build = lambda name=name: bl.implementation(name, self.family)  # noqa: E731
            if name.startswith("backend="):
                reason = bl.unavailable(name, self.device, self.dtype)
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
        return bl.make_inputs(self.dims["N"], self.dims["V"], self.dtype, self.device, copies)

    def oracle(self, inputs):
        return bl.expected_values(inputs, [self.family])

    def inputs_for(self, impl, inputs):
        if impl.name not in ("liger", "inplace"):
            return inputs
        if impl.name not in self._private:
            x = inputs.xs[0].detach().clone().requires_grad_()
            self._private[impl.name] = bl.Inputs([x], inputs.labels, inputs.g_logp, inputs.g_entropy)
        return self._private[impl.name]

    def check(self, impl, fn, inputs, expected, eager, with_grad):
        report = bl.verify(fn, inputs, expected, self.family, with_grad)
        result = Check()
        result.add("logp", report["err_logp"], report["tol_fwd"], "fwd")
        if "err_entropy" in report:
            result.add("entropy", report["err_entropy"], report["tol_fwd"], "fwd")
        if with_grad:
            result.add("grad", report["err_grad"], report["tol_grad"], "bwd")
        return result

    def step(self, fn, inputs, mode):
        return _Rotate(bl.Step(fn, inputs, mode), len(inputs.xs))

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
