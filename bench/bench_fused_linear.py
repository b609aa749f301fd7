"""Benchmark of the linear-head ops (lm_head + loss, no [N, V] logits) against eager PyTorch and Liger.

    python -m rlhf_fast.bench.bench_fused_linear [--quick] [--device cpu|cuda] [--shape NxHxV --dtype D] [--out DIR]
                                       [--ops logprobs,sft,policy] [--chunk-size C ...] [--deadline-s S]
    python -m rlhf_fast.bench.bench_fused_linear --summarize bench/results/*-fused_linear.json

Each op is a scalar loss L of hidden [N, H] and the head weight [V, H]; every row is forward +
backward w.r.t. both (what a training step does):
  logprobs  L = sum(g * logp) with logp = token_logprobs(hidden @ W.T, labels), g a random upstream
  sft       L = mean of -logp (cross-entropy)
  policy    GRPO / DAPO: policy loss with clip 0.2, a k3 KL to ref_logp with coefficient 0.04,
            token-mean over a [B, T = 1024] mask (about 1/4 padding), per-sequence advantages [B]

Implementations:
  eager          rlhf_fast.reference.<op> on hidden @ W.T: plain PyTorch, logits materialised
  fused-logits   rlhf_fast.<op> (token_logprobs / sft_loss / fused_policy_loss) on hidden @ W.T
  linear         rlhf_fast.linear_token_logprobs / linear_sft_loss / fused_linear_policy_loss
  linear-c<C>    the same with chunk_size=C (--chunk-size, repeatable): the memory / time trade
  liger          Liger-Kernel, CUDA only: liger_fused_linear_cross_entropy (sft) with its default
                 bf16 weight-gradient accumulation; LigerFusedLinearGRPOLoss (policy, loss_type
                 "dapo", compiled=False: its [B, T] loss math is negligible next to the matmuls)
  liger-fp32acc  sft: Liger's FLCE with accum_dtype=float32, the weight-gradient precision of ours
When ``import liger_kernel`` fails the liger rows say "skipped: <reason>".

Every implementation is verified first against an oracle on the same input values (float64 on
CPU, float32 on CUDA, run as two passes over row chunks so that it fits): the loss and the
gradients of hidden and weight. Ours must be within 2x eager's own error (in the same dtype) or
is FAILED and not timed; a baseline outside it is timed and flagged. Then: median / p10 / p90
time (CUDA: events; CPU: the implementations of an op run in turn, round after round, so that a
shared machine's load falls on all of them alike), peak memory beyond the inputs (CUDA: allocator peak; CPU: RSS high-water mark in a fresh
process), ``x floor`` = time over the matmul floor 6 N H V / (measured rate of hidden @ W.T in
the dtype), and ratios to eager and Liger from the same run.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rlhf_fast
from rlhf_fast import reference

from . import harness

BENCH = "fused_linear"
OPS = ("sft", "policy", "logprobs")
BASE_IMPLS = ("eager", "linear", "liger", "liger-fp32acc", "fused-logits")
KEY_FIELDS = ("dtype", "shape", "op", "impl")
SEQ_LEN = 1024  # T of the policy op's [B, T] layout
POLICY = dict(clip_eps=0.2, kl_coef=0.04, kl_estimator="k3", agg="token-mean")
CHUNK_ROWS = 2048  # rows per oracle chunk
SHAPES = {  # (device, quick) -> [(dtype, N, H, V)]; the first is the headline
    ("cuda", True): [("bfloat16", 16384, 4096, 128256)],
    ("cuda", False): [("bfloat16", 16384, 4096, 128256), ("bfloat16", 8192, 3584, 152064)],
    ("cpu", True): [("float32", 1024, 512, 32000)],
    ("cpu", False): [("float32", 4096, 512, 32000)],
}


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, H] leaf requiring grad
    weight: torch.Tensor  # [V, H] leaf requiring grad
    labels: torch.Tensor  # [N] int64 in [0, V)
    g: torch.Tensor  # [N] float32 upstream gradient of logp (logprobs op)
    mask: torch.Tensor  # [B, T] bool, right padding
    old_logp: torch.Tensor  # [B, T] float32
    ref_logp: torch.Tensor  # [B, T] float32
    advantages: torch.Tensor  # [B] float32

    @property
    def bt(self):
        return self.mask.shape


def make_inputs(n: int, hidden_size: int, vocab: int, dtype: torch.dtype, device, seed: int = 0) -> Inputs:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen, device=device).to(dtype)
    # Logits of spread ~2.5, as a trained LM's; the weight is the largest input: made in place.
    weight = torch.randn(vocab, hidden_size, generator=gen, device=device).mul_(2.5 / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    g = torch.randn(n, generator=gen, device=device)
    seq = SEQ_LEN if n % SEQ_LEN == 0 else n
    b = n // seq
    lengths = torch.randint(seq // 2, seq + 1, (b, 1), generator=gen, device=device)
    mask = torch.arange(seq, device=device) < lengths
    with torch.no_grad():  # behaviour and reference policies near the current one: some ratios clip
        logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels).view(b, seq)
    old_logp = logp + 0.2 * torch.randn(b, seq, generator=gen, device=device)
    ref_logp = logp + 0.2 * torch.randn(b, seq, generator=gen, device=device)
    advantages = torch.randn(b, generator=gen, device=device)
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(), labels, g, mask, old_logp, ref_logp, advantages)


# --------------------------------------------------------------------------- implementations


def liger_unavailable() -> str | None:
    try:
        for module in ("liger_kernel.chunked_loss", "liger_kernel.transformers.functional"):
            importlib.import_module(module)
    except Exception as error:  # not installed, or a broken install: a reason, not a crash
        return f"liger_kernel cannot be imported: {type(error).__name__}: {error}"
    return None


def unavailable(op: str, impl: str, device: torch.device) -> str | None:
    if impl.startswith("liger"):
        if device.type != "cuda":
            return "Liger's kernels run on CUDA"
        if op == "logprobs" or (op == "policy" and impl == "liger-fp32acc"):
            return f"Liger has no {impl} form of {op}"
        return liger_unavailable()
    return None


def _policy_args(x: Inputs):
    return x.labels.view(x.bt), x.old_logp, x.advantages, x.mask


def implementation(op: str, impl: str):
    """inputs -> scalar loss tensor (differentiable w.r.t. x.hidden and x.weight)."""
    if impl == "eager" or impl == "fused-logits":
        lib = reference if impl == "eager" else rlhf_fast
        if op == "logprobs":
            return lambda x: (lib.token_logprobs(x.hidden @ x.weight.T, x.labels) * x.g).sum()
        if op == "sft":
            return lambda x: lib.sft_loss(x.hidden @ x.weight.T, x.labels)
        return lambda x: lib.fused_policy_loss(
            (x.hidden @ x.weight.T).view(*x.bt, -1), *_policy_args(x), ref_logp=x.ref_logp, **POLICY
        )[0]
    if impl == "linear" or impl.startswith("linear-c"):
        chunk = int(impl.removeprefix("linear-c")) if impl.startswith("linear-c") else None
        if op == "logprobs":
            return lambda x: (rlhf_fast.linear_token_logprobs(x.hidden, x.weight, x.labels, chunk_size=chunk) * x.g).sum()
        if op == "sft":
            return lambda x: rlhf_fast.linear_sft_loss(x.hidden, x.weight, x.labels, chunk_size=chunk)
        return lambda x: rlhf_fast.fused_linear_policy_loss(
            x.hidden.view(*x.bt, -1), x.weight, *_policy_args(x), ref_logp=x.ref_logp, chunk_size=chunk, **POLICY
        )[0]
    if impl.startswith("liger") and op == "sft":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        accum = torch.float32 if impl == "liger-fp32acc" else None
        return lambda x: liger_fused_linear_cross_entropy(x.hidden, x.weight, x.labels, accum_dtype=accum)
    if impl == "liger" and op == "policy":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        grpo = LigerFusedLinearGRPOLoss(
            beta=POLICY["kl_coef"], epsilon_low=POLICY["clip_eps"], epsilon_high=POLICY["clip_eps"],
            loss_type="dapo", use_ref_model=True, compiled=False,
        )  # fmt: skip

        def liger_policy(x):
            labels, old_logp, advantages, mask = _policy_args(x)
            out = grpo(x.hidden.view(*x.bt, -1), x.weight, labels, mask.float(), advantages,
                       ref_per_token_logps=x.ref_logp, old_per_token_logps=old_logp)  # fmt: skip
            return out[0] if isinstance(out, tuple) else out

        return liger_policy
    raise ValueError(f"no implementation {impl!r} of {op!r}")


class Step:
    """One measured forward + backward; gradients dropped first so that backward writes them fresh."""

    def __init__(self, fn, inputs: Inputs):
        self.fn, self.inputs = fn, inputs

    def __call__(self, i: int = 0):
        self.clear()
        self.fn(self.inputs).backward()

    def clear(self) -> None:
        self.inputs.hidden.grad = self.inputs.weight.grad = None


def memory_step(op: str, impl: str, n: int, hidden_size: int, vocab: int, dtype: str, device: str = "cpu"):
    """Factory for harness.cpu_peak_mb: a fresh process builds the inputs and the step."""
    return Step(implementation(op, impl), make_inputs(n, hidden_size, vocab, getattr(torch, dtype), device))


# --------------------------------------------------------------------------- oracle and verification


def per_token_loss(op: str, x: Inputs, logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """The op's loss as a function of the per-token logp and entropy [N] (the reference formulas)."""
    if op == "logprobs":
        return (logp * x.g.to(logp.dtype)).sum()
    if op == "sft":
        return -logp.mean()
    cast = lambda t: t.to(logp.dtype)  # noqa: E731
    loss, _ = reference.policy_loss(
        logp.view(x.bt), cast(x.old_logp), cast(x.advantages), x.mask, ref_logp=cast(x.ref_logp), **POLICY
    )
    return loss


