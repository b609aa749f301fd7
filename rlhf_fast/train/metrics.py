"""Metrics: one JSON object per line in metrics.jsonl, a progress bar, and a PNG of the curves at the end.

Each record has "step" and "split" ("train": means over the last log_every steps; "eval": held-out
metrics), plus numbers. Only rank 0 writes.

A process killed while appending leaves a torn last line (no newline at its end): ``read_metrics``
drops it with a warning, and a resumed run rewrites the file without it (``drop_after``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from . import dist
from .checkpoint import write_atomically


class MetricsLog:
    """Append-only JSONL of metric records (rank 0)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        if not dist.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget records past ``step`` (a resumed run logs them again)."""
        if not dist.is_main() or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_atomically(self.path, lambda f: f.write(text.encode()))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (see the module docstring) is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete, _, torn = data.rpartition(b"\n")
    if torn:
        warnings.warn(f"{path}: dropping its last line, torn by a process killed while writing it: {torn[:80]!r}", stacklevel=2)
    records = []
    for number, line in enumerate(complete.decode().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON record ({exc})") from None
    return records


class ProgressBar:
    """A tqdm bar over the run's steps (rank 0, when enabled) showing the metrics ``shown``: an ``on_step`` hook."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, shown: tuple[str, ...]):
        self.bar = None
        self.shown = shown
        if enabled and dist.is_main():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def __call__(self, run, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.shown if k in metrics}, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif dist.is_main():
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plot_metrics(
    records: list[dict],
    path: str | os.PathLike,
    *,
    title: str,
    panels: tuple[str, ...] = ("loss",),
    hlines: dict[str, tuple[str, float]] | None = None,
) -> Path | None:
    """One panel per metric in ``panels``: train and eval curves against step; ``hlines`` adds a
    labelled horizontal line to a panel (e.g. the gold ceiling on "accuracy"). Returns the PNG path."""
    if not dist.is_main():
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = tuple(p for p in panels if any(p in r for r in records))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r and _finite(r[key])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=split, markersize=3)
        if hlines and key in hlines:
            label, value = hlines[key]
            ax.axhline(value, linestyle="--", color="gray", label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
