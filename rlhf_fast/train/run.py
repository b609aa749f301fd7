"""What both trainers do around the loop: seeds, the output directory, the saved config, the final plot."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, dist
from .metrics import plot_metrics, read_metrics


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's random and NumPy: model init and dropout follow from it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a run: existing checkpoints need ``resume`` (or another out_dir)."""
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoint.list_checkpoints(out_dir / "checkpoints")
    if found and not resume:
        raise FileExistsError(
            f"out_dir={str(out_dir)!r} already has checkpoints (newest: step {found[-1][0]}); "
            "pass --resume to continue that run, or choose another out_dir"
        )
    dist.barrier()


def save_config(config, out_dir: Path) -> None:
    """The resolved configuration as config.yaml (rank 0)."""
    if not dist.is_main():
        return
    import yaml

    path = out_dir / "config.yaml"
    tmp = path.with_name(f".config.yaml.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    os.replace(tmp, path)


def save_summary(out_dir: Path, summary: dict) -> None:
    if dist.is_main():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def plot_run(out_dir: Path, title: str, panels: tuple[str, ...], hlines=None) -> Path | None:
    return plot_metrics(read_metrics(out_dir / "metrics.jsonl"), out_dir / "metrics.png", title=title, panels=panels, hlines=hlines)