def oracle(op: str, x: Inputs):
    """(loss, grad hidden, grad weight) in float64 (CPU) / float32 (CUDA) on the inputs' values.

    Pass 1 gets logp and entropy chunk by chunk; autograd of the loss in those gives the per-token
    upstream gradients; pass 2 recomputes each chunk's logits with grad and back-propagates them.
    """
    dtype = torch.float64 if x.hidden.device.type == "cpu" else torch.float32
    h, w = x.hidden.detach().to(dtype), x.weight.detach().to(dtype)
    labels = x.labels if op != "policy" else torch.where(x.mask.view(-1), x.labels, -100)
    chunks = [(s, min(s + CHUNK_ROWS, h.shape[0])) for s in range(0, h.shape[0], CHUNK_ROWS)]
    with torch.no_grad():
        parts = [reference.token_logprobs(h[s:e] @ w.T, labels[s:e], return_entropy=True) for s, e in chunks]
    logp = torch.cat([p[0] for p in parts]).requires_grad_()
    entropy = torch.cat([p[1] for p in parts]).requires_grad_()
    loss = per_token_loss(op, x, logp, entropy)
    g_logp, g_entropy = torch.autograd.grad(loss, (logp, entropy), allow_unused=True, materialize_grads=True)
    grad_h, w = torch.empty_like(h), w.requires_grad_()
    for s, e in chunks:
        hc = h[s:e].clone().requires_grad_()
        lp, ent = reference.token_logprobs(hc @ w.T, labels[s:e], return_entropy=True)
        ((lp * g_logp[s:e]).sum() + (ent * g_entropy[s:e]).sum()).backward()
        grad_h[s:e] = hc.grad
    return loss.detach(), grad_h, w.grad


