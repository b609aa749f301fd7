"""What the suite measures: one op at one shape and dtype (a ``Case``) and its implementations.

A case builds its inputs, lists its implementations (ours, the PyTorch baselines, peers such as
Liger-Kernel or Cut Cross-Entropy, each with the reason when it cannot run here), computes the
oracle, checks an implementation against it, builds the measured step and counts the work of one
call (bytes it must move, FLOPs it must do). ``bench/suite.py``, the one driver, runs every case
the same way.

Family modules define the cases and nothing else: ``bench_logprobs.py`` (token log-probs, with
and without entropy), ``bench_policy_loss.py``, ``bench_fused_linear.py`` (the lm_head-fused
ops), ``bench_advantages.py``, ``bench_pairwise.py``. ``TensorCase`` below serves the ops whose
inputs are a few small tensors (the oracle is then the eager implementation run in float64 on
the same values). The end-to-end RL step (``bench_rl_step.py``) is no case: the driver's
``--rl-step`` mode runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlhf_fast.backends.registry import BACKENDS, can_serve

from . import harness

MODES = ("fwd", "fwd+bwd")
TAGS = ("headline", "sweep-vocab", "sweep-tokens")
# Tolerance floors (norm-wise relative error against the oracle) by the dtype of the result; the
# tolerance of each quantity is max(floor, 2 x eager PyTorch's own error in the same dtype).
FLOOR = {torch.float64: 2e-5, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# --------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    """One implementation of a case's op, or the reason it cannot run here."""

    name: str
    make: Callable[[], Callable] | None = None  # builds fn; what fn takes is the case's business
    skip: str | None = None  # why it does not run here (make is then None)
    ours: bool = False  # rlhf_fast's: out of tolerance is FAILED and not timed (a peer is timed, flagged)
    modes: tuple[str, ...] = MODES
    slow: bool = False  # torch.compile, row loops: left out of the quick run's sweep cases
    # Device types whose --quick run includes it (None: every one). The quick run on a CPU keeps a
    # family's many variant rows to a sample; a GPU's, gpu_check.sh's, measures them all.
    quick_devices: tuple[str, ...] | None = None


def backend_impls(op: str, device: torch.device, dtype: torch.dtype, make: Callable[[str], Callable]) -> list[Impl]:
    """An ``Impl`` "backend=<name>" for every backend, skipped with the registry's reason where it cannot serve."""
    impls = []
    for name in BACKENDS:
        support = can_serve(name, device, dtype, op=op)
        if support:
            impls.append(Impl(f"backend={name}", make=lambda name=name: make(name), ours=True))
        else:
            impls.append(Impl(f"backend={name}", skip=support.reason, ours=True))
    return impls


def compile_impl(fn: Callable, name: str = "compile", **options) -> Impl:
    """torch.compile of a reference function (dynamic=False: one graph per shape, as a trainer would)."""
    return Impl(name, make=lambda: torch.compile(fn, dynamic=False, **options), slow=True)


