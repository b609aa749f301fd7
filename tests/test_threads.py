"""train/threads.py: the training commands' intra-op threads follow the CPUs other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.train import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("others,ceiling,cpus,want", [(0, 2, 2, 2), (1, 2, 2, 1), (5, 2, 2, 1), (2, 8, 8, 6), (0, 4, 8, 4)])
def test_threads_fill_the_free_cpus_up_to_the_ceiling(monkeypatch, restore_threads, others, ceiling, cpus, want):
    monkeypatch.setattr(threads, "cpus_allowed", lambda: cpus)
    threads.LoadFittedThreads(ceiling, sample=lambda: others).fit()
    assert torch.get_num_threads() == want


def test_refits_only_after_the_recheck_interval(restore_threads):
    load = {"others": 0}
    fitted = threads.LoadFittedThreads(1, recheck_s=3600, sample=lambda: load["others"])
    fitted.fit()
    torch.set_num_threads(2)
    fitted.fit()  # within the interval: the count set by hand stays
    assert torch.get_num_threads() == 2
    fitted.checked -= 3600
    fitted.fit()
    assert torch.get_num_threads() == 1


def test_unknown_load_changes_nothing(restore_threads):
    torch.set_num_threads(1)
    threads.LoadFittedThreads(2, sample=lambda: None).fit()
    assert torch.get_num_threads() == 1


def test_session_fits_and_restores(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "others_running", lambda: 10**6)
    torch.set_num_threads(2)
    with threads.fitted_threads():
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        threads._session.checked -= threads.RECHECK_S
        threads.fit_to_load()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and threads._session is None
    threads.fit_to_load()  # outside a session: the library leaves the count alone
    assert torch.get_num_threads() == 2


def test_omp_num_threads_is_the_users_choice(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "others_running", lambda: 10**6)
    torch.set_num_threads(2)
    with threads.fitted_threads():
        threads.fit_to_load()
        assert torch.get_num_threads() == 2


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc")
def test_a_spinning_process_is_counted():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 30
        while threads.others_running() < 1:  # it runs as soon as it has started
            assert time.monotonic() < deadline, "a process spinning for 30 s was never counted as running"
            time.sleep(0.05)
    finally:
        spinner.kill()
        spinner.wait()