def errors(fn, x: Inputs, expected) -> dict:
    """Norm-wise relative errors of the loss and both gradients against the oracle."""
    step = Step(fn, x)
    step.clear()
    loss = fn(x)
    loss.backward()
    got = (loss.detach(), x.hidden.grad, x.weight.grad)
    names = ("err_loss", "err_grad_hidden", "err_grad_weight")
    result = {name: harness.rel_err(a, b) for name, a, b in zip(names, got, expected)}
    step.clear()
    return result


def tolerance_basis(op: str, x: Inputs, expected, device: torch.device) -> tuple[str | None, dict | None]:
    """Errors of eager PyTorch in the inputs' dtype, which set every tolerance (measured even when
    eager is not timed). If eager cannot run (out of memory), those of fused-logits: the same
    dtype's roundings with the logits materialised once."""
    for impl in ("eager", "fused-logits"):
        try:
            return impl, errors(implementation(op, impl), x, expected)
        except Exception as error:
            print(f"{op}: {impl} could not run for the tolerance ({type(error).__name__}: {error})", flush=True)
        finally:
            Step(None, x).clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return None, None


def tolerance_problem(report: dict, eager: dict | None, dtype: torch.dtype) -> str | None:
    """Each error within max(2x eager's, the dtype's floor); None when all are."""
    floor = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-3
    problems = []
    for name, err in report.items():
        tol = max(2 * eager[name], floor) if eager else floor
        if not err <= tol:
            problems.append(f"{name.removeprefix('err_')} rel err {err:.3g} > {tol:.3g}")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- one case


