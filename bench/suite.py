"""The benchmark driver: every op family, every backend and baseline, forward and forward+backward.

    python -m rlhf_fast.bench [--quick] [--device cpu|cuda] [--ops OPS] [--shapes SHAPES] [--impls PATTERNS]
    rlhf-fast bench ...                 (the same command)
    python -m rlhf_fast.bench --list              (the cases and implementations it would run, and why some can't)
    python -m rlhf_fast.bench --rl-step [--vocab V ...]   (one RL step end to end; bench_rl_step.py)

Ops: logprobs, logprobs_entropy (token_logprobs), policy_loss (fused_policy_loss), linear_logprobs,
linear_sft, linear_policy_loss (the lm_head fused with the loss), gae, ppo_advantages,
group_advantages, pairwise (reward-model loss). One family module per op family defines its cases
(shapes, implementations, oracle, the work it counts) and nothing else: bench_logprobs.py,
bench_policy_loss.py, bench_fused_linear.py, bench_advantages.py, bench_pairwise.py.

For every case (op, shape, dtype) and implementation:
1. verified against the oracle on the same input values (float64 reference; see each family):
   one of ours out of tolerance is FAILED and not timed; a baseline or peer out of tolerance is
   timed and marked "inexact" (a fast wrong kernel is a failure, not a win);
2. timed after a warm-up: CUDA, events around each run, one synchronisation at the end; CPU, the
   implementations of a case in turn, round after round, so that the load of a shared machine
   falls on all alike. Median and p10-p90 over the runs; inputs rotate over enough copies to span
   twice the last-level cache (harness.input_copies);
3. measured for peak memory beyond its inputs (CUDA: allocator peak; CPU: RSS high-water mark, in
   this process after timing, or with --memory-workers N each in a fresh process);
4. set against the device: achieved bandwidth (bytes the op must move / time) over the measured
   copy bandwidth, or FLOP rate over the measured matmul rate for the linear-head ops; and against
   eager PyTorch (and torch.compile, or the family's other baselines) measured in the same run.

Rows go to <out>/<date>-<device>-suite.json (rows of the same day and key are replaced) and are
appended to <out>/suite.csv (every run); the Markdown report <out>/<date>-<device>.md with PNG
plots under <out>/plots/ is rebuilt from the day's rows (bench/report.py). --tables also prints
each case's table as soon as it is measured; `python -m rlhf_fast.bench.report --summary` prints
the headline tables of the newest results.

--quick: the headline shape of every op and small vocabulary / token sweeps, fewer repeats;
torch.compile runs on the headline cases of the log-prob ops only (on a GPU, token_logprobs
only: a compile there costs a large share of gpu_check.sh's budget), and TRL's row loop and
torch.compile are left out of sweep cases; on a CPU, policy_loss's per-objective rows are a
sample of three (a GPU's quick run, and --shapes tiny, have them all). --shapes tiny: toy shapes, a few runs per measurement
(the CI test's smoke run). --chunk-size C (repeatable): the linear-head ops also time chunk_size=C
(rows "auto-c<C>"), the memory / time trade of the chunk.

--rl-step: instead of the cases, one RL step (rollout and update of a small Llama, GRPO) with the
fused ops against the same loop on plain PyTorch (bench_rl_step.py); rows in
<out>/<date>-<device>-rl_step.json. Only --device, --out and the options of its group apply.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import signal
import sys
import time
from pathlib import Path

import torch

from rlhf_fast.extras import require

from . import (
    bench_advantages,
    bench_fused_linear,
    bench_logprobs,
    bench_pairwise,
    bench_policy_loss,
    bench_rl_step,
    harness,
    report,
)
from .case import MODES, TAGS, Case, Impl, timed

BENCH = "suite"
KEY_FIELDS = ("op", "dtype", "shape", "impl", "mode")
FAMILIES = (bench_logprobs, bench_policy_loss, bench_fused_linear, bench_advantages, bench_pairwise)
OPS: dict[str, object] = {op: module for module in FAMILIES for op in module.CASES}
# Run order: headline cases first, those with targets still to measure on a GPU before those already
# measured (token_logprobs), so that a run cut short by --deadline-s still has them; then the sweeps.
PRIORITY = ("policy_loss", "gae", "linear_policy_loss", "linear_logprobs", "logprobs", "ppo_advantages",
            "group_advantages", "linear_sft", "logprobs_entropy", "pairwise")  # fmt: skip
LOGITS_OPS = ("logprobs", "logprobs_entropy", "policy_loss", "linear_logprobs", "linear_sft", "linear_policy_loss")
SHAPE_WORDS = ("all", "tiny", "sweeps") + TAGS


# --------------------------------------------------------------------------- which cases


def parse_shapes(text: str | None):
    """--shapes: words (headline, sweep-vocab, sweep-tokens, sweeps, all, tiny) and explicit shapes
    "AxB[xC]" or "op:AxB", comma-separated. Returns (tags or None for all, tiny?, [(op or None, dims)])."""
    if not text:
        return None, False, []
    tags, tiny, explicit = set(), False, []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "tiny":
            tiny = True
        elif item == "all":
            tags.update(TAGS)
        elif item == "sweeps":
            tags.update(("sweep-vocab", "sweep-tokens"))
        elif item in TAGS:
            tags.add(item)
        else:
            op, _, dims = item.rpartition(":")
            try:
                values = tuple(int(v) for v in dims.lower().split("x"))
            except ValueError:
                raise SystemExit(
                    f"--shapes: {item!r} is neither one of {', '.join(SHAPE_WORDS)} nor a shape like 512x32000 "
                    "or logprobs:512x32000"
                ) from None
            if op and op not in OPS:
                raise SystemExit(f"--shapes: unknown op {op!r} in {item!r}; ops: {', '.join(OPS)}")
            explicit.append((op or None, values))
    return (tags or None), tiny, explicit


def build_cases(args, device: torch.device) -> list[Case]:
    tags, tiny, explicit = parse_shapes(args.shapes)
    cases: list[Case] = []
    for op in args.ops:
        module = OPS[op]
        table = module.SHAPES[op]["tiny" if tiny else (device.type, args.quick)]
        dtype = module.DTYPES[device.type]
        if args.dtype and op in LOGITS_OPS:
            dtype = getattr(torch, args.dtype)
        chosen: dict[tuple, set] = {}
        if tags is not None or not explicit:
            for dims, row_tags in table:
                if tags is None or tags & set(row_tags):
                    chosen.setdefault(tuple(dims.items()), set()).update(row_tags)
        names = list(table[0][0])
        for want_op, values in explicit:
            if want_op in (None, op) and len(values) == len(names):
                chosen.setdefault(tuple(zip(names, values)), set()).add("custom")
            elif want_op == op:
                raise SystemExit(f"--shapes: {op} takes {'x'.join(names)}, got {'x'.join(map(str, values))}")
        for dims, row_tags in chosen.items():
            ordered = tuple(t for t in TAGS + ("custom",) if t in row_tags)
            cases.append(module.CASES[op](dict(dims), dtype, device, ordered, chunk_sizes=args.chunk_size))
    rank = {op: i for i, op in enumerate(PRIORITY)}
    cases.sort(key=lambda c: ("headline" not in c.tags, rank.get(c.op, 99)))
    return cases


def _matches(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selected(case: Case, impl: Impl, args) -> bool:
    """--impls / --skip-impls, and what the quick run leaves out (see the module docstring)."""
    if not _matches(impl.name, args.impls) or (args.skip_impls and _matches(impl.name, args.skip_impls)):
        return False
    tiny = "tiny" in (getattr(args, "shapes", None) or "").split(",")
    if args.quick and not tiny and impl.quick_devices is not None and case.device.type not in impl.quick_devices:
        return False  # a tiny run is the smoke test that keeps every row from rotting: it keeps them
    if args.quick and impl.slow:
        if "headline" not in case.tags:
            return False
        if impl.name == "compile" and case.device.type not in case.compile_in_quick:
            return False
    return True


# --------------------------------------------------------------------------- one case


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _release(device: torch.device, collect: bool = False) -> None:
    """Return cached memory; ``collect`` also runs the cycle collector (0.2 s with torch.compile loaded)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_round_robin(steps, args) -> list[harness.Timing]:
    """CPU: the steps of a case timed in turn, one run of each per round, after a warm-up round."""
    for step in steps:
        step(0)
    times: list[list[float]] = [[] for _ in steps]
    rounds, r = args.min_reps, 0
    while r < rounds:
        for k, step in enumerate(steps):
            start = time.perf_counter()
            step(r + 1)
            times[k].append((time.perf_counter() - start) * 1e3)
        if r == 0:  # the first timed round sets the count: about budget_s per step, within the bounds
            per_round = sum(t[0] for t in times) * 1e-3
            rounds = max(args.min_reps, min(args.max_reps, int(args.budget_s * len(steps) / max(per_round, 1e-6))))
        r += 1
    return [harness.summarize_times(t) for t in times]


