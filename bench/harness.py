"""What the benchmark driver and its families share: device, timing, peak memory, bandwidth, results.

A case builds a *step*: a callable ``step(i)`` that runs the measured work once on copy ``i`` of
its inputs (optionally with a ``clear()`` method that drops gradients between runs). The harness
times it, measures its peak memory and writes rows of results; the family module decides what a
step is and how its output is verified against ``rlhf_fast.reference``.

Conventions: times in milliseconds; bandwidth in GB/s = 1e9 bytes/s; memory in MiB = 2^20 bytes
(the ``peak_mb`` field). Peak memory is measured beyond the inputs, so it counts the outputs,
the gradients and every intermediate the step allocates.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MIB = 2**20

# --------------------------------------------------------------------------- where we run


def device_name(device: torch.device | str) -> str:
    """GPU name from the driver, or the CPU model from /proc/cpuinfo (platform string elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; '(R)' and '(TM)' marks dropped."""
    name = re.sub(r"\((r|tm|c)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def git_commit() -> tuple[str, bool | None]:
    """(short commit, working tree dirty?) of the repository.

    RLHF_FAST_COMMIT, when set, wins: a tree copied to a remote machine may carry a stale .git
    (its HEAD is not the copied files' commit). Outside a git checkout and without it, "unknown".
    Dirtiness is unknown (None) unless git answered.
    """
    if os.environ.get("RLHF_FAST_COMMIT"):
        return os.environ["RLHF_FAST_COMMIT"], None
    fallback = "unknown", None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return fallback
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return fallback


def triton_version() -> str:
    try:
        import triton
    except Exception as error:  # a broken install may raise anything; it is a fact to record, not a crash
        return f"unavailable ({type(error).__name__})"
    return triton.__version__


def driver_version(device: torch.device | str) -> str | None:
    """NVIDIA driver version of a CUDA device (from the kernel module, else nvidia-smi); None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    try:
        # "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build ..."
        match = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s", Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match[1]
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """The facts every result row records: device, versions, commit, date."""
    device = torch.device(device)
    commit, dirty = git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "driver": driver_version(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "cpu_threads": torch.get_num_threads(),
        # Other work on a shared host skews CPU timings; the 1-minute load at the start says how much.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- inputs


def last_level_cache_bytes(device: torch.device | str) -> int:
    """L2 of the GPU, or the largest CPU cache listed in sysfs (32 MiB when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * MIB))
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if match:
            sizes.append(int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]])
    return max(sizes, default=32 * MIB)


def input_copies(bytes_per_copy: int, device: torch.device | str, *, max_copies: int = 8) -> int:
    """How many copies of the inputs to rotate through so that a timed run starts with a cold cache.

    Enough copies to span twice the last-level cache: run i reads copy i % k, which was evicted
    by the k - 1 runs in between. Inputs far larger than the cache need one copy.
    """
    need = math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_copy, 1))
    return max(1, min(max_copies, need))


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(times_ms: Sequence[float]) -> Timing:
    ordered = sorted(times_ms)
    return Timing(statistics.median(ordered), _quantile(ordered, 0.1), _quantile(ordered, 0.9), len(ordered))


def time_step(
    step: Callable[[int], Any],
    device: torch.device | str,
    *,
    copies: int = 1,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 100,
    budget_s: float = 1.0,
) -> Timing:
    """Median and p10/p90 of ``step(i % copies)`` after ``warmup`` runs.

    The repetition count fills about ``budget_s`` seconds, within [min_reps, max_reps] (slow steps
    get min_reps, however long that takes). CUDA: a pair of events around each run, read after a
    single synchronisation at the end, so the host never stalls the queue between runs (a step
    that synchronises internally shows it as time). CPU: perf_counter around each (synchronous) run.
    """
    device = torch.device(device)
    for i in range(warmup):
        step(i % copies)
    synchronize(device)
    start = time.perf_counter()
    step(warmup % copies)
    synchronize(device)
    estimate = time.perf_counter() - start
    reps = max(min_reps, min(max_reps, int(budget_s / max(estimate, 1e-6))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            step(i % copies)
            end.record()
        torch.cuda.synchronize(device)
        return summarize_times([begin.elapsed_time(end) for begin, end in events])
    times = []
    for i in range(reps):
        start = time.perf_counter()
        step(i % copies)
        times.append((time.perf_counter() - start) * 1e3)
    return summarize_times(times)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured ``dst.copy_(src)`` bandwidth, counting read + write (2 * nbytes per copy).

    The practical ceiling for a streaming kernel: a kernel that reads its input once moves
    nbytes, so its time can not beat nbytes / this bandwidth.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 256 * MIB
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_step(lambda i: dst.copy_(src), device, warmup=3, min_reps=10, max_reps=200, budget_s=0.5)
    del src, dst
    return gbps(2 * nbytes, timing.median_ms)


# --------------------------------------------------------------------------- peak memory


def _clear(step) -> None:
    clear = getattr(step, "clear", None)
    if clear is not None:
        clear()


def cuda_peak_mb(step: Callable[[int], Any], device: torch.device | str) -> float:
    """Peak CUDA memory allocated by one ``step(0)`` beyond what was allocated before it, in MiB."""
    _clear(step)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _clear(step)
    return peak / MIB


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match[1])


def _peak_rss_child(target: str, kwargs: dict[str, Any]) -> float:
    """In a fresh process: build the step, run it once to warm up, then measure a second run.

    Peak resident memory growth of the measured run: VmHWM after it minus VmRSS before it, with
    the high-water mark reset to the current RSS in between (writing "5" to clear_refs, Linux
    >= 4.0). PyTorch's CPU allocator returns large blocks to the OS (glibc serves them with
    mmap), so RSS follows the tensors alive at each moment.
    """
    module, _, name = target.partition(":")
    step = getattr(importlib.import_module(module), name)(**kwargs)
    step(0)  # compilation, lazy imports, thread pools: paid once, not part of the op's footprint
    _clear(step)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step(0)
    peak = _status_kib("VmHWM")
    return (peak - before) * 1024 / MIB


def cpu_peak_mb(target: str, kwargs_list: Sequence[dict[str, Any]], *, workers: int = 1) -> list[float | str]:
    """Peak RSS growth (MiB) of one run of each step, every one in a fresh spawned process.

    ``target`` is "module:factory"; ``factory(**kwargs)`` must build its inputs and return the step
    (a fresh process keeps one measurement's allocator state and caches out of the next). A
    measurement that fails gives its error as a string instead of a number. Linux only.
    """
    if not Path("/proc/self/clear_refs").exists():
        return ["peak RSS needs Linux /proc/self/clear_refs"] * len(kwargs_list)
    context = multiprocessing.get_context("spawn")
    results: list[float | str] = []
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_peak_rss_child, target, kwargs) for kwargs in kwargs_list]
        for future in futures:
            try:
                results.append(future.result())
            except Exception as error:  # reported in the row; one failed measurement must not end the run
                results.append(f"{type(error).__name__}: {error}")
    return results


_MALLOC_PINNED = False
_LIBC = None


def pin_malloc_thresholds(mmap_threshold: int = 64 * 2**10) -> bool:
    """Make glibc return every block of ``mmap_threshold`` bytes or more to the OS when freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
    blocks of that size come from the heap and are reused without touching new pages: the resident
    set then misses reused memory and a peak measured in-process is too low. A fixed threshold
    (and trim threshold) keeps RSS equal to the bytes of the live tensors, up to small blocks.
    Returns False where glibc's mallopt is not available (the in-process peak is then unreliable).
    """
    global _MALLOC_PINNED, _LIBC
    if _MALLOC_PINNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        _MALLOC_PINNED = bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(
            libc.mallopt(m_trim_threshold, 2 * mmap_threshold)
        )
        _LIBC = libc
    except (OSError, AttributeError):
        _MALLOC_PINNED = False
    return _MALLOC_PINNED


def rss_peak_mb(step: Callable[[int], Any], *, warmup: bool = True) -> float | str:
    """Peak RSS growth (MiB) of one ``step(0)`` in this process: the CPU counterpart of cuda_peak_mb.

    The step runs once first unless ``warmup`` is False (a step that was just timed: lazy imports,
    compilation, thread pools are not its footprint), then the high-water mark is reset to the
    current RSS (clear_refs "5", Linux >= 4.0) and the measured run's VmHWM minus VmRSS before it
    is the memory it allocated beyond its inputs: tensors, and on a CPU also the process's own
    objects (a Python loop that keeps thousands of small tensors alive shows them). With
    ``pin_malloc_thresholds`` this agrees with ``cpu_peak_mb``'s fresh process per measurement
    (token_logprobs [512 x 32000] float32, eager/host/upcast/TRL, fwd and fwd+bwd: within
    0.1 MiB) at a fraction of the cost. Returns the reason as a string where it cannot measure.
    """
    if not Path("/proc/self/clear_refs").exists():
        return "peak RSS needs Linux /proc/self/clear_refs"
    if not pin_malloc_thresholds():
        return "peak RSS in-process needs glibc's mallopt (use cpu_peak_mb)"
    if warmup:
        step(0)
    _clear(step)  # no gc.collect(): tensors are freed by reference counting, and a full collection
    # costs 0.2 s once torch.compile's modules are loaded. Free heap pages (blocks freed before the
    # thresholds were pinned) go back to the OS, so that reusing one counts as new memory.
    _LIBC.malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step(0)
    peak = _status_kib("VmHWM")
    _clear(step)
    return (peak - before) * 1024 / MIB


# --------------------------------------------------------------------------- numerics


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, 0.01 sqrt(n)), in float64 on ``expected``'s device.

    Same measure as the tests: the floor compares tensors whose entries are all tiny (the entropy
    of a near one-hot distribution) absolutely rather than relative to a norm that is almost zero.
    NaN or inf anywhere gives NaN or inf, which fails every ``err <= tol`` comparison.
    """
    expected = expected.detach().double()
    actual = actual.detach().to(device=expected.device, dtype=torch.float64)
    floor = 0.01 * max(expected.numel(), 1) ** 0.5
    return (actual - expected).norm().item() / max(expected.norm().item(), floor)


# --------------------------------------------------------------------------- results


def results_path(out_dir: Path | str, bench: str, name: str, date: str) -> Path:
    return Path(out_dir) / f"{date}-{device_slug(name)}-{bench}.json"


def write_results(
    rows: Sequence[dict[str, Any]], out_dir: Path | str, *, bench: str, key_fields: Sequence[str]
) -> Path:
    """Write ``rows`` to ``<out_dir>/<date>-<device-slug>-<bench>.json``, merged with that file.

    Rows of an earlier run that day with the same key (e.g. dtype, shape, impl, mode) are
    replaced; others are kept, so a quick run and a run of another shape end up in one file.
    Written to a temporary file and renamed, so an interrupted run never leaves half a file.
    """
    if not rows:
        raise ValueError("write_results needs at least one row")
    path = results_path(out_dir, bench, rows[0]["device_name"], rows[0]["date"])
    path.parent.mkdir(parents=True, exist_ok=True)

    def key(row):
        return json.dumps([row.get(field) for field in ("device_name",) + tuple(key_fields)])

    kept = []
    if path.exists():
        try:
            kept = json.loads(path.read_text())["rows"]
        except (ValueError, KeyError, TypeError):
            kept = []  # an unreadable file is replaced, not merged
    new_keys = {key(row) for row in rows}
    merged = [row for row in kept if key(row) not in new_keys] + list(rows)
    document = {
        "bench": bench,
        "units": {"time": "ms", "bandwidth": "GB/s (1e9 B/s)", "memory": "MiB (2^20 B), peak beyond the inputs"},
        "rows": merged,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def append_csv(rows: Sequence[dict[str, Any]], path: Path | str, fields: Sequence[str]) -> Path:
    """Append ``rows`` to a CSV file (header written when the file is new): rows accumulate across runs.

    Only ``fields`` are written, in that order; lists and dicts as JSON, missing values empty.
    """
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(fields)
        for row in rows:
            cells = []
            for field in fields:
                value = row.get(field)
                cells.append(json.dumps(value) if isinstance(value, (list, dict)) else "" if value is None else value)
            writer.writerow(cells)
    return path


def load_rows(paths: Sequence[Path | str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        rows.extend(json.loads(Path(path).read_text())["rows"])
    return rows


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: '-' for missing values, numbers with ``spec``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Callable[[dict], str]]]) -> str:
    """A markdown table: one (header, row -> cell text) pair per column."""
    cells = [[header for header, _ in columns]] + [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells[1:]])


def as_dict(timing: Timing | None) -> dict[str, Any]:
    if timing is None:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None, "reps": None}
    return asdict(timing)