def import_problem(*modules: str) -> str | None:
    """None when every module imports, else why not (a peer that is not installed is skipped with this)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # not installed, or a broken install: a reason, not a crash
            return f"{module} cannot be imported ({type(error).__name__}: {error})"
    return None


def liger_problem(device: torch.device) -> str | None:
    """Liger-Kernel: not installed, or installed but on a CPU (its Triton kernels need CUDA)."""
    missing = import_problem("liger_kernel")
    if missing is None and device.type != "cuda":
        return "Liger-Kernel's Triton kernels run on CUDA"
    return missing


def cce_problem(device: torch.device, impl: str) -> str | None:
    """Cut Cross-Entropy: not installed, or impl "cce" (Triton) on a CPU; "torch_compile" runs anywhere."""
    missing = import_problem("cut_cross_entropy")
    if missing is None and impl == "cce" and device.type != "cuda":
        return "Cut Cross-Entropy's cce kernels run on CUDA (its torch_compile implementation is the cce-compile row)"
    return missing


# --------------------------------------------------------------------------- verification


@dataclass
class Check:
    """Errors of one implementation against the oracle and the tolerance each must meet."""

    items: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # name -> (err, tol, "fwd"|"bwd")

    def add(self, name: str, err: float, tol: float, stage: str) -> None:
        self.items[name] = (err, tol, stage)

    def err(self, name: str) -> float | None:
        return self.items[name][0] if name in self.items else None

    def problem(self, mode: str) -> str | None:
        """What is out of tolerance for ``mode`` (forward quantities always, gradients for fwd+bwd)."""
        bad = [
            f"{name} rel err {err:.3g} > {tol:.3g}"
            for name, (err, tol, stage) in self.items.items()
            if (stage == "fwd" or mode == "fwd+bwd") and not err <= tol
        ]
        return "; ".join(bad) or None

    def fields(self, mode: str) -> dict[str, float]:
        out = {}
        for name, (err, tol, stage) in self.items.items():
            if stage == "fwd" or mode == "fwd+bwd":
                out[f"err_{name}"], out[f"tol_{name}"] = err, tol
        return out


def tolerance(name: str, result: torch.Tensor, eager: Check | None, rounded_to: torch.dtype | None = None) -> float:
    """max(floor of the result's dtype, 2 x eager's error on the same quantity). ``rounded_to``:
    the dtype the computation rounds through (eager's own bf16 logits), whose floor applies too."""
    floor = max(FLOOR.get(result.dtype, 2e-5), FLOOR.get(rounded_to, 0.0))
    eager_err = eager.err(name) if eager is not None else None
    return max(floor, 2 * eager_err) if eager_err is not None and eager_err == eager_err else floor


# --------------------------------------------------------------------------- the protocol


class Case:
    """One op at one shape and dtype. Subclasses fill in the methods; the suite calls them in order:

    make_inputs -> oracle -> for each impl: check (eager first) -> step per mode -> time, memory.
    """

    op = "?"
    modes: tuple[str, ...] = MODES
    ratio_to: tuple[str, ...] = ("eager", "compile")  # "x <impl>" columns: that impl's time / this time
    # Device types where the quick run includes torch.compile (on headline cases only): a compile
    # is seconds on a CPU but can be a minute of gpu_check.sh's budget on a GPU.
    compile_in_quick: tuple[str, ...] = ()

    def __init__(self, dims: dict[str, int], dtype: torch.dtype, device: torch.device, tags: Sequence[str] = (),
                 chunk_sizes: Sequence[int] = ()):  # fmt: skip
        self.dims, self.dtype, self.device, self.tags = dict(dims), dtype, torch.device(device), tuple(tags)
        self.chunk_sizes = tuple(chunk_sizes)  # --chunk-size: extra rows of the ops that take a chunk_size

    @property
    def label(self) -> str:
        return "x".join(str(v) for v in self.dims.values())

    def __repr__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        return f"{self.op}[{dims}] {str(self.dtype).removeprefix('torch.')}"

    def input_bytes(self) -> int:
        """Bytes of one copy of the inputs (the suite rotates enough copies to defeat the cache)."""
        raise NotImplementedError

    def implementations(self) -> list[Impl]:
        """Eager PyTorch first (every tolerance and ratio needs it)."""
        raise NotImplementedError

    def make_inputs(self, copies: int) -> Any:
        raise NotImplementedError

    def oracle(self, inputs: Any) -> Any:
        raise NotImplementedError

    def inputs_for(self, impl: Impl, inputs: Any) -> Any:
        """The inputs an implementation runs on (a private copy for one that writes into its inputs)."""
        return inputs

    def check(self, impl: Impl, fn: Callable, inputs: Any, expected: Any, eager: Check | None, with_grad: bool) -> Check:
        raise NotImplementedError

    def step(self, fn: Callable, inputs: Any, mode: str):
        """A callable step(i) running one measured call on input copy i, with a clear() method."""
        raise NotImplementedError

    def work(self, mode: str) -> tuple[float, float]:
        """(bytes the op must move, FLOPs it must do) for one call in ``mode``."""
        raise NotImplementedError

    def flop_ceiling_tflops(self) -> float | None:
        """Measured FLOP rate that bounds this op (a matmul-bound case), or None: bandwidth-bound."""
        return None

    def annotate(self, rows: list[dict]) -> None:
        """Add case-specific fields to the case's finished rows (ratios between its implementations)."""


def timed(row: dict) -> bool:
    """A row with a time: verified, or a baseline timed although out of tolerance."""
    return (row["status"] == "ok" or row["status"].startswith("inexact")) and row.get("median_ms") is not None


# --------------------------------------------------------------------------- cases of a few tensors


class TensorInputs:
    """Named tensors of one copy; ``leaves`` require grad. Upstream gradients are fixed per output."""

    def __init__(self, tensors: dict[str, torch.Tensor], leaves: Sequence[str]):
        self.tensors, self.leaves = tensors, tuple(leaves)
        for name in self.leaves:
            tensors[name].requires_grad_()
        self._upstream: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None

    def clear(self) -> None:
        for name in self.leaves:
            self.tensors[name].grad = None

    def upstream(self, k: int, out: torch.Tensor) -> torch.Tensor:
        """The gradient fed to output k: ones for a scalar, fixed random values (seed 100 + k) otherwise."""
        key = (k, out.dtype)
        if key not in self._upstream:
            if out.dim() == 0:
                self._upstream[key] = torch.ones((), dtype=out.dtype, device=out.device)
            else:
                gen = torch.Generator(device=out.device).manual_seed(100 + k)
                self._upstream[key] = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
        return self._upstream[key]

    def in_float64(self) -> TensorInputs:
        """Detached float64 copies of the floating tensors (leaves requiring grad), others as they are."""
        cast = {
            name: t.detach().double() if t.is_floating_point() else t for name, t in self.tensors.items()
        }
        return TensorInputs(cast, self.leaves)


@dataclass
class Expected:
    outs: tuple[torch.Tensor, ...]
    grads: dict[str, torch.Tensor]


class TensorStep:
    """One call on copy i: the forward under no_grad, or forward + backward with fixed upstream gradients."""

    def __init__(self, case: TensorCase, fn: Callable, copies: list[TensorInputs], mode: str):
        self.case, self.fn, self.copies, self.mode = case, fn, copies, mode

    def __call__(self, i: int):
        x = self.copies[i % len(self.copies)]
        if self.mode == "fwd":
            with torch.no_grad():
                return self.case.call(self.fn, x)
        x.clear()
        outs = self.case.call(self.fn, x)
        torch.autograd.backward(outs, [x.upstream(k, o) for k, o in enumerate(outs)])
        return None

    def clear(self) -> None:
        for x in self.copies:
            x.clear()


class TensorCase(Case):
    """A case whose inputs are a few tensors: the oracle is the eager implementation in float64.

    Subclasses set ``leaves`` and ``outputs`` (names of the differentiable outputs, in order) and
    define ``tensors(gen)`` (one copy of the inputs in the case's dtype) and ``call(fn, x)``.
    """

    leaves: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def tensors(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def call(self, fn: Callable, x: TensorInputs) -> tuple[torch.Tensor, ...]:
        """The implementation's differentiable outputs, a tuple in ``outputs`` order."""
        raise NotImplementedError

    def input_bytes(self) -> int:
        gen = torch.Generator(device=self.device).manual_seed(0)
        return sum(t.numel() * t.element_size() for t in self.tensors(gen).values())

    def make_inputs(self, copies: int) -> list[TensorInputs]:
        gen = torch.Generator(device=self.device).manual_seed(0)
        first = self.tensors(gen)
        xs = [TensorInputs(first, self.leaves)]
        for _ in range(copies - 1):
            xs.append(TensorInputs({name: t.detach().clone() for name, t in first.items()}, self.leaves))
        return xs

    def eager(self) -> Callable:
        impl = self.implementations()[0]
        assert impl.name == "eager" and impl.make is not None, "implementations() must list eager first"
        return impl.make()

    def oracle(self, inputs: list[TensorInputs]) -> Expected:
        x64 = inputs[0].in_float64()
        with_grad = "fwd+bwd" in self.modes
        with torch.set_grad_enabled(with_grad):
            outs = self.call(self.eager(), x64)
        grads = {}
        if with_grad:
            upstream = [inputs[0].upstream(k, o.float()).double() for k, o in enumerate(outs)]
            torch.autograd.backward(outs, upstream)
            grads = {name: x64.tensors[name].grad for name in self.leaves}
        return Expected(tuple(o.detach() for o in outs), grads)

    def check(self, impl, fn, inputs, expected: Expected, eager, with_grad):
        x = inputs[0]
        result = Check()
        with torch.no_grad():
            outs = self.call(fn, x)
        for name, out, exp in zip(self.outputs, outs, expected.outs):
            result.add(name, harness.rel_err(out, exp), tolerance(name, out, eager), "fwd")
        if with_grad and expected.grads:
            x.clear()
            outs = self.call(fn, x)
            torch.autograd.backward(outs, [x.upstream(k, o) for k, o in enumerate(outs)])
            for name in self.leaves:
                grad = x.tensors[name].grad
                key = f"grad_{name}"
                if grad is None:
                    result.add(key, float("inf"), 0.0, "bwd")
                else:
                    result.add(key, harness.rel_err(grad, expected.grads[name]), tolerance(key, grad, eager), "bwd")
            x.clear()
        return result

    def step(self, fn, inputs, mode):
        return TensorStep(self, fn, inputs, mode)