def run_case(case: Case, args, env: dict, copy_gbps: float, deadline: float | None) -> list[dict]:
    device = case.device
    copies = harness.input_copies(case.input_bytes(), device, max_copies=args.max_copies)
    impls = [impl for impl in case.implementations() if selected(case, impl, args)]
    if any(impl.name.startswith("compile") and impl.skip is None for impl in impls):
        torch._dynamo.reset()  # compile afresh per case (dynamic=False), within the recompile limit
    modes = [m for m in args.modes if m in case.modes]
    dtype_name = str(case.dtype).removeprefix("torch.")
    base = dict(env, bench=BENCH, op=case.op, dtype=dtype_name, shape=list(case.dims.values()), dims=case.dims,
                label=case.label, tags=list(case.tags), copies=copies, quick=args.quick, copy_gbps=copy_gbps)  # fmt: skip
    rows: list[dict] = []
    print(f"== {case!r} {','.join(case.tags)}: {len(impls)} implementations, {copies} input copies", flush=True)
    if not impls or not modes:
        return rows
    ceiling = None
    if any(case.work(m)[1] for m in modes):
        ceiling = case.flop_ceiling_tflops()

    def row(impl: Impl, mode: str, status: str, timing=None, check=None, **extra) -> dict:
        nbytes, flops = case.work(mode)
        fields = dict(base, impl=impl.name, ours=impl.ours, mode=mode, status=status, verified=status == "ok")
        fields.update(harness.as_dict(timing), bytes=nbytes, flops=flops, flop_ceiling_tflops=ceiling)
        if check is not None:
            fields.update(check.fields(mode))
        if timing is not None:
            fields.update(row_rates(fields, timing, copy_gbps, ceiling))
        fields.update(extra)
        return fields

    inputs = case.make_inputs(copies)
    expected = case.oracle(inputs)
    eager_check = None
    eager = next((i for i in case.implementations() if i.name == "eager"), None)
    if eager is not None and not any(i.name == "eager" for i in impls) and eager.make is not None:
        try:  # eager's own error sets the tolerances, so it is checked even when it is not timed
            eager_check = case.check(eager, eager.make(), inputs, expected, None, "fwd+bwd" in modes)
        except Exception as error:  # e.g. out of memory: the tolerances fall back to the floors
            print(f"   eager could not run for the tolerances: {_short(error)}", flush=True)
        finally:
            _release(device)
    pending: dict[str, list] = {mode: [] for mode in modes}  # CPU: (row, step) timed together below
    for impl in impls:
        impl_modes = [m for m in modes if m in impl.modes]
        if impl.skip is not None:
            rows += [row(impl, mode, f"skipped: {impl.skip}") for mode in impl_modes]
            continue
        if deadline is not None and time.monotonic() > deadline:
            rows += [row(impl, mode, f"skipped: time budget spent (--deadline-s {args.deadline_s})") for mode in impl_modes]
            continue
        check, done = None, set()
        try:
            fn = impl.make()
            target = case.inputs_for(impl, inputs)
            check = case.check(impl, fn, target, expected, eager_check, "fwd+bwd" in impl_modes)
            if impl.name == "eager":
                eager_check = check
            for mode in impl_modes:
                problem = check.problem(mode)
                if problem and impl.ours:
                    rows.append(row(impl, mode, f"FAILED: {problem}", check=check))
                    done.add(mode)
                    continue
                status = "ok" if problem is None else f"inexact: {problem}"
                step = case.step(fn, target, mode)
                if device.type == "cuda":
                    timing = harness.time_step(step, device, copies=copies, warmup=1, min_reps=args.min_reps,
                                               max_reps=args.max_reps, budget_s=args.budget_s)  # fmt: skip
                    peak = harness.cuda_peak_mb(step, device) if not args.no_memory else None
                    step.clear()
                    rows.append(row(impl, mode, status, timing, check, peak_mb=peak))
                else:
                    rows.append(row(impl, mode, status, check=check))
                    pending[mode].append((rows[-1], step))
                done.add(mode)
            print(f"   {impl.name}: {'; '.join(r['status'] for r in rows[-len(done):]) if done else '-'}", flush=True)
        except Exception as error:  # one implementation's failure is a row, not the end of the run
            if _is_oom(error):
                status = f"OOM: {_short(error, 160)}"
            elif impl.name.startswith("compile"):
                status = f"skipped: torch.compile failed: {_short(error)}"
            else:
                status = f"FAILED: {_short(error)}"
            print(f"   {impl.name}: {status}", flush=True)
            rows += [row(impl, mode, status, check=check) for mode in impl_modes if mode not in done]
        finally:
            _release(device)
    for mode, todo in pending.items():
        if not todo:
            continue
        try:
            timings = time_round_robin([step for _, step in todo], args)
        except Exception:  # a step that ran once fails on a later copy: time them one by one to find it
            timings = []
            for r, step in todo:
                try:
                    timings.append(harness.time_step(step, device, copies=copies, warmup=1, min_reps=args.min_reps,
                                                     max_reps=args.max_reps, budget_s=args.budget_s))  # fmt: skip
                except Exception as error:
                    r.update(status=f"FAILED: {_short(error)}", verified=False)
                    timings.append(None)
        for (r, step), timing in zip(todo, timings):
            if timing is None:
                continue
            r.update(harness.as_dict(timing), **row_rates(r, timing, copy_gbps, ceiling))
            if not args.no_memory and not args.memory_workers:
                peak = harness.rss_peak_mb(step, warmup=False)
                r["peak_mb" if not isinstance(peak, str) else "peak_mb_error"] = peak
            step.clear()
    del inputs, expected, pending
    _release(device, collect=copies * case.input_bytes() > 2**26)  # large inputs: free them now
    if device.type == "cpu" and not args.no_memory and args.memory_workers:
        fresh_process_peaks(case, rows, args.memory_workers)
    add_ratios(rows, case)
    case.annotate(rows)
    return rows


