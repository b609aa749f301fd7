"""Where a policy-loss call's time goes: wall, host issue, kernels, ATen ops, launches and syncs per call.

    python -m rlhf_fast.bench.profile_ops [--device cuda|cpu] [--out DIR] [--cases logprobs,ppo,gspo,trl]
        [--calls N] [--budget-s S]

The benchmark (bench_policy_loss.py) times whole calls; on an H200 fused_policy_loss's forward took
2.89 ms where token_logprobs' took 0.91 ms, and its fwd+bwd 4.55 ms against 2.86 ms, with about 140
small [B, T] ATen ops per call beside the kernels. This profiles the calls with torch.profiler to say
whether the gap is the host issuing those ops, a synchronization, or kernel time. Cases, each for every
backend that can serve it (cuda: triton and cuda; cpu: host and torch), at the benchmark's shape
[16 x 1024 x 128256] bf16 on CUDA, [2 x 64 x 1000] float32 on a CPU (bench_policy_loss.py's inputs):

  logprobs fwd / fwd+bwd   rlhf_fast.token_logprobs with entropy, under no_grad / its backward fed the
                           loss's per-token gradient (the benchmark's token_logprobs/backend=<b> rows)
  ppo fwd+bwd              fused_policy_loss, objective ppo: the one-kernel path where the backend has
                           the policy_epilogue op
  ppo fwd                  the same under torch.no_grad: token_logprobs' kernel, then the [B, T] loss ops
  gspo fwd+bwd             objective gspo: the three-step path (forward kernel, [B, T] autograd,
                           backward kernel)
  trl <impl>               TRL's GRPOTrainer.compute_loss forward + backward, stock and after
                           rlhf_fast.integrations.trl.enable (bench_integrations.py's model, trainer
                           and batch); skipped, saying so, when trl does not import

Columns, per call:
  wall ms    N calls between two synchronizes, divided by N
  issue ms   host time to issue one call: perf_counter after a synchronize, none after the call (median)
  kernel ms  sum of the device kernels' durations (memcpy and memset not included)
  ops        ATen and rlhf_fast ops dispatched: top-level (called from Python or an autograd node) /
             all (nested ones too)
  launches   device kernels
  syncs      cuda{Stream,Device,Event}Synchronize and blocking cudaMemcpy calls; on a CPU, item() calls
             (aten::_local_scalar_dense)
  verdict    a rough reading, on CUDA: "sync" when the call waits on the device; "host" when issuing
             takes most of the wall time (the device starves); "kernels" when kernel time does; else
             "mixed"

Nothing here is checked against an oracle: the benchmark does that. gpu_check.sh runs this after the
benchmark, whose Triton compiles it finds in the cache; meant to take under 60 s on an H100/H200, not
yet timed there (per case 2 warm-up calls, N timed, max(3, N/2) issued one by one, 3 profiled). DIR gets profile.txt (the summary, then per
case the top host events by self CPU time, the ops by count and the top kernels), profile.json (the
summary rows) and a Chrome trace per case (trace-<case>.json.gz, for Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from rlhf_fast.backends.registry import can_serve

from . import bench_policy_loss as bpl
from . import harness

CASES = ("logprobs", "ppo", "gspo", "trl")
SHAPE = {"cuda": ({"B": 16, "T": 1024, "V": 128256}, torch.bfloat16), "cpu": ({"B": 2, "T": 64, "V": 1000}, torch.float32)}
BACKENDS = {"cuda": ("triton", "cuda"), "cpu": ("host", "torch")}
# Host calls that wait for the device. cudaMemcpy (not Async) blocks; PyTorch's blocking copies to the
# host are cudaMemcpyAsync + cudaStreamSynchronize, counted by the latter. Driver API names too (Triton).
SYNC_PREFIXES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
                 "cuCtxSynchronize", "cuEventSynchronize")  # fmt: skip
BLOCKING_COPIES = ("cudaMemcpy", "cudaMemcpy2D", "cuMemcpyDtoH", "cuMemcpyDtoH_v2")
CALL = "profile_ops::call"
OPS = ("aten::", "rlhf_fast::")  # what the dispatcher runs: ATen's ops and our custom ops
PROFILED = 3  # calls under the profiler (its traces grow with them)


@dataclass
class Result:
    case: str
    wall_ms: float
    issue_ms: float
    kernel_ms: float | None  # None on a CPU
    ops_top: float
    ops_all: float
    launches: float | None
    syncs: float
    items: float  # aten::_local_scalar_dense per call
    dtoh: float | None  # device-to-host copies per call (device events)
    calls: int
    top_cpu: list = field(default_factory=list)  # (name, count/call, self CPU ms/call, CPU total ms/call)
    top_count: list = field(default_factory=list)  # (name, count/call, self CPU ms/call)
    top_kernels: list = field(default_factory=list)  # (name, count/call, ms/call)

    @property
    def verdict(self) -> str:
        if self.kernel_ms is None:  # a CPU: no device to wait on or to starve
            return "-"
        if self.syncs:
            return "sync"
        if self.issue_ms >= 0.8 * self.wall_ms:
            return "host"
        if self.kernel_ms is not None and self.kernel_ms >= 0.8 * self.wall_ms:
            return "kernels"
        return "mixed"

    def line(self) -> str:
        kernel = "-" if self.kernel_ms is None else f"{self.kernel_ms:8.3f}"
        launches = "-" if self.launches is None else f"{self.launches:5.0f}"
        return (f"{self.case:<34} wall {self.wall_ms:8.3f} ms  issue {self.issue_ms:8.3f} ms  kernel {kernel:>8} ms  "
                f"ops {self.ops_top:4.0f}/{self.ops_all:<5.0f} launches {launches:>5}  syncs {self.syncs:3.0f}  "
                f"{self.verdict}")  # fmt: skip


def _outermost_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPS):
            return False
        parent = parent.cpu_parent
    return True


def _within(event, ranges) -> bool:
    return any(start <= event.time_range.start <= end for start, end in ranges)


def measure(name: str, call: Callable[[int], object], device: torch.device, calls: int, trace_dir: Path | None) -> Result:
    """Warm up, time ``calls`` calls and the issue of one, then profile a few more (see the module doc)."""
    for i in range(2):
        call(i)
    harness.synchronize(device)
    start = time.perf_counter()
    for i in range(calls):
        call(i)
    harness.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    issue = []
    for i in range(max(3, calls // 2)):
        harness.synchronize(device)
        start = time.perf_counter()
        call(i)
        issue.append((time.perf_counter() - start) * 1e3)
    harness.synchronize(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled = min(calls, PROFILED)
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(profiled):
            with record_function(CALL):
                call(i)
        harness.synchronize(device)  # the kernels finish inside the window; this sync is outside every call
    if trace_dir is not None:
        prof.export_chrome_trace(str(trace_dir / f"trace-{re.sub(r'[^A-Za-z0-9+_.]+', '-', name).strip('-')}.json.gz"))

    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == CALL]
    host = [e for e in events if e.device_type == DeviceType.CPU and e.name != CALL and _within(e, ranges)]
    ops = [e for e in host if e.name.startswith(OPS)]
    syncs = sum(e.name.startswith(SYNC_PREFIXES) or e.name in BLOCKING_COPIES for e in host)
    items = sum(e.name == "aten::_local_scalar_dense" for e in host)
    # The device timeline also holds the record_function ranges (gpu_user_annotation): not kernels.
    device_events = [e for e in events if e.device_type != DeviceType.CPU and e.name != CALL
                     and not getattr(e, "is_user_annotation", False)]  # fmt: skip
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    on_cuda = device.type == "cuda"

    per_name = {}
    for e in host:
        n, self_us, total_us = per_name.get(e.name, (0, 0.0, 0.0))
        per_name[e.name] = (n + 1, self_us + e.self_cpu_time_total, total_us + e.cpu_time_total)
    top_cpu = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:12]
    top_count = sorted(((k, v) for k, v in per_name.items() if k.startswith(OPS)), key=lambda kv: -kv[1][0])[:12]
    kernel_time, kernel_count = Counter(), Counter()
    for e in kernels:
        kernel_time[e.name] += e.time_range.elapsed_us()
        kernel_count[e.name] += 1
    return Result(
        case=name, wall_ms=wall_ms, issue_ms=statistics.median(issue),
        kernel_ms=sum(kernel_time.values()) / 1e3 / profiled if on_cuda else None,
        ops_top=sum(map(_outermost_op, ops)) / profiled, ops_all=len(ops) / profiled,
        launches=len(kernels) / profiled if on_cuda else None,
        syncs=(syncs if on_cuda else items) / profiled, items=items / profiled,
        dtoh=sum(e.name.startswith("Memcpy DtoH") for e in device_events) / profiled if on_cuda else None,
        calls=profiled,
        top_cpu=[(k, n / profiled, s / 1e3 / profiled, t / 1e3 / profiled) for k, (n, s, t) in top_cpu],
        top_count=[(k, n / profiled, s / 1e3 / profiled) for k, (n, s, _) in top_count],
        top_kernels=[(k, kernel_count[k] / profiled, us / 1e3 / profiled) for k, us in kernel_time.most_common(8)],
    )  # fmt: skip


# --------------------------------------------------------------------------- the cases


def policy_cases(device: torch.device, wanted: set[str]):
    """(name, call) for the token_logprobs and fused_policy_loss cases on every backend that serves them;
    (name, None, reason) for a backend that cannot."""
    dims, dtype = SHAPE[device.type]
    case = bpl.PolicyLossCase(dims, dtype, device)
    x = case.make_inputs(1)
    # The token_logprobs rows' upstream gradient: any [B, T] float32 will do (the benchmark's is the loss's).
    x.g_logp = -x.advantages[:, None] * x.mask / x.mask.sum()
    gspo = next(v for v in bpl.variants() if v.name == "gspo").options
    for backend in BACKENDS[device.type]:
        support = can_serve(backend, device, dtype, op="token_logprobs")
        if not support:
            yield f"{backend}", None, support.reason
            continue
        one_kernel = can_serve(backend, device, dtype, op="policy_epilogue")
        rows = []
        if "logprobs" in wanted:
            rows += [("logprobs fwd", bpl._logprobs_only(backend), "fwd"),
                     ("logprobs fwd+bwd", bpl._logprobs_only(backend), "fwd+bwd")]  # fmt: skip
        if "ppo" in wanted:
            path = "one-kernel" if one_kernel else "three-step"
            rows += [(f"ppo fwd+bwd ({path})", bpl._ours(bpl.POLICY, backend), "fwd+bwd"),
                     ("ppo fwd (no_grad)", bpl._ours(bpl.POLICY, backend), "fwd")]  # fmt: skip
        if "gspo" in wanted:
            rows.append(("gspo fwd+bwd (three-step)", bpl._ours(gspo, backend), "fwd+bwd"))
        for label, fn, mode in rows:
            yield f"{backend}: {label}", bpl.Step(fn, x, mode), None


def trl_cases(device: torch.device, model_dir: str):
    """(name, call) for TRL's loss, stock and with rlhf_fast, at bench_integrations.py's sizes."""
    from . import bench_integrations as bi

    args = bi.parse(["--device", device.type])
    bi.save_model(args, model_dir)
    for impl in ("trl-stock", "rlhf_fast"):
        trainer = bi.build_trainer(args, model_dir, impl)
        model, inputs = trainer.model, bi.batch(args, device)
        model.train()

        def call(i, trainer=trainer, model=model, inputs=inputs):
            model.zero_grad(set_to_none=True)
            trainer.compute_loss(model, inputs).backward()

        yield f"trl {impl}: loss fwd+bwd", call, None


# --------------------------------------------------------------------------- the report


def report(results: list[Result], notes: list[str], env: dict, header: str) -> str:
    lines = [header, f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}", ""]
    lines += [r.line() for r in results] + [f"not run: {n}" for n in notes] + [""]
    for r in results:
        lines.append(f"== {r.case}: {r.calls} profiled calls; per call: item() {r.items:g}, "
                     f"device-to-host copies {'-' if r.dtoh is None else f'{r.dtoh:g}'}")  # fmt: skip
        lines.append(f"  top host events by self CPU time (ms per call; profiler overhead included)")
        lines.append(f"    {'count':>6} {'self ms':>8} {'total ms':>8}  name")
        lines += [f"    {n:6.1f} {s:8.3f} {t:8.3f}  {k[:100]}" for k, n, s, t in r.top_cpu]
        lines.append("  ATen ops by count per call")
        lines += [f"    {n:6.1f} {s:8.3f}           {k[:100]}" for k, n, s in r.top_count]
        if r.top_kernels:
            lines.append("  top kernels by device time (ms per call)")
            lines += [f"    {n:6.1f} {ms:8.3f}           {k[:100]}" for k, n, ms in r.top_kernels]
        lines.append("")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="directory for profile.txt, profile.json and the traces (default: none)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--calls", type=int, default=None, help="timed calls per case (default 10 on CUDA, 3 on a CPU)")
    p.add_argument("--budget-s", type=float, default=50.0, help="start no case after this many seconds")
    args = p.parse_args(argv)
    args.cases = set(args.cases.split(","))
    if not args.cases <= set(CASES):
        p.error(f"--cases takes {','.join(CASES)}, got {','.join(sorted(args.cases - set(CASES)))}")
    args.calls = args.calls or (10 if args.device == "cuda" else 3)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_ops: no CUDA device", file=sys.stderr)
        return 2
    begin = time.perf_counter()
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    env = harness.environment(device)
    dims, dtype = SHAPE[device.type]
    header = (f"profile_ops: per call, {args.calls} calls a case; policy loss at [{dims['B']} x {dims['T']} x "
              f"{dims['V']}] {str(dtype).removeprefix('torch.')}")  # fmt: skip
    print(header, flush=True)
    results, notes = [], []

    def run(cases):
        for name, call, reason in cases:
            if call is None:
                notes.append(f"{name}: {reason}")
                print(f"{name}: not run, {reason}", flush=True)
                continue
            if time.perf_counter() - begin > args.budget_s:
                notes.append(f"{name}: the {args.budget_s:g} s budget was spent")
                print(f"{name}: not run, the {args.budget_s:g} s budget was spent", flush=True)
                continue
            results.append(measure(name, call, device, args.calls, out))
            print(results[-1].line(), flush=True)
            if out is not None:  # after each case, so that a run cut short leaves what it measured
                (out / "profile.txt").write_text(report(results, notes, env, header))
                rows = [{k: v for k, v in vars(r).items() if not k.startswith("top_")} | {"verdict": r.verdict}
                        for r in results]  # fmt: skip
                (out / "profile.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))

    run(policy_cases(device, args.cases))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "trl" in args.cases and time.perf_counter() - begin > args.budget_s - 20:  # its model and trainers: ~20 s
        notes.append(f"trl: the {args.budget_s:g} s budget was spent")
        print(f"trl: not run, the {args.budget_s:g} s budget was spent", flush=True)
    elif "trl" in args.cases:
        try:
            import trl  # noqa: F401
        except ImportError as error:
            notes.append(f"trl: cannot be imported ({error})")
            print(f"trl: not run, it cannot be imported ({error})", flush=True)
        else:
            with tempfile.TemporaryDirectory(prefix="profile_ops_model_") as model_dir:
                run(trl_cases(device, model_dir))
    if out is not None:
        (out / "profile.txt").write_text(report(results, notes, env, header))
        print(f"profile_ops: {time.perf_counter() - begin:.0f} s; report in {out / 'profile.txt'}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