def matmul_floor_ms(x: Inputs, device: torch.device) -> tuple[float, float]:
    """(floor ms = 6 N H V / rate, rate TFLOP/s) with the rate of hidden @ W.T in the inputs' dtype."""
    h, w = x.hidden.detach(), x.weight.detach()
    out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=device)
    timing = harness.time_step(lambda i: torch.mm(h, w.t(), out=out), device, warmup=2, min_reps=5, budget_s=0.5)
    flops = 2 * h.shape[0] * h.shape[1] * w.shape[0]
    return 3 * timing.median_ms, flops / (timing.median_ms * 1e-3) / 1e12


def time_round_robin(steps, args) -> list[harness.Timing]:
    """CPU: the steps of one op timed in turn, one run of each per round, so that a change in the
    machine's load (a shared CPU) falls on all of them alike. One warm-up round first; the round
    count fills about budget_s per step, at least min_reps."""
    for step in steps:
        step()
    start = time.perf_counter()
    for step in steps:
        step()
    per_round = time.perf_counter() - start
    rounds = max(args.min_reps, min(100, int(args.budget_s * len(steps) / max(per_round, 1e-6))))
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for k, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[k].append((time.perf_counter() - start) * 1e3)
    for step in steps:
        step.clear()
    return [harness.summarize_times(t) for t in times]