def memory_step(op: str, dims: dict, dtype: str, impl: str, mode: str, chunk_sizes=(), device: str = "cpu"):
    """One case's step rebuilt from plain values, for a fresh process (--memory-workers; harness.cpu_peak_mb)."""
    case = OPS[op].CASES[op](dims, getattr(torch, dtype), torch.device(device), chunk_sizes=chunk_sizes)
    chosen = next(i for i in case.implementations() if i.name == impl)
    inputs = case.make_inputs(1)
    case.oracle(inputs)  # a step may take the oracle's upstream gradient (policy_loss's token_logprobs rows)
    return case.step(chosen.make(), case.inputs_for(chosen, inputs), mode)


def fresh_process_peaks(case: Case, rows: list[dict], workers: int) -> None:
    """CPU, --memory-workers: the peak RSS growth of each timed row, each in a fresh process, ``workers`` at once."""
    todo = [r for r in rows if timed(r)]
    kwargs = [dict(op=case.op, dims=case.dims, dtype=r["dtype"], impl=r["impl"], mode=r["mode"],
                   chunk_sizes=case.chunk_sizes) for r in todo]  # fmt: skip
    peaks = harness.cpu_peak_mb(f"{__package__}.suite:memory_step", kwargs, workers=workers)
    for r, peak in zip(todo, peaks):
        r["peak_mb" if not isinstance(peak, str) else "peak_mb_error"] = peak


