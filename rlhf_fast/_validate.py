"""Argument checks shared by every op: one place, messages that name the argument, what it was and what was expected."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def describe(t: torch.Tensor) -> str:
    """'shape (2, 5), dtype torch.float32, device cpu' for error messages."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(
    name: str,
    value,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: Sequence[int] | None = None,
    min_dim: int | None = None,
    like: tuple[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Check one tensor argument and return it; raise TypeError/ValueError naming ``name`` otherwise.

    ``like=(other_name, other)`` requires the same device as ``other``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            expected = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({expected}); got {describe(value)}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s); got {describe(value)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {describe(value)}")
    if like is not None:
        other_name, other = like
        if value.device != other.device:
            raise ValueError(
                f"{name} must be on the same device as {other_name} ({other.device}); got {describe(value)}"
            )
    return value


def positive_finite(name: str, value: float) -> float:
    """A float that must be > 0 and finite (temperature, clip ranges...)."""
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Every label is in [0, vocab) or equal to ignore_index (one reduction; syncs on CUDA)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[position])
        raise ValueError(
            f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got {value} at position {position} ({describe(labels)})"
        )