def run_case(dtype_name, n, hidden_size, vocab, device, args, env, deadline, save):
    dtype = getattr(torch, dtype_name)
    x = make_inputs(n, hidden_size, vocab, dtype, device)
    floor_ms, tflops = matmul_floor_ms(x, device)
    print(f"[{n} x {hidden_size}] @ [{hidden_size} x {vocab}] {dtype_name}: {tflops:.1f} TFLOP/s, "
          f"6NHV floor {floor_ms:.1f} ms", flush=True)  # fmt: skip
    rows = []
    for op in args.ops:
        expected = oracle(op, x)
        basis, eager_report = tolerance_basis(op, x, expected, device)
        pending = []  # CPU: (row, step) of the verified implementations, timed together below
        for impl in args.impls:
            base = dict(env, bench=BENCH, dtype=dtype_name, shape=[n, hidden_size, vocab], op=op, impl=impl,
                        floor_ms=floor_ms, mm_tflops=tflops, tolerance_from=basis)  # fmt: skip
            reason = unavailable(op, impl, device)
            if reason is None and deadline is not None and time.monotonic() > deadline:
                reason = f"time budget spent (--deadline-s {args.deadline_s})"
            if reason is not None:
                rows.append(dict(base, status=f"skipped: {reason}", **harness.as_dict(None)))
                continue
            report = {}
            try:
                fn = implementation(op, impl)
                report = eager_report if impl == basis else errors(fn, x, expected)
                problem = tolerance_problem(report, eager_report, dtype)
                ours = impl.startswith("linear") or impl == "fused-logits"
                if problem and ours:
                    rows.append(dict(base, status=f"FAILED: {problem}", **report, **harness.as_dict(None)))
                    continue
                step = Step(fn, x)
                row = dict(base, status="ok" if not problem else f"ok, outside tolerance: {problem}", **report)
                if device.type == "cuda":
                    timing = harness.time_step(step, device, warmup=1, min_reps=args.min_reps, budget_s=args.budget_s)
                    row.update(peak_mb=harness.cuda_peak_mb(step, device), **harness.as_dict(timing))
                else:
                    pending.append((row, step))
                rows.append(row)
            except Exception as error:  # one implementation's failure is a row, not the end of the run
                text = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower()
                rows.append(dict(base, status=("OOM: " if oom else "FAILED: ") + text, **report, **harness.as_dict(None)))
            finally:
                Step(None, x).clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save(rows)
        if pending:
            timings = time_round_robin([step for _, step in pending], args)
            for (row, _), timing in zip(pending, timings):
                row.update(harness.as_dict(timing))
        del expected, pending
    del x
    if device.type == "cpu" and not args.no_memory:
        measure_cpu_memory(rows, args)
    add_ratios(rows)
    save(rows)
    return rows


def measure_cpu_memory(rows, args) -> None:
    todo = [r for r in rows if r["status"].startswith("ok")]
    kwargs = [dict(op=r["op"], impl=r["impl"], n=r["shape"][0], hidden_size=r["shape"][1], vocab=r["shape"][2],
                   dtype=r["dtype"]) for r in todo]  # fmt: skip
    peaks = harness.cpu_peak_mb("bench.bench_fused_linear:memory_step", kwargs, workers=args.memory_workers)
    for r, peak in zip(todo, peaks):
        r["peak_mb" if not isinstance(peak, str) else "peak_mb_error"] = peak


def add_ratios(rows) -> None:
    """x floor; time and memory against eager and Liger of the same op and run (> 1: we are faster)."""
    ok = {(r["op"], r["impl"]): r for r in rows if r["status"].startswith("ok")}
    for r in rows:
        if not r["status"].startswith("ok"):
            continue
        r["x_floor"] = r["median_ms"] / r["floor_ms"]
        for name, impl in (("eager", "eager"), ("liger", "liger"), ("liger_fp32acc", "liger-fp32acc")):
            other = ok.get((r["op"], impl))
            if other is None:
                continue
            r[f"speedup_vs_{name}"] = other["median_ms"] / r["median_ms"]
            if r.get("peak_mb") and other.get("peak_mb"):
                r[f"mem_vs_{name}"] = r["peak_mb"] / other["peak_mb"]


# --------------------------------------------------------------------------- reporting

COLUMNS = [
    ("op", lambda r: r["op"]),
    ("impl", lambda r: r["impl"]),
    ("median ms", lambda r: harness.fmt(r.get("median_ms"), ".1f")),
    ("p10-p90 ms", lambda r: "-" if r.get("p10_ms") is None else f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}"),
    ("x floor", lambda r: harness.fmt(r.get("x_floor"), ".2f")),
    ("peak MiB", lambda r: harness.fmt(r.get("peak_mb"), ".0f")),
    ("mem/eager", lambda r: harness.fmt(r.get("mem_vs_eager"), ".3f")),
    ("speedup/eager", lambda r: harness.fmt(r.get("speedup_vs_eager"), ".2f")),
    ("speedup/liger", lambda r: harness.fmt(r.get("speedup_vs_liger"), ".2f")),
    ("mem/liger", lambda r: harness.fmt(r.get("mem_vs_liger"), ".2f")),
    ("err grad W", lambda r: harness.fmt(r.get("err_grad_weight"), ".2g")),
    ("status", lambda r: r["status"] if len(r["status"]) <= 40 else r["status"][:37] + "..."),
]