def row_rates(r: dict, timing: harness.Timing, copy_gbps: float, ceiling: float | None) -> dict:
    """Achieved bandwidth (bytes the op must move / median) and FLOP rate, and the fraction of the
    device ceiling: the matmul rate for a FLOP-bound op, else the copy bandwidth."""
    if not timing.median_ms > 0:
        return {}
    out = {"gbps": harness.gbps(r["bytes"], timing.median_ms)}
    out["tflops"] = r["flops"] / (timing.median_ms * 1e-3) / 1e12 if r["flops"] else None
    if out["tflops"] and ceiling:
        out["frac_ceiling"], out["ceiling"] = out["tflops"] / ceiling, "matmul"
    elif copy_gbps:
        out["frac_ceiling"], out["ceiling"] = out["gbps"] / copy_gbps, "copy"
    return out


def add_ratios(rows: list[dict], case: Case) -> None:
    """ratio_vs_<impl> = that impl's median / this median (> 1: faster), same case and mode; and
    mem_vs_eager = peak / eager's peak."""
    by = {(r["impl"], r["mode"]): r for r in rows if timed(r)}
    for r in rows:
        if not timed(r):
            continue
        for ref in case.ratio_to:
            other = by.get((ref, r["mode"]))
            r[f"ratio_vs_{ref}"] = other["median_ms"] / r["median_ms"] if other else None
        eager = by.get(("eager", r["mode"]))
        if eager and eager.get("peak_mb") and r.get("peak_mb") is not None:
            r["mem_vs_eager"] = r["peak_mb"] / eager["peak_mb"]


