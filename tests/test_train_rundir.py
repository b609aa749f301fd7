"""Run directories survive kills and damage: torn metrics lines, corrupted or truncated checkpoints,
unreadable newest checkpoints, stale temporary files, planted symlinks, and a fresh run pointed at an
existing one. Most checks damage the files of a real (tiny) SFT run, then resume it."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.__main__ import main
from rlhf_fast.train import checkpoint
from rlhf_fast.train.config import SFTConfig, load_config
from rlhf_fast.train.metrics import MetricsLog, read_metrics
from rlhf_fast.train.sft import SFTTrainer

TINY = {
    "model.hidden_size": 32,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.intermediate_size": 64,
    "task.sft_train": 64,
    "task.sft_eval": 16,
    "train.batch_size": 8,
    "train.eval_batch_size": 16,
    "train.eval_every": 0,
    "train.log_every": 1,
    "train.progress": False,
    "train.device": "cpu",
    "optim.warmup_steps": 2,
}


def train(out_dir: Path, **options) -> SFTTrainer:
    trainer = SFTTrainer(load_config(SFTConfig, None, {"out_dir": str(out_dir), **TINY, **options}))
    trainer.train()
    return trainer


def run_cli(capsys, out_dir: Path, *flags: str, **options) -> tuple[int, str]:
    """``rlhf-fast sft`` on the tiny run in out_dir; (exit status, stderr)."""
    argv = ["sft", "--out_dir", str(out_dir), *flags]
    for key, value in {**TINY, **options}.items():
        argv += [f"--{key}", str(value)]
    code = main(argv)
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    """The error line of a command that failed; it must be the only line not from a warning."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlhf-fast sft: error:")]
    assert len(lines) == 1, err
    return lines[0]


def train_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out_dir / "metrics.jsonl") if r["split"] == "train"]


def flip_bytes(path: Path, count: int, generator: torch.Generator) -> None:
    """Invert ``count`` distinct random bytes of ``path`` (a full-byte flip always changes it)."""
    data = bytearray(path.read_bytes())
    for i in torch.randperm(len(data), generator=generator)[:count].tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------------- metrics.jsonl
