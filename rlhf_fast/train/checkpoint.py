"""Checkpoints: model, optimizer, scheduler, RNG states and data position in one file, written atomically
and checksummed; and ``write_atomically``, which every file of a run directory is written with.

A checkpoint file is a 64-byte header (``MAGIC`` padded with zeros to 32 bytes, then the SHA-256 of
everything after the header) followed by the ``torch.save`` archive. ``load`` checks the digest before
unpickling anything, so a truncated or bit-flipped file is refused (``CheckpointError``) rather than
resumed with silently changed weights (torch.load checks no CRC of the archive's records). The payload
loads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only.

``write_atomically`` writes to a temporary file created exclusively beside the target (``mkstemp``: an
unpredictable name, never a symlink someone planted there), fsyncs it and renames it over the
target (``os.replace`` is atomic on POSIX), so a crash or a kill mid-write leaves at most a stray
``.<name>.tmp*`` file, removed by ``remove_temporaries`` when the next run starts, and never a
truncated file: the previous checkpoint stays loadable.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from . import dist
from .interrupts import held_interrupts

FORMAT = "rlhf_fast.train.checkpoint/1"
MAGIC = b"rlhf_fast.ckpt.sha256\n"
HEADER_SIZE = 64  # MAGIC, zero padding, then the 32-byte digest
NAME_RE = re.compile(r"^step_(\d{8})\.pt$")
TMP_MARK = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint is damaged, or --resume found checkpoints and none of them loads; the message names the file."""


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


@functools.cache
def _new_file_mode() -> int:
    """0o666 less the umask: what open() gives a new file. mkstemp makes it 0o600, which would hide
    checkpoints from the group that can read every other output of the run."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Create ``path`` with ``write(f)`` (a binary file open for reading and writing), atomically:
    temporary file created exclusively in the same directory, fsync, rename (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            os.fchmod(f.fileno(), _new_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_temporaries(directory: Path) -> None:
    """Delete the ``.<name>.tmp*`` files that writes killed midway left in ``directory``.
    Call it before a run starts writing there: a live write's temporary file looks the same."""
    directory = Path(directory)
    for path in directory.glob(f".*{TMP_MARK}*") if directory.is_dir() else []:
        if path.is_file():
            path.unlink(missing_ok=True)


def _sha256(f: BinaryIO) -> bytes:
    """Digest of ``f`` from its current position to the end, read in 1 MiB chunks (never all in memory)."""
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.digest()


def _header(digest: bytes) -> bytes:
    return MAGIC.ljust(HEADER_SIZE - len(digest), b"\0") + digest


class _Body(io.RawIOBase):
    """The archive after the header, as a file of its own: torch.load reads it at offsets from its start."""

    def __init__(self, f: BinaryIO):
        self.f = f
        f.seek(HEADER_SIZE)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.f.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        offset += HEADER_SIZE if whence == io.SEEK_SET else 0
        return self.f.seek(offset, whence) - HEADER_SIZE

    def tell(self) -> int:
        return self.f.tell() - HEADER_SIZE


def save(payload: dict, path: Path) -> Path:
    """Write ``payload`` to ``path`` atomically, behind a header holding the SHA-256 of the archive."""

    def write(f: BinaryIO) -> None:
        f.write(bytes(HEADER_SIZE))
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        f.seek(HEADER_SIZE)
        digest = _sha256(f)  # of the bytes in the file, not of what torch meant to write
        f.seek(0)
        f.write(_header(digest))

    return write_atomically(path, write)


def load(path: Path) -> dict:
    """The payload of the checkpoint at ``path``; CheckpointError if its checksum does not match."""
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or not header.startswith(MAGIC):
            raise CheckpointError(f"{path} does not start with the header of a checksummed rlhf_fast checkpoint")
        if header != _header(_sha256(f)):
            raise CheckpointError(f"{path} is damaged: the SHA-256 of its contents differs from the one written with it")
        payload = torch.load(_Body(f), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    return payload


def load_latest(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (an unreadable one is skipped with a warning), or None."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
        except Exception as exc:
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}", stacklevel=2)
    return None


def prune(directory: Path, keep: int, step: int) -> None:
    """Delete all but the ``keep`` newest checkpoints up to ``step`` (the one just written).

    Checkpoints past ``step`` are the unreadable ones a resume skipped: counting them would delete
    the checkpoints this run has written since (a run split into jobs would never get past them).
    They stay until the run saves their step again, or passes it and prunes them as old ones."""
    done = [path for s, path in list_checkpoints(directory) if s <= step]
    for path in done[:-keep]:
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

    ``write_checkpoint`` and ``newest_checkpoint`` are the storage: one file per checkpoint written by
    rank 0 here; ``fsdp.ShardedCheckpoints`` overrides them for runs whose models are sharded.
    """

    saved_step = -1  # the step of the newest checkpoint this process wrote or resumed from

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of this step (``write_checkpoint``, a Ctrl-C held until it is whole),
        then call the on_checkpoint hooks."""
        with held_interrupts():
            path = self.write_checkpoint()
        self.saved_step = self.step
        for hook in self.hooks.on_checkpoint:
            hook(self, path)
        return path

    def write_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint of this step (atomically) and prunes old ones; all ranks wait."""
        path = path_for(self.checkpoint_dir, self.step)
        if dist.is_main():
            save(self.state_dict(), path)
            prune(self.checkpoint_dir, self.keep_checkpoints, self.step)
        dist.barrier()
        return path

    def newest_checkpoint(self) -> tuple[Path, dict] | None:
        """(path, payload) of the newest checkpoint that loads, None when there is none at all;
        CheckpointError when there are checkpoints and none of them loads."""
        found = load_latest(self.checkpoint_dir)
        if found is None:
            unreadable = list_checkpoints(self.checkpoint_dir)
            if unreadable:
                names = ", ".join(p.name for _, p in reversed(unreadable))
                raise CheckpointError(
                    f"--resume: no checkpoint in {self.checkpoint_dir} can be loaded ({names}; see the warnings above); "
                    "put a good one back there, or pass --overwrite instead of --resume to start the run again from step 0"
                )
        return found

    def resume(self, check: Callable[[dict, Path], None] | None = None) -> Path | None:
        """Restore the newest loadable checkpoint (every process loads it). Metrics logged after its
        step (by the interrupted run) are dropped: they will be redone. ``check(saved_config, path)``
        runs first and may refuse it (``run.check_resume``: options that must not change).

        None when there is no checkpoint at all (the run starts at step 0, without the metrics of an
        attempt killed before its first checkpoint). Checkpoints that all fail to load are an error:
        starting again would silently throw away the run they hold."""
        found = self.newest_checkpoint()
        if found is None:
            self.metrics.drop_after(0)
            return None
        path, payload = found
        if check is not None:
            check(payload.get("config", {}), path)
        self.load_state_dict(payload)
        self.step = int(payload["step"])
        self.saved_step = self.step
        self.metrics.drop_after(self.step)
        return path
