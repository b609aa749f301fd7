"""Checkpoints: model, optimizer, scheduler, RNG states and data position in one file, written atomically.

``save`` writes to a temporary file in the same directory, fsyncs it and renames it over the final
name (``os.replace`` is atomic on POSIX), so a crash or a kill mid-write leaves at most a stray
temporary file and never a truncated ``step_XXXXXXXX.pt``: the previous checkpoint stays loadable.
Files load with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from . import dist

FORMAT = "rlhf_fast.train.checkpoint/1"
NAME_RE = re.compile(r"^step_(\d{8})\.pt$")
TMP_MARK = ".tmp"


def path_for(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME_RE.match(p.name))]
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(payload: dict, path: Path) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def load(path: Path) -> dict:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return payload


def load_latest(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (an unreadable one is skipped with a warning), or None."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
        except Exception as exc:
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}", stacklevel=2)
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, and stray temporary files of killed writes."""
    directory = Path(directory)
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
    if directory.is_dir():
        for path in directory.glob(f".step_*.pt{TMP_MARK}*"):
            path.unlink(missing_ok=True)


def rng_state() -> dict:
    """Every RNG a training step may draw from: torch (CPU and CUDA), Python's random, NumPy's global."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )


class CheckpointedRun:
    """``save_checkpoint`` and ``resume`` for a training run (the SFT/RM ``Loop``, ``RLTrainer``).

    The run provides ``state_dict()`` (what to save; it must hold "step") and
    ``load_state_dict(payload)``, and the attributes ``step``, ``checkpoint_dir``,
    ``keep_checkpoints``, ``hooks`` (``on_checkpoint``) and ``metrics`` (a ``MetricsLog``).
    """

    _last_saved = -1  # the step of the newest checkpoint this process wrote or resumed from

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint of this step (atomically) and prunes old ones; all ranks wait."""
        path = path_for(self.checkpoint_dir, self.step)
        if dist.is_main():
            save(self.state_dict(), path)
            prune(self.checkpoint_dir, self.keep_checkpoints)
        dist.barrier()
        self._last_saved = self.step
        for hook in self.hooks.on_checkpoint:
            hook(self, path)
        return path

    def resume(self) -> Path | None:
        """Restore the newest loadable checkpoint (every process loads it); None when there is none.
        Metrics logged after its step (by the interrupted run) are dropped: they will be redone."""
        found = load_latest(self.checkpoint_dir)
        if found is None:
            return None
        path, payload = found
        self.load_state_dict(payload)
        self.step = int(payload["step"])
        self._last_saved = self.step
        self.metrics.drop_after(self.step)
        return path