def test_metrics_survive_a_kill_at_any_byte(tmp_path):
    """Cut the file at every byte: the records before the cut come back, a torn one is dropped with a warning."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 4)]
    for record in records:
        log.write(record)
    data = log.path.read_bytes()
    ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    for cut in range(len(data) + 1):
        log.path.write_bytes(data[:cut])
        complete = sum(end <= cut for end in ends)
        if cut in ends or cut == 0:
            assert read_metrics(log.path) == records[:complete], cut
        else:
            with pytest.warns(UserWarning, match="dropping its last line, torn"):
                assert read_metrics(log.path) == records[:complete], cut


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    train(tmp_path, **{"train.steps": 4, "train.stop_after": 2, "train.save_every": 2})
    torn = json.dumps({"step": 3, "split": "train", "loss": 3.25, "lr": 0.001})
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed while appending step 3's record
        f.write(torn[: int(torch.randint(1, len(torn), ()))])
    with pytest.warns(UserWarning, match="metrics.jsonl: dropping its last line, torn"):
        resumed = train(tmp_path, **{"train.steps": 4, "train.save_every": 2}, resume=True)
    assert resumed.loop.step == 4
    assert train_steps(tmp_path) == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl").read_bytes().endswith(b"\n")


# ----------------------------------------------------------------------------------- checkpoints
def test_a_corrupted_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path):
    generator = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    train(tmp_path, **{"train.steps": 4, "train.stop_after": 3, "train.save_every": 1, "train.keep_checkpoints": 3})
    ckpt_dir = tmp_path / "checkpoints"
    newest = ckpt_dir / "step_00000003.pt"
    intact = newest.read_bytes()

    # Any single flipped bit, in the header or the archive, is caught by the checksum.
    for i in [*range(checkpoint.HEADER_SIZE), *torch.randint(len(intact), (40,), generator=generator).tolist()]:
        newest.write_bytes(intact[:i] + bytes([intact[i] ^ 1 << int(torch.randint(8, (), generator=generator))]) + intact[i + 1 :])
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load(newest)
    newest.write_bytes(intact)
    assert checkpoint.load(newest)["step"] == 3

    flip_bytes(newest, 64, generator)  # the measured case: 64 flipped bytes loaded without complaint
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step_00000003.pt: CheckpointError: .*damaged"):
        path, payload = checkpoint.load_latest(ckpt_dir)
    assert path.name == "step_00000002.pt" and payload["step"] == 2

    second = ckpt_dir / "step_00000002.pt"
    second.write_bytes(second.read_bytes()[: len(intact) // 2])  # truncated: skipped the same way
    resumed = SFTTrainer(load_config(SFTConfig, None, {"out_dir": str(tmp_path), **TINY, "train.steps": 4, "resume": True}))
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint") as caught:
        path = resumed.loop.resume()
    assert path.name == "step_00000001.pt"
    assert [re.search(r"step_\d+\.pt", str(w.message)).group() for w in caught] == ["step_00000003.pt", "step_00000002.pt"]
    assert resumed.loop.step == 1 and train_steps(tmp_path) == [1]


def test_resume_with_checkpoints_but_none_loadable_stops(tmp_path, capsys):
    code, err = run_cli(capsys, tmp_path, **{"train.steps": 3, "train.save_every": 1})
    assert code == 0, err
    ckpt_dir = tmp_path / "checkpoints"
    second, third = ckpt_dir / "step_00000002.pt", ckpt_dir / "step_00000003.pt"
    flip_bytes(third, 64, torch.Generator().manual_seed(0))
    second.write_bytes(second.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in [*tmp_path.glob("*.*"), *ckpt_dir.iterdir()]}

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        code, err = run_cli(capsys, tmp_path, "--resume", **{"train.steps": 6, "train.save_every": 1})
    assert code == 2
    line = one_line_error(err)
    assert f"no checkpoint in {ckpt_dir} can be loaded (step_00000003.pt, step_00000002.pt" in line
    assert "--overwrite" in line
    assert {p.name: p.read_bytes() for p in [*tmp_path.glob("*.*"), *ckpt_dir.iterdir()]} == before  # nothing restarted


def test_unreadable_newer_checkpoints_never_get_the_good_ones_pruned(tmp_path):
    """Unreadable checkpoints with higher steps than the resumed one: each job of a split run still
    makes progress and keeps what it wrote (they were counted as the newest and everything else pruned)."""
    run = {"train.steps": 8, "train.save_every": 2}
    train(tmp_path, **run, **{"train.stop_after": 6, "train.keep_checkpoints": 3})
    ckpt_dir = tmp_path / "checkpoints"
    assert names(ckpt_dir) == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    for step in (4, 6):
        flip_bytes(checkpoint.path_for(ckpt_dir, step), 64, torch.Generator().manual_seed(step))

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint") as caught:
        job = train(tmp_path, **run, **{"train.stop_after": 3}, resume=True)
    assert len(caught) == 2
    assert job.loop.step == 3
    assert names(ckpt_dir) == ["step_00000002.pt", "step_00000003.pt", "step_00000004.pt", "step_00000006.pt"]

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        job = train(tmp_path, **run, **{"train.stop_after": 5}, resume=True)
    assert job.loop.step == 5  # step 4 was rewritten over the damaged file, then kept as the newest but one
    assert names(ckpt_dir) == ["step_00000004.pt", "step_00000005.pt", "step_00000006.pt"]
    assert checkpoint.load(ckpt_dir / "step_00000004.pt")["step"] == 4

    with pytest.warns(UserWarning, match="step_00000006.pt"):
        job = train(tmp_path, **run, resume=True)
    assert job.loop.step == 8 and (tmp_path / "model" / "config.json").is_file()
    assert names(ckpt_dir) == ["step_00000006.pt", "step_00000008.pt"]
    assert train_steps(tmp_path) == list(range(1, 9))


# ----------------------------------------------------------------------------------- the output directory
def test_a_fresh_run_refuses_a_non_empty_out_dir(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, run, **{"train.steps": 2})[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    code, err = run_cli(capsys, run, **{"train.steps": 3})
    assert code == 2
    line = one_line_error(err)
    assert f"out_dir {run} is not empty (checkpoints/, config.yaml, metrics.jsonl" in line
    assert "pass --resume" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the old model is untouched

    code, err = run_cli(capsys, run, "--overwrite", **{"train.steps": 3})
    assert code == 0, err
    assert train_steps(run) == [1, 2, 3]  # only the new run's metrics
    assert names(run / "checkpoints") == ["step_00000003.pt"]
    assert load_config(SFTConfig, run / "config.yaml").overwrite is True

    code, err = run_cli(capsys, run, "--overwrite", "--resume")
    assert code == 2 and "overwrite must be false with resume=true" in one_line_error(err)

    # A directory holding anything else is no run's: refused, and --overwrite does not delete it either.
    (run / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, run, "--overwrite", **{"train.steps": 3})
    assert code == 2 and f"out_dir {run} holds files no run writes (notes.txt)" in one_line_error(err)
    assert (run / "notes.txt").read_text() == "mine" and (run / "model" / "config.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, other, **{"train.steps": 1})
    assert code == 2 and f"out_dir {other} is not empty (notes.txt)" in one_line_error(err)


def test_stale_temporary_files_are_removed_on_the_next_start(tmp_path):
    train(tmp_path, **{"train.steps": 4, "train.stop_after": 2, "train.save_every": 2})
    ckpt_dir = tmp_path / "checkpoints"
    stale = [ckpt_dir / ".step_00000004.pt.tmpk3j_x9a1", tmp_path / ".metrics.jsonl.tmp8s7d6f5g", tmp_path / ".config.yaml.tmp1234"]
    for path in stale:
        path.write_bytes(os.urandom(1 << 16))
    (tmp_path / "model.tmp").mkdir()  # a model save killed midway
    (tmp_path / "model.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not a run's: kept")

    resumed = train(tmp_path, **{"train.steps": 4, "train.stop_after": 3, "train.save_every": 2}, resume=True)
    assert resumed.loop.step == 3
    assert names(ckpt_dir) == ["step_00000002.pt", "step_00000003.pt"]
    assert names(tmp_path) == ["checkpoints", "config.yaml", "metrics.jsonl", "notes.tmp"]


def test_temporary_files_are_created_exclusively_and_never_follow_a_symlink(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    path = checkpoint.path_for(ckpt_dir, 1)
    for name in (f".{path.name}.tmp{os.getpid()}", f".{path.name}.tmp"):  # the names writers used to predict
        (ckpt_dir / name).symlink_to(victim)

    temporaries = []
    real_replace = os.replace

    def spy(src, dst):
        temporaries.append((Path(src), os.lstat(src)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    for _ in range(2):
        checkpoint.save({"step": 1, "w": torch.arange(4.0)}, path)
    assert victim.read_bytes() == b"precious"
    (first, first_stat), (second, second_stat) = temporaries
    assert first.parent == ckpt_dir and first.name.startswith(".step_00000001.pt.tmp") and first != second
    assert stat.S_ISREG(first_stat.st_mode) and stat.S_ISREG(second_stat.st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert first_stat.st_mode & 0o777 == path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
    assert torch.equal(checkpoint.load(path)["w"], torch.arange(4.0))


# ----------------------------------------------------------------------------------- a real kill
@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume(tmp_path, capsys):
    """Kill a training process outright, twice, at a random moment a few steps into its attempt (a
    checkpoint and a metrics record are written at every step, so kills land in those writes too);
    --resume finishes the run, and its metrics and weights are those of a run never interrupted."""
    run, steps = tmp_path / "run", 24
    options = {"train.steps": steps, "train.save_every": 1, "train.eval_every": 4}
    argv = [sys.executable, "-m", "rlhf_fast", "sft", "--out_dir", str(run)]
    for key, value in {**TINY, **options}.items():
        argv += [f"--{key}", str(value)]
    kills = []  # (steps logged when the kill was due, extra seconds): printed by a failing assert
    for attempt in range(2):
        due = len(train_steps(run)) + int(torch.randint(1, 6, ()))
        process = subprocess.Popen(argv + ["--resume"] * attempt, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while process.poll() is None and len(train_steps(run)) < due and time.monotonic() < deadline:
            time.sleep(0.005)
        kills.append((due, float(torch.rand(())) * 0.05))
        time.sleep(kills[-1][1])
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        assert process.returncode == -signal.SIGKILL and len(train_steps(run)) >= due, (kills, err.decode()[-2000:])

    code, err = run_cli(capsys, run, "--resume", **options)
    assert code == 0, (kills, err)
    assert train_steps(run) == list(range(1, steps + 1)), kills
    assert names(run / "checkpoints") == [f"step_{s:08d}.pt" for s in (steps - 1, steps)], kills
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], kills

    straight = tmp_path / "straight"
    assert run_cli(capsys, straight, **options)[0] == 0
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [
        r["loss"] for r in read_metrics(straight / "metrics.jsonl") if r["split"] == "train"
    ], kills
    resumed, uninterrupted = (checkpoint.load(d / "checkpoints" / f"step_{steps:08d}.pt")["model"] for d in (run, straight))
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), (name, kills)
