"""What the trainers do around the loop: seeds, the loop over a dataset, the output directory, the saved
config, the final model, summary and plot."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, dist
from .config import ConfigError, to_dict
from .data import BatchStream
from .loop import Loop, apply_optim
from .metrics import plot_metrics, read_metrics
from .quiet import quiet_transformers
from .reward_model import replace_dir

# What runs write in out_dir (SFT and RL: model/, RM: reward_model/); --overwrite deletes only these.
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "metrics.png", "summary.json", "model", "reward_model")
# What a write killed midway leaves beside one of them: ".<name>.tmp<random>" (checkpoint.write_atomically),
# "<dir>.tmp", "<dir>.tmp<pid>" or "<dir>.old<pid>" (the renames of the model directories).
LEFTOVER_RE = re.compile(r"^\.?(?P<target>.+?)\.(?:tmp\w*|old\d+)$")


class OutDirError(ValueError):
    """out_dir cannot be created or written to; the message names it."""


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
        strategy=config.dist.strategy,
    )


# What --resume does with an option whose value differs from the checkpoint's config:
# - RESUME_FREE: how long, where and how the run goes on, what it logs: used as given.
# - RESUME_APPLIED: optimizer options and the SFT/RM batch shape: used, with a note (loop.apply_optim
#   rebuilds the schedule at the checkpoint's step with the new values).
# - any other option (model, tokenizer, data, task, seed, reward, rollout, algorithm): refused, since
#   the checkpoint's weights, data position, KL coefficient or schedule position would not fit it.
RESUME_FREE = frozenset(
    ("out_dir", "resume", "overwrite")
    + tuple(f"train.{k}" for k in ("steps", "stop_after", "eval_every", "eval_batch_size", "eval_prompts", "log_every",
                                    "save_every", "keep_checkpoints", "progress", "device", "precision", "backend"))
)  # fmt: skip
RESUME_APPLIED = frozenset(("train.batch_size", "train.grad_accum"))


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(current: dict, saved: dict, path: Path) -> list[str]:
    """The options of ``current`` (a config as a dict) that differ from those ``saved`` in the checkpoint
    at ``path`` and are applied (see RESUME_FREE); ConfigError naming both values when one may not change.
    Options only one of the two configs knows (a newer or older rlhf_fast) are not compared."""
    new, old = _flatten(current), _flatten(saved)
    changed = [k for k in new if k in old and new[k] != old[k] and k not in RESUME_FREE]
    refused = [k for k in changed if not (k.startswith("optim.") or k in RESUME_APPLIED)]
    if refused:
        what = ", ".join(f"{k} is {old[k]!r} there and {new[k]!r} now" for k in refused)
        raise ConfigError(
            f"--resume: {path} was trained with other options ({what}); a resumed run keeps "
            f"its model, data and algorithm: give the checkpoint's values (its config.yaml), or start a new run "
            f"(another out_dir, or --overwrite)"
        )
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed]


def start_run(config, run: checkpoint.CheckpointedRun) -> None:
    """Before training: an output directory that is new, resumed or overwritten on purpose, the run
    (a ``Loop`` or the ``RLTrainer``) resumed from its newest checkpoint when asked (``check_resume``:
    changed optimizer options are applied, changed model, data or algorithm options refused), and
    the configuration that runs saved as config.yaml."""
    out_dir = Path(config.out_dir)
    prepare_out_dir(out_dir, config.resume, config.overwrite)
    if config.resume:
        notes: list[str] = []
        path = run.resume(check=lambda saved, path: notes.extend(check_resume(to_dict(config), saved, path)))
        if path is None and dist.is_main():
            print(f"note: --resume found no checkpoint in {out_dir}; starting from step 0")
        if path is not None:
            apply_optim(run.optimizer, run.scheduler, config.optim)
            if notes and dist.is_main():
                print(f"note: --resume from step {run.step} with changed options: {', '.join(notes)} "
                      "(the optimizer's moments are kept; the learning-rate schedule continues at this step with the new values)")
    save_config(config, out_dir)


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool = False) -> None:
    """Keep two runs out of one out_dir, and clear what writes killed midway left in it.

    A fresh run needs an empty or new out_dir; ``overwrite`` first deletes the run files there (and
    refuses when out_dir holds anything else: it is not a run's); ``resume`` continues the run there."""
    found = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if found and not resume:
        _check_overwrite(out_dir, found, overwrite)
    dist.barrier()  # every rank has looked before rank 0 deletes anything
    if dist.is_main():
        _require_writable(out_dir)
        for name in found if overwrite and not resume else filter(_leftover, found):
            _remove(out_dir / name)
        checkpoint.remove_temporaries(out_dir / "checkpoints")
    dist.barrier()


def _require_writable(out_dir: Path) -> None:
    """Create out_dir and write a file in it, so that a directory the run cannot write to is refused
    before training (OutDirError) rather than at its first checkpoint, with a traceback."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != out_dir else ""
        raise OutDirError(f"out_dir {out_dir} cannot be written: {reason}{where}; choose a writable --out_dir") from None


def _check_overwrite(out_dir: Path, found: list[str], overwrite: bool) -> None:
    shown = [f"{name}/" if (out_dir / name).is_dir() else name for name in found[:6]]
    listing = ", ".join(shown) + (", ..." if len(found) > 6 else "")
    if not overwrite:
        raise FileExistsError(
            f"out_dir {out_dir} is not empty ({listing}): pass --resume to continue the run there, "
            "--overwrite to delete its files and start again, or choose another out_dir"
        )
    foreign = [name for name in found if name not in RUN_FILES and not _leftover(name)]
    if foreign:
        raise FileExistsError(
            f"out_dir {out_dir} holds files no run writes ({', '.join(foreign[:6])}), so --overwrite will not "
            f"delete it: choose another out_dir, or move them away (a run writes only {', '.join(RUN_FILES)})"
        )


def _leftover(name: str) -> bool:
    """``name`` is what a write of one of RUN_FILES, killed midway, left behind."""
    match = LEFTOVER_RE.match(name)
    return match is not None and match.group("target") in RUN_FILES


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_config(config, out_dir: Path) -> None:
    """The resolved configuration as config.yaml (rank 0)."""
    if not dist.is_main():
        return
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    checkpoint.write_atomically(out_dir / "config.yaml", lambda f: f.write(text.encode()))


def save_summary(out_dir: Path, summary: dict) -> None:
    if dist.is_main():
        text = json.dumps(summary, indent=2) + "\n"
        checkpoint.write_atomically(out_dir / "summary.json", lambda f: f.write(text.encode()))


def save_policy(model, tokenizer, directory: Path) -> None:
    """A causal LM and its tokenizer as a transformers directory, written aside then renamed (rank 0).
    Sharded with FSDP2, consolidated first (``fsdp.save_hf_model``; every rank must call it then)."""
    from . import fsdp

    if fsdp.is_sharded(model):
        fsdp.save_hf_model(model, directory, tokenizer)
    elif dist.is_main():
        _save_whole_policy(model, tokenizer, directory)


@quiet_transformers()
def _save_whole_policy(model, tokenizer, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, directory)


def plot_run(out_dir: Path, title: str, panels: tuple[str, ...], hlines=None) -> Path | None:
    return plot_metrics(read_metrics(out_dir / "metrics.jsonl"), out_dir / "metrics.png", title=title, panels=panels, hlines=hlines)
