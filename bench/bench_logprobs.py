"""Benchmark of token_logprobs: the fused backends against PyTorch baselines, forward and forward+backward.

    python -m rlhf_fast.bench.bench_logprobs [--quick] [--device cpu|cuda] [--out DIR] [--shape NxV --dtype D]
    python -m rlhf_fast.bench.bench_logprobs --summarize bench/results/*-logprobs.json   (headline figures)

For each (dtype, [N x V]) and each row family ("logp"; "logp+entropy" with return_entropy=True),
every implementation is
1. verified against the float64 reference on the same input values: logp (and entropy) on all
   rows, the logits gradient on a sample of rows; a wrong result is FAILED and is not timed;
2. timed, forward alone (under no_grad) and forward+backward: median, p10, p90;
3. measured for peak memory beyond its inputs (outputs, gradient, intermediates);
and compared with eager PyTorch measured in the same run.

Implementations:
  backend=<name>  rlhf_fast.token_logprobs(..., backend=name) for each backend that can serve the
                  device and dtype; the others are listed with the registry's reason
  eager           rlhf_fast.reference.token_logprobs: the readable spec, eager PyTorch
  compile         torch.compile of that reference (skipped, with the error, if compilation fails)
  eager-upcast    reference.token_logprobs_upcast: logits.float(), log_softmax, gather (logp only)
  trl-selective   reference.selective_log_softmax, TRL's formulation (logp only; it loops over
                  rows for bfloat16/float16)

Bytes an op must move (e = element size of the logits): forward N*V*e (one read of the logits);
forward+backward 3*N*V*e (forward read, backward read, gradient write). GB/s is that count over the
median time, whatever an implementation really moves. frac_copy is GB/s over the measured device
copy bandwidth, and floor_ms = bytes / copy bandwidth: the time of a kernel that moves only those
bytes at copy speed (for forward+backward the "three-pass floor").

Labels are all valid (no ignore_index) and the temperature is 1, because eager-upcast and
trl-selective support neither; tests/test_token_logprobs.py covers both.
"""

from __future__ import annotations

import argparse
import functools
import gc
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.backends.registry import BACKENDS, can_serve

from . import harness

BENCH = "logprobs"
FAMILIES = ("logp", "logp+entropy")
MODES = ("fwd", "fwd+bwd")
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
KEY_FIELDS = ("dtype", "shape", "impl", "family", "mode")

# (device, quick) -> [(dtype, N, V)]. The first case is the headline one, measured first so that
# a run cut short by --deadline-s still has it.
SHAPES = {
    ("cpu", False): [("float32", 1024, 32000), ("float32", 4096, 32000)],
    ("cpu", True): [("float32", 512, 32000)],
    ("cuda", False): [("bfloat16", 16384, 128256), ("bfloat16", 4096, 128256), ("bfloat16", 8192, 151936)],
    ("cuda", True): [("bfloat16", 16384, 128256), ("float32", 4096, 128256)],
}
HEADLINE = ("cuda", "bfloat16", (16384, 128256))

