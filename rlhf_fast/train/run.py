"""What both trainers do around the loop: seeds, the loop over a dataset, the output directory, the saved
config, the final plot."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, dist
from .config import to_dict
from .data import BatchStream
from .loop import Loop
from .metrics import plot_metrics, read_metrics


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's random and NumPy: model init and dropout follow from it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dataset_loop(config, model, train_examples, eval_examples, *, pad: int, collate, evaluate, loss_fn, hooks, device,
                 name: str) -> Loop:
    """The shared loop over tokenised examples: a resumable batch stream sharded over the processes,
    held-out evaluation every config.train.eval_every steps when there are eval examples.

    ``collate(examples, pad_id=)`` builds a batch; ``evaluate(model, examples, batch_size=, pad=, device=)``
    returns the held-out metrics.
    """
    batches = BatchStream(
        train_examples,
        config.train.batch_size,
        partial(collate, pad_id=pad),
        seed=config.train.seed,
        rank=dist.rank(),
        world_size=dist.world_size(),
    )
    eval_fn = None
    if eval_examples:
        eval_fn = partial(evaluate, examples=eval_examples, batch_size=config.train.eval_batch_size, pad=pad, device=device)
    return Loop(
        config.train,
        config.optim,
        model,
        batches,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        out_dir=Path(config.out_dir),
        run_config=to_dict(config),
        hooks=hooks,
        name=name,
    )


def start_run(config, loop: Loop) -> None:
    """Before training: an output directory that is new or resumed on purpose, the loop resumed from its
    newest checkpoint when asked, and the resolved configuration saved."""
    out_dir = Path(config.out_dir)
    prepare_out_dir(out_dir, config.resume)
    if config.resume and loop.resume() is None and dist.is_main():
        print(f"note: --resume found no checkpoint in {out_dir}; starting from step 0")
    save_config(config, out_dir)


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