# --------------------------------------------------------------------------- command line


def default_out() -> Path:
    """bench/results of the checkout; ./bench-results when running from an installed package."""
    return harness.RESULTS_DIR if (harness.REPO_ROOT / "setup.py").exists() else Path.cwd() / "bench-results"


def build_parser() -> argparse.ArgumentParser:
    head, body = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="rlhf-fast bench", description=head, epilog=body,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when torch sees a GPU, else cpu")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few-minute run: headline shapes and small sweeps")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--shapes", help=f"comma-separated: {', '.join(SHAPE_WORDS)}, or shapes AxB[xC] / op:AxB")
    p.add_argument("--impls", help="comma-separated name patterns to run (fnmatch: 'eager,backend=*')")
    p.add_argument("--skip-impls", help="comma-separated name patterns to leave out (e.g. compile)")
    p.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd or both")
    p.add_argument("--dtype", help="dtype of the logits / lm_head ops (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--out", action="append", help="results directory, repeatable (default: the checkout's tracked bench/results, "
                   "./bench-results when installed from a wheel)")
    p.add_argument("--budget-s", type=float, help="timing budget per measurement (default 1, quick 0.3)")
    p.add_argument("--min-reps", type=int, help="timed runs even when one run exceeds the budget (default 5, quick 3)")
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--max-copies", type=int, default=8, help="most input copies rotated to defeat the cache")
    p.add_argument("--chunk-size", type=int, action="append", default=[],
                   help="linear-head ops: also time chunk_size=C (row auto-c<C>); repeatable")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-workers", type=int, help="CPU: measure each row's peak memory in a fresh process, "
                   "this many at once (default: in this process, after timing)")  # fmt: skip
    p.add_argument("--no-report", action="store_true", help="write the rows only (no Markdown report, no plots)")
    p.add_argument("--deadline-s", type=float, help="start no new implementation after this many seconds")
    p.add_argument("--list", action="store_true", help="print the cases and implementations, run nothing")
    p.add_argument("--tables", action="store_true", help="print each case's table as soon as it is measured")
    rl = p.add_argument_group("one RL step end to end (bench_rl_step.py); defaults on CUDA / on a CPU")
    rl.add_argument("--rl-step", action="store_true", help="run the RL step instead of the cases")
    rl.add_argument("--vocab", type=int, help="default 128256 / 32000")
    rl.add_argument("--hidden", type=int, help="default 1024 / 256")
    rl.add_argument("--layers", type=int, default=2)
    rl.add_argument("--batch", type=int, help="sequences (groups of 4); default 64 / 16")
    rl.add_argument("--micro-batch", type=int, help="sequences per forward/backward (default: the batch)")
    rl.add_argument("--prompt-len", type=int, default=64)
    rl.add_argument("--new-tokens", type=int, help="default 256 / 32")
    rl.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up round")
    return p