def format_case(rows) -> str:
    r = rows[0]
    n, hidden_size, vocab = r["shape"]
    head = (f"### {r['device']} {r['dtype']} N={n} H={hidden_size} V={vocab} on {r['device_name']} (torch {r['torch']}, "
            f"triton {r['triton']}, commit {r['commit']}); matmul {r['mm_tflops']:.1f} TFLOP/s, 6NHV floor "
            f"{r['floor_ms']:.1f} ms")  # fmt: skip
    shown = [r for r in rows if not r["status"].startswith("skipped")]
    lines = [head, "", harness.markdown_table(shown, COLUMNS) if shown else "(no rows ran)"]
    notes = dict.fromkeys(f"{r['op']} {r['impl']}: {r['status']}" for r in rows if r["status"] != "ok")
    return "\n".join(lines + [f"- {note}" for note in notes])


def summarize(paths) -> str:
    rows = harness.load_rows([p for p in paths if Path(p).is_file()])
    if not rows:
        return f"no rows in: {', '.join(map(str, paths)) or 'no files'}"
    out = []
    for shape_key in dict.fromkeys((r["device"], r["dtype"], tuple(r["shape"])) for r in rows):
        case = [r for r in rows if (r["device"], r["dtype"], tuple(r["shape"])) == shape_key]
        newest = max(r["timestamp"] for r in case)
        case = [r for r in case if r["timestamp"] == newest]
        case.sort(key=lambda r: (OPS.index(r["op"]) if r["op"] in OPS else 9, r["impl"]))
        out.append(format_case(case))
    return "## fused linear summary\n" + "\n\n".join(out)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, hidden_size, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x512x32000 (N x H x V), got {text!r}") from None
    return n, hidden_size, vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the headline shape only")
    p.add_argument("--shape", type=parse_shape, action="append", help="NxHxV, repeatable; replaces the default shapes")
    p.add_argument("--dtype", help="dtype of --shape cases (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--impls", default=",".join(BASE_IMPLS), help=f"comma-separated subset of {','.join(BASE_IMPLS)}")
    p.add_argument("--chunk-size", type=int, action="append", default=[], help="also time linear with this chunk_size")
    p.add_argument("--out", action="append", help="results directory, repeatable (default bench/results)")
    p.add_argument("--budget-s", type=float, default=None, help="timing budget per row (default 1 cpu, 0.5 cuda)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the fresh-process peak-memory probes")
    p.add_argument("--memory-workers", type=int, default=1)
    p.add_argument("--deadline-s", type=float, help="start no new implementation after this many seconds")
    p.add_argument("--summarize", nargs="*", metavar="JSON", help="print the tables of results files and exit")
    args = p.parse_args(argv)
    if args.summarize is not None:
        print(summarize(args.summarize))
        return 0
    args.ops = [op for op in args.ops.split(",") if op]
    args.impls = [impl for impl in args.impls.split(",") if impl] + [f"linear-c{c}" for c in args.chunk_size]
    if unknown := [op for op in args.ops if op not in OPS]:
        raise SystemExit(f"--ops takes a subset of {OPS}; got {unknown}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    args.budget_s = args.budget_s or (0.5 if device.type == "cuda" else 1.0)
    dtype_default = "bfloat16" if device.type == "cuda" else "float32"
    cases = [(args.dtype or dtype_default, *s) for s in args.shape] if args.shape else SHAPES[device.type, args.quick]
    out_dirs = args.out or [str(harness.RESULTS_DIR)]
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = harness.environment(device)
    failed = False

    def save(rows):
        for out in out_dirs:
            harness.write_results(rows, out, bench=BENCH, key_fields=KEY_FIELDS)

    for dtype_name, n, hidden_size, vocab in cases:
        rows = run_case(dtype_name, n, hidden_size, vocab, device, args, env, deadline, save)
        failed |= any(r["status"].startswith("FAILED") for r in rows)
        print("\n" + format_case(rows) + "\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
