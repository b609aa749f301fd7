"""User errors of the training commands, run as a user runs them (a subprocess of ``python -m rlhf_fast``):
exit status 2 (130 for Ctrl-C), one line on stderr naming the file, row or option and the fix, no
traceback, and nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_fast.train.interrupts import HELD_NOTICE

from numerics import TINY_RL

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = [
    "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
    "--train.batch_size", "8", "--train.steps", "2", "--train.progress", "false", "--train.device", "cpu",
]  # fmt: skip


def rl_options(**overrides) -> list[str]:
    """TINY_RL (and ``overrides``, "section__key" for "section.key") as command-line options."""
    options = {**TINY_RL, **{k.replace("__", "."): v for k, v in overrides.items()}}
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def environment() -> dict[str, str]:
    # One thread (two cores are shared); no Triton interpreter (conftest.py sets it for the kernel tests).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def cli(*argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_fast", *argv], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300, check=False)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a command that failed with ``code``, checked to be a plain message."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_bytes(b'{"prompt": "write 3 words about sea :", "response": "wave"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    out = tmp_path / "run"
    line = one_line_error(cli("sft", "--out_dir", str(out), "--data.train_path", str(bad), *TINY_SFT, cwd=tmp_path))
    assert f"{bad}:2: not UTF-8 (byte 0xe9" in line and "save the file as UTF-8" in line
    assert not out.exists()


def test_out_dir_that_cannot_be_created(tmp_path):
    parent = tmp_path / "a_file"
    parent.write_text("not a directory\n")
    out = parent / "run"
    line = one_line_error(cli("sft", "--out_dir", str(out), *TINY_SFT, cwd=tmp_path))
    assert f"out_dir {out} cannot be written" in line and "choose a writable --out_dir" in line
    assert parent.read_text() == "not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir(tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = one_line_error(cli("sft", "--out_dir", str(parent / "run"), *TINY_SFT, cwd=tmp_path))
    finally:
        parent.chmod(0o755)
    assert "cannot be written: Permission denied" in line and "choose a writable --out_dir" in line
    assert list(parent.iterdir()) == []


def test_read_only_out_dir_in_process(tmp_path, monkeypatch, capsys):
    """The same refusal where the test runs as root (a read-only directory does not stop root)."""
    from rlhf_fast.__main__ import main
    from rlhf_fast.train import run

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(run.tempfile, "TemporaryFile", refuse)
    out = tmp_path / "run"
    code = main(["sft", "--out_dir", str(out), *TINY_SFT])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert f"out_dir {out} cannot be written: Permission denied; choose a writable --out_dir" in err
    assert list(out.iterdir()) == []


REWARD_FNS = """
def raises(prompts, responses):
    raise KeyError("score")

def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)

def strings(prompts, responses):
    return ["good"] * len(responses)
"""


@pytest.mark.parametrize(
    "fn, expected",
    [
        ("raises", "reward.fn='my_rewards:raises' raised KeyError: 'score' (called with 8 prompts and responses); fix the function"),
        ("too_few", "reward.fn='my_rewards:too_few' returned (7,) scores for 8 responses; it must return one number per response"),
        ("strings", "reward.fn='my_rewards:strings' returned a list of str; it must return 8 numbers, one per response"),
    ],
)
def test_bad_reward_fn(tmp_path, fn, expected):
    (tmp_path / "my_rewards.py").write_text(REWARD_FNS)
    out = tmp_path / "run"
    line = one_line_error(cli("rl", "--out_dir", str(out), *rl_options(reward__gold=False, reward__fn=f"my_rewards:{fn}"), cwd=tmp_path))
    assert expected in line
    # The run stops at its first step: config.yaml only, no checkpoint, metrics or model.
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_names_the_last_checkpoint_and_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["rl", "--out_dir", str(out), *rl_options(train__steps=500, train__save_every=1, train__keep_checkpoints=2)]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # under `ci &` the run would never see the Ctrl-C. The terminal's default is what a user has.
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_fast", *argv], cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob("step_*.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # A Ctrl-C that lands while a checkpoint is written is held until the write completes, and says so first.
    stderr = stderr.removeprefix(HELD_NOTICE + "\n")
    line = one_line_error(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), code=130)
    step, path = max((int(p.stem.split("_")[1]), p) for p in (out / "checkpoints").glob("step_*.pt"))
    assert f"interrupted; the last checkpoint is {path} (step {step}): run the same command with --resume" in line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "a write cut short left a temporary file"


def test_nan_reward_names_the_row(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def nan_row_3(prompts, responses):\n    return [float('nan') if i == 3 else 1.0 for i in range(len(responses))]\n")
    out = tmp_path / "run"
    line = one_line_error(cli("rl", "--out_dir", str(out), *rl_options(reward__gold=False, reward__fn="my_rewards:nan_row_3"), cwd=tmp_path))
    assert line.startswith("rlhf-fast rl: error: step 1: reward.fn='my_rewards:nan_row_3' returned nan for row 3 of 8 (1 row(s) NaN/inf; prompt '")
    assert line.endswith("a reward must be a finite number")
    # Stopped before any update: no checkpoint, metrics or model.
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_sft_from_a_model_with_an_inf_weight_stops_naming_it(tmp_path):
    """The run of issue 14 that trained on NaN losses and saved an all-NaN model with exit 0: now
    every update is skipped (a warning each) and the third in a row stops it, naming the weight."""
    from safetensors.torch import load_file, save_file

    first = tmp_path / "first"
    assert cli("sft", "--out_dir", str(first), *TINY_SFT, "--train.steps", "1", cwd=tmp_path).returncode == 0
    weights = next((first / "model").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "run"
    proc = cli("sft", "--out_dir", str(out), "--model.path", str(first / "model"), *TINY_SFT, "--train.steps", "4", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("RuntimeWarning: non-finite update at step") == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf-fast sft: error: non-finite update at step 3 (loss nan, gradient norm nan): 3 optimizer updates in a row")
    assert "likely source: the model's weights hold 1 NaN/inf value(s) (first in model.layers.0.mlp.down_proj.weight)" in last
    assert not (out / "model").exists()