# Verification. Forward outputs: the tests' tolerance vs the float64 reference (norm-wise relative
# error), or the output dtype's epsilon for a baseline whose output is bf16/fp16. Gradient: 2x
# PyTorch's own error when it computes the same gradient in the logits' dtype, never below FWD_TOL.
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
    """One measured call on copy ``i``: the forward under no_grad, or forward + backward.

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
        x = self.inputs.xs[i]
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
    """Factory for harness.cpu_peak_mb: a fresh process builds one copy of the inputs and the step."""
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


# --------------------------------------------------------------------------- one case


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(dtype_name: str, n: int, vocab: int, device: torch.device, args, env: dict, copy_gbps, deadline, save):
    """Verify, time and measure every implementation on one (dtype, [N x V]); returns the rows.

    ``save(rows)`` is called after each implementation, so a run that is killed keeps its rows.
    """
    dtype = getattr(torch, dtype_name)
    torch._dynamo.reset()  # each case compiles afresh (dynamic=False), within the recompile limit
    logits_bytes = n * vocab * dtype.itemsize
    copies = harness.input_copies(logits_bytes, device, max_copies=args.max_copies)
    inputs = make_inputs(n, vocab, dtype, device, copies)
    expected = expected_values(inputs, args.families)
    with_grad = "fwd+bwd" in args.modes
    rows = []
    for family in args.families:
        for impl in impl_names(family):
            if impl not in args.impls:
                continue
            base = dict(env, bench=BENCH, dtype=dtype_name, shape=[n, vocab], impl=impl, family=family, copies=copies)

            def row(mode, status, timing=None, report=None, **extra):
                bytes_moved = logits_bytes * (1 if mode == "fwd" else 3)
                fields = dict(base, mode=mode, status=status, verified=status == "ok", **harness.as_dict(timing))
                fields.update({k: v for k, v in (report or {}).items() if k not in ("problem", "grad_problem")})
                fields.update(bytes=bytes_moved, copy_gbps=copy_gbps, **extra)
                fields["floor_ms"] = bytes_moved / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
                fields["gbps"] = harness.gbps(bytes_moved, timing.median_ms) if timing and status == "ok" else None
                fields["frac_copy"] = fields["gbps"] / copy_gbps if fields["gbps"] and copy_gbps else None
                return fields

            reason = unavailable(impl, device, dtype)
            if reason is None and deadline is not None and time.monotonic() > deadline:
                reason = f"time budget spent (--deadline-s {args.deadline_s})"
            if reason is not None:
                rows += [row(mode, f"skipped: {reason}") for mode in args.modes]
                continue
            report = None
            done = set()
            try:
                fn = implementation(impl, family)
                report = verify(fn, inputs, expected, family, with_grad)
                for mode in args.modes:
                    problem = report["problem"] or (report["grad_problem"] if mode == "fwd+bwd" else None)
                    if problem:
                        rows.append(row(mode, f"FAILED: {problem}", report=report))
                        done.add(mode)
                        continue
                    step = Step(fn, inputs, mode)
                    timing = harness.time_step(
                        step, device, copies=copies, warmup=1, min_reps=args.min_reps, budget_s=args.budget_s
                    )
                    peak = harness.cuda_peak_mb(step, device) if device.type == "cuda" else None
                    step.clear()
                    rows.append(row(mode, "ok", timing, report, peak_mb=peak))
                    done.add(mode)
            except Exception as error:  # one implementation's failure is a row, not the end of the run
                if _is_oom(error):
                    status = f"OOM: {_short(error, 160)}"
                elif impl == "compile":
                    status = f"skipped: torch.compile failed: {_short(error)}"
                else:
                    status = f"FAILED: {_short(error)}"
                rows += [row(mode, status, report=report) for mode in args.modes if mode not in done]
            finally:
                inputs_clear(inputs)
                _release(device)
            add_ratios(rows)
            save(rows)
    del inputs, expected
    _release(device)
    if device.type == "cpu" and not args.no_memory:
        measure_cpu_memory(rows, args)
    save(rows)
    return rows


def inputs_clear(inputs: Inputs) -> None:
    for x in inputs.xs:
        x.grad = None


def measure_cpu_memory(rows, args) -> None:
    """Peak RSS growth of each verified row, each in a fresh process (torch has no CPU allocator stats)."""
    todo = [r for r in rows if r["status"] == "ok"]
    kwargs = [
        dict(impl=r["impl"], family=r["family"], mode=r["mode"], n=r["shape"][0], vocab=r["shape"][1], dtype=r["dtype"])
        for r in todo
    ]
    peaks = harness.cpu_peak_mb(f"{__package__}.bench_logprobs:memory_step", kwargs, workers=args.memory_workers)
    for r, peak in zip(todo, peaks):
        if isinstance(peak, str):
            r["peak_mb_error"] = peak
        else:
            r["peak_mb"] = peak


def add_ratios(rows) -> None:
    """ratio_vs_X = X's median / this median (> 1: faster than X), same family, mode and run."""
    medians = {(r["family"], r["mode"], r["impl"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        for name, impl in (("ratio_vs_eager", "eager"), ("ratio_vs_compile", "compile")):
            other = medians.get((r["family"], r["mode"], impl))
            r[name] = other / r["median_ms"] if other and r["status"] == "ok" else None


# --------------------------------------------------------------------------- reporting

COLUMNS = [
    ("family", lambda r: r["family"]),
    ("impl", lambda r: r["impl"]),
    ("mode", lambda r: r["mode"]),
    ("median ms", lambda r: harness.fmt(r["median_ms"], ".3f")),
    ("p10-p90 ms", lambda r: "-" if r["p10_ms"] is None else f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"),
    ("x eager", lambda r: harness.fmt(r.get("ratio_vs_eager"), ".2f")),
    ("x compile", lambda r: harness.fmt(r.get("ratio_vs_compile"), ".2f")),
    ("GB/s", lambda r: harness.fmt(r.get("gbps"), ".0f" if (r.get("gbps") or 0) >= 100 else ".2g")),
    ("of copy", lambda r: "-" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.0f}%"),
    ("peak MiB", lambda r: harness.fmt(r.get("peak_mb"), ".0f")),
    ("status", lambda r: r["status"] if len(r["status"]) <= 40 else r["status"][:37] + "..."),
]


def case_header(rows) -> str:
    r = rows[0]
    n, vocab = r["shape"]
    line = f"### {r['device']} {r['dtype']} [{n} x {vocab}] on {r['device_name']} (torch {r['torch']}, triton {r['triton']}, commit {r['commit']}"
    if r["device"] == "cpu":
        line += f", {r['cpu_threads']} threads, load {harness.fmt(r.get('load_avg_1m'), '.1f')} at start)"
    else:
        line += ")"
    copy = r.get("copy_gbps")
    if copy:
        logits_bytes = r["bytes"] if r["mode"] == "fwd" else r["bytes"] / 3
        line += (
            f"\ncopy bandwidth {copy:.0f} GB/s; floors at copy speed: fwd {logits_bytes / copy / 1e6:.3f} ms,"
            f" fwd+bwd (three-pass) {3 * logits_bytes / copy / 1e6:.3f} ms; input copies rotated: {r['copies']}"
        )
    return line


def format_case(rows) -> str:
    shown = [r for r in rows if not r["status"].startswith("skipped")]
    lines = [case_header(rows), "", harness.markdown_table(shown, COLUMNS) if shown else "(no rows ran)"]
    notes = {}  # every status that is not "ok", in full, once per impl
    for r in rows:
        if r["status"] != "ok":
            notes.setdefault(f"{r['impl']}: {r['status']}", None)
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def summarize(paths, device: str, dtype: str, shape) -> str:
    """The headline case from results files: its rows from the newest run that measured it."""
    rows = [
        r
        for r in harness.load_rows([path for path in paths if Path(path).is_file()])
        if r["device"] == device and r["dtype"] == dtype and tuple(r["shape"]) == tuple(shape)
    ]
    if not rows:
        return f"no {device} {dtype} [{shape[0]} x {shape[1]}] rows in: {', '.join(map(str, paths)) or 'no files'}"
    newest = max(r["timestamp"] for r in rows)  # one timestamp per run: the run's start
    rows = [r for r in rows if r["timestamp"] == newest]
    order = {impl: i for i, impl in enumerate(IMPLS)}
    rows.sort(key=lambda r: (FAMILIES.index(r["family"]), order.get(r["impl"], 99), MODES.index(r["mode"])))
    return "## summary\n" + format_case(rows)


# --------------------------------------------------------------------------- command line


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x32000 (N x V), got {text!r}") from None
    return n, vocab


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the headline shapes only (see SHAPES)")
    p.add_argument("--shape", type=parse_shape, action="append", help="NxV, repeatable; replaces the default shapes")
    p.add_argument("--dtype", help="dtype of --shape cases (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--out", action="append", help="results directory, repeatable (default bench/results)")
    p.add_argument("--budget-s", type=float, default=None, help="timing budget per measurement (default 1 cpu, 0.5 cuda)")
    p.add_argument("--min-reps", type=int, default=5, help="timed runs even when one run exceeds the budget")
    p.add_argument("--max-copies", type=int, default=8, help="most input copies rotated to defeat the cache")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-workers", type=int, default=2, help="CPU: fresh processes measuring memory at once")
    p.add_argument("--deadline-s", type=float, help="start no new implementation after this many seconds")
    p.add_argument("--summarize", nargs="*", metavar="JSON", help="print the headline table of results files and exit")
    p.add_argument("--summary-case", default="cuda:bfloat16:16384x128256", help="device:dtype:NxV for --summarize")
    return p


def _subset(text: str, allowed, what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"--{what} takes a comma-separated subset of {','.join(allowed)}; got {text!r}")
    return chosen


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize is not None:
        device, dtype, shape = args.summary_case.split(":")
        print(summarize(args.summarize, device, dtype, parse_shape(shape)))
        return 0
    args.impls = _subset(args.impls, IMPLS, "impls")
    args.families = _subset(args.families, FAMILIES, "families")
    args.modes = _subset(args.modes, MODES, "modes")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.budget_s is None:
        args.budget_s = 0.5 if device.type == "cuda" else 1.0
    if args.shape:
        dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        cases = [(dtype, n, vocab) for n, vocab in args.shape]
    else:
        cases = SHAPES[device.type, args.quick]
    out_dirs = args.out or [str(harness.RESULTS_DIR)]
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    # SIGTERM (from `timeout`) exits cleanly; the rows of every finished implementation are saved.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    env = harness.environment(device)
    copy_gbps = harness.copy_bandwidth_gbps(device)
    print(f"{env['device_name']}: copy bandwidth {copy_gbps:.0f} GB/s (read + write)", flush=True)
    failed, saved = False, []

    def save(rows):
        if rows:
            for out in out_dirs:
                harness.write_results(rows, out, bench=BENCH, key_fields=KEY_FIELDS)
            saved.append(True)

    try:
        for dtype_name, n, vocab in cases:
            if deadline is not None and time.monotonic() > deadline:
                print(f"\n### {dtype_name} [{n} x {vocab}]: not run, time budget spent (--deadline-s {args.deadline_s})")
                continue
            rows = run_case(dtype_name, n, vocab, device, args, env, copy_gbps, deadline, save)
            failed |= any(r["status"].startswith("FAILED") for r in rows)
            print("\n" + format_case(rows) + "\n", flush=True)
    finally:
        if saved:
            paths = {str(harness.results_path(out, BENCH, env["device_name"], env["date"])) for out in out_dirs}
            print("results: " + ", ".join(sorted(paths)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
