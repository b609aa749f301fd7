"""A Ctrl-C during a checkpoint write waits for the write; a second one does not."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rlhf_fast.train import checkpoint
from rlhf_fast.train.interrupts import held_interrupts


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own handler, as in a terminal: a shell starts background jobs (CI under `&`) with
    SIGINT ignored, which Python keeps, and held_interrupts then has nothing to hold."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_one_ctrl_c_is_delivered_after_the_body(capsys):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            ctrl_c()
            done.append("body")
    assert done == ["body"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "Ctrl-C again to stop now" in capsys.readouterr().err


def test_a_second_ctrl_c_stops_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            ctrl_c()
            ctrl_c()
            done.append("body")
    assert done == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_ctrl_c_changes_nothing():
    with held_interrupts():
        value = 1
    assert value == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with held_interrupts():
        ctrl_c()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


class Run(checkpoint.CheckpointedRun):
    """The least a run provides; its state_dict is where the user presses Ctrl-C."""

    keep_checkpoints = 2

    def __init__(self, directory):
        self.step, self.checkpoint_dir = 3, directory
        self.hooks = type("Hooks", (), {"on_checkpoint": []})()
        self.weights = torch.randn(64, 32)

    def state_dict(self):
        ctrl_c()
        return {"step": self.step, "weights": self.weights}


def test_checkpoint_interrupted_midway_is_written_whole(tmp_path):
    run = Run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint()
    [(step, path)] = checkpoint.list_checkpoints(tmp_path)
    assert step == 3 and torch.equal(checkpoint.load(path)["weights"], run.weights)
    assert not list(tmp_path.glob(f".*{checkpoint.TMP_MARK}*"))
