"""Intra-op threads sized to the CPUs other processes leave free, for the training commands.

torch starts one intra-op thread per CPU the process may run on. When other processes keep those
CPUs busy, every parallel region waits at its barrier for a thread the scheduler has parked, and
the waiting threads spin: on the 2-core CI machine the demo took 25 s quiet, but 127 s with two
busy processes beside it (4.9x where fair sharing predicts 2x) and used 3x the CPU time. With one
thread it took 47 s (1.9x). So the commands size torch's pool (which the host kernels follow) to
the CPUs nobody else is running on, between 1 and the count torch started with (that count
follows the process's CPU affinity), and look again every few seconds as the load changes.

An OMP_NUM_THREADS in the environment is the user's choice and is kept as it is. Library calls
(the Python API) never change the count: only the CLI's training session turns this on.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

RECHECK_S = 2.0


def others_running() -> int | None:
    """Threads of other processes running or runnable now, from the kernel's count of all of
    them (/proc/stat) less this process's own; None where /proc is not there."""
    try:
        stat = Path("/proc/stat").read_text()
        running = next(int(line.split()[1]) for line in stat.splitlines() if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, running - _own_running())


def _own_running() -> int:
    own = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_bytes()
        except OSError:  # the thread ended meanwhile
            continue
        own += stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"R"
    return own


def cpus_allowed() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LoadFittedThreads:
    """``fit()`` sets torch's intra-op threads to the free CPUs, at most ``ceiling``, at most once
    every ``recheck_s`` seconds (call it from the main thread: OpenMP's count is per calling thread)."""

    def __init__(self, ceiling: int, recheck_s: float = RECHECK_S, sample=others_running):
        self.ceiling = ceiling
        self.recheck_s = recheck_s
        self.sample = sample
        self.checked = -float("inf")

    def fit(self) -> None:
        now = time.monotonic()
        if now - self.checked < self.recheck_s:
            return
        self.checked = now
        others = self.sample()
        if others is None:
            return
        wanted = max(1, min(self.ceiling, cpus_allowed() - others))
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)


_session: LoadFittedThreads | None = None


def fit_to_load() -> None:
    """Called by the training loop every step; a no-op outside ``fitted_threads()``."""
    if _session is not None:
        _session.fit()


@contextlib.contextmanager
def fitted_threads():
    """Within it, ``fit_to_load()`` keeps torch's threads fitted to the load (see the module
    docstring); the count torch had is restored on exit. Nothing changes with OMP_NUM_THREADS set."""
    global _session
    if "OMP_NUM_THREADS" in os.environ or _session is not None:
        yield
        return
    before = torch.get_num_threads()
    _session = LoadFittedThreads(before, sample=others_running)
    try:
        _session.fit()
        yield
    finally:
        _session = None
        torch.set_num_threads(before)
