"""The demo on a CPU shared with busy processes: how its time grows with the load.

    python -m rlhf_fast.bench.bench_contention [--busy 0 2 4] [--fixed-threads] [--repeats N] [--out DIR]

Each run is ``rlhf-fast demo`` in a fresh output directory (a subprocess, no progress bar) while N
processes spin a core each (``while True: pass``). Reported per N: the wall time (median of the
repeats), the CPU time the demo used, the ratio to the quiet (N = 0) wall time, and the target of
the hardening issue: with N busy processes at most (N + 2) / 2 times the quiet time, plus 20%.

``--fixed-threads`` also runs every case with OMP_NUM_THREADS set to the CPU count: torch's thread
pool at its start-up size, which the training commands otherwise fit to the free CPUs
(``rlhf_fast/train/threads.py``). Rows go to ``<out>/<date>-<cpu>-contention.json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from . import harness

BENCH = "contention"
KEY_FIELDS = ("busy", "threads")


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_demo(env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one demo run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_contention_") as out:
        subprocess.run([sys.executable, "-m", "rlhf_fast", "demo", "--out", out, "--no-progress"], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(busy: int, threads: str, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads == "fixed":
        env["OMP_NUM_THREADS"] = str(os.cpu_count())
    spinners = busy_processes(busy)
    try:
        time.sleep(1.0)  # the spinners running before the demo starts
        runs = [run_demo(env) for _ in range(repeats)]
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return {"busy": busy, "threads": threads, "wall_s": statistics.median(w for w, _ in runs),
            "cpu_s": statistics.median(c for _, c in runs), "repeats": repeats}  # fmt: skip


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 2, 4], help="numbers of busy processes (0 is added)")
    p.add_argument("--fixed-threads", action="store_true", help="also run with torch's thread pool at its start-up size")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", action="append", help="results directory (repeatable; default bench/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    env = harness.environment("cpu")
    rows = []
    for threads in ("fitted", "fixed") if args.fixed_threads else ("fitted",):
        for busy in sorted(set(args.busy) | {0}):
            row = env | measure(busy, threads, args.repeats)
            rows.append(row)
            print(f"{threads:<7} busy {busy}: {row['wall_s']:6.1f} s wall, {row['cpu_s']:6.1f} s CPU", flush=True)
    quiet = {r["threads"]: r["wall_s"] for r in rows if r["busy"] == 0}
    for r in rows:
        r["x_quiet"] = r["wall_s"] / quiet[r["threads"]]
        r["target_x"] = 1.2 * (r["busy"] + 2) / 2
        r["meets_target"] = r["x_quiet"] <= r["target_x"]
    paths = [harness.write_results(rows, out, bench=BENCH, key_fields=KEY_FIELDS) for out in args.out or [harness.RESULTS_DIR]]
    print(f"\n{env['device_name']}, {os.cpu_count()} CPUs, torch threads {env['cpu_threads']}")
    for r in rows:
        print(f"{r['threads']:<7} busy {r['busy']}: x{r['x_quiet']:.2f} of quiet (target <= x{r['target_x']:.2f}: "
              f"{'met' if r['meets_target'] else 'MISSED'})")  # fmt: skip
    print("results:", ", ".join(map(str, paths)))
    return 0 if all(r["meets_target"] for r in rows if r["threads"] == "fitted") else 1


if __name__ == "__main__":
    sys.exit(main())