def _patterns(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def list_cases(cases: list[Case], args) -> None:
    for case in cases:
        print(f"{case!r}  [{', '.join(case.tags)}]")
        for impl in case.implementations():
            if impl.skip is not None:
                print(f"    {impl.name:34s} skipped: {impl.skip}")
            elif selected(case, impl, args):
                print(f"    {impl.name:34s} {'/'.join(m for m in args.modes if m in case.modes and m in impl.modes)}")


def run_rl_step(args, out_dirs: list[Path]) -> int:
    """--rl-step: bench_rl_step.py's fused and eager rows (medians over the repeats), written to every --out."""
    for name, (on_cuda, on_cpu) in bench_rl_step.SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if args.device == "cuda" else on_cpu)
    rows = bench_rl_step.summarize(bench_rl_step.run(args))
    paths = [harness.write_results(rows, out, bench=bench_rl_step.BENCH, key_fields=bench_rl_step.KEY_FIELDS)
             for out in out_dirs]  # fmt: skip
    for r in rows:
        mem = "" if r["update_peak_mb"] is None else f"  update peak {r['update_peak_mb']:.0f} MiB  logprobs peak {r['logprobs_peak_mb']:.0f} MiB"
        print(f"{r['impl']:<6} rollout {r['rollout_tokens_per_s']:>9.0f} tok/s (generate {r['generate_s']:.2f}s + logprobs {r['logprobs_s']:.3f}s)"
              f"  update {r['update_tokens_per_s']:>9.0f} tok/s ({r['update_s']:.3f}s){mem}")  # fmt: skip
    print(f"update speedup fused vs eager: {rows[0]['update_speedup_vs_eager']:.2f}x   results: {', '.join(map(str, paths))}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    require("bench", "the benchmark suite")  # its report draws plots
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if unknown := [op for op in args.ops if op not in OPS]:
        raise SystemExit(f"--ops takes a comma-separated subset of {','.join(OPS)}; got {','.join(unknown)}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        raise SystemExit(f"--modes takes fwd, fwd+bwd or both; got {args.modes}")
    args.impls, args.skip_impls = _patterns(args.impls), _patterns(args.skip_impls)
    if args.dtype and not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise SystemExit(f"--dtype must name a torch dtype (float32, bfloat16, float16); got {args.dtype!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    out_dirs = [Path(p) for p in (args.out or [default_out()])]
    if args.rl_step:
        return run_rl_step(args, out_dirs)
    tiny = bool(args.shapes) and "tiny" in args.shapes.split(",")
    # A tiny run is a smoke test of the whole pipeline: a few runs per measurement.
    args.budget_s = args.budget_s if args.budget_s is not None else (0.01 if tiny else 0.3 if args.quick else 1.0)
    args.min_reps = args.min_reps if args.min_reps is not None else (2 if tiny else 3 if args.quick else 5)
    cases = build_cases(args, device)
    if args.list:
        list_cases(cases, args)
        return 0
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    # SIGTERM (from `timeout`) exits through the finally below: rows, CSV and report are written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    if device.type == "cpu" and not args.no_memory:
        harness.pin_malloc_thresholds()  # before the inputs are made: see harness.rss_peak_mb
    env = harness.environment(device)
    copy_gbps = harness.copy_bandwidth_gbps(device, 32 * 2**20 if tiny else None)
    print(f"{env['device_name']}: copy bandwidth {copy_gbps:.1f} GB/s (read + write); {len(cases)} cases", flush=True)
    all_rows: list[dict] = []
    try:
        for case in cases:
            if deadline is not None and time.monotonic() > deadline:
                print(f"== {case!r}: not run, time budget spent (--deadline-s {args.deadline_s})", flush=True)
                continue
            try:
                rows = run_case(case, args, env, copy_gbps, deadline)
            except Exception as error:  # inputs or oracle failed (e.g. out of memory): the case says so
                print(f"== {case!r}: FAILED before any implementation ran: {_short(error)}", flush=True)
                rows = [dict(env, bench=BENCH, op=case.op, dtype=str(case.dtype).removeprefix("torch."),
                             shape=list(case.dims.values()), dims=case.dims, label=case.label, tags=list(case.tags),
                             impl="(case)", mode=mode, status=f"{'OOM' if _is_oom(error) else 'FAILED'}: {_short(error)}",
                             verified=False, median_ms=None) for mode in args.modes]  # fmt: skip
                _release(device)
            all_rows += rows
            if args.tables:
                for label, dtype, rs in report.cases_of(rows, case.op):
                    print(f"\n{report.case_heading(label, dtype, rs)}\n\n{report.case_table(rs)}\n", flush=True)
                if any(r.get("target_ratio") for r in rows):
                    print(f"per objective, fwd+bwd over token_logprobs:\n\n{report.objectives_table(rows)}\n", flush=True)
            if all_rows:
                for out in out_dirs:
                    harness.write_results(all_rows, out, bench=BENCH, key_fields=KEY_FIELDS)
    finally:
        if all_rows:
            for out in out_dirs:
                harness.append_csv(all_rows, out / "suite.csv", report.CSV_FIELDS)
                if not args.no_report:
                    path = report.write_report(out, env["device_name"], env["date"])
                    print(f"report: {path}", flush=True)
            print("results: " + ", ".join(str(harness.results_path(out, BENCH, env["device_name"], env["date"]))
                                          for out in out_dirs), flush=True)  # fmt: skip
    failed = [r for r in all_rows if r["status"].startswith("FAILED")]
    for r in failed:
        print(f"FAILED {r['op']} {r['label']} {r['impl']} {r['mode']}: {r['status']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
