"""Argument checks shared by every op: one place, messages that name the argument, what it was and what was expected."""

from __future__ import annotations

import contextlib
import math
import os
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


# Smallest softmax temperature the ops accept. The kernels scale the logits by 1 / temperature in
# float32, so a logit x stays finite only while |x| / temperature < 3.4e38 (float32's max); past
# that the row's max becomes inf and every result of the row NaN (temperature=1e-38 does it to a
# logit of 4). Checking the logits' actual max would cost a pass over [N, V] and a device sync, so
# the bound is static: at 1e-4, logits up to 3.4e34 stay finite, thirty orders of magnitude past
# what a language model emits (|x| ~ 10-100); masking values (-inf, or finfo.min, which overflows
# to -inf) get p = 0 either way. A smaller temperature would change nothing worth having: at 1e-4,
# logits 1.7e-3 apart already differ by a factor 2^-24 in probability (the softmax is the argmax
# to float32 precision).
MIN_TEMPERATURE = 1e-4


def temperature(value) -> float:
    """The softmax temperature: a finite number >= MIN_TEMPERATURE (see there for the bound)."""
    value = positive_finite("temperature", value)
    if value < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:g} (logits / temperature must stay finite in float32, "
            f"and below it the softmax is already the argmax), got {value:g}"
        )
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


def choice(name: str, value, choices: Sequence):
    """One of a fixed set of options (agg mode, estimator...)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite float in [low, high] (or (low, high] with ``low_open``); either bound may be None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if math.isnan(value) or math.isinf(value) or below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value}")
    return value


MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64) + FLOAT_DTYPES


def max_response_length(length, agg: str):
    """None, or an int >= 1 with agg="seq-mean-token-sum-norm" (the only mode it applies to)."""
    if length is None:
        return None
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"max_response_length must be None or an int >= 1 (tokens), got {length!r}")
    if agg != "seq-mean-token-sum-norm":
        raise ValueError(f"max_response_length applies to agg='seq-mean-token-sum-norm' only; got agg={agg!r}")
    return length


def mask(name: str, value, *, shape: Sequence[int] | None = None, like: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """A [B, T] token mask: bool, or 0/1 in any integer or float dtype (verl's response_mask, TRL's
    completion_mask); returned as bool. Any other value is an error, not a weight: the ops count
    tokens, they do not weight them. Checking a non-bool mask's values costs one small
    device-to-host sync on CUDA; a bool mask is taken as it is."""
    tensor(name, value, dtypes=MASK_DTYPES, shape=shape, like=like)
    if value.dtype == torch.bool:
        return value
    bad = (value != 0) & (value != 1)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must hold only 0 and 1 (or be bool); {int(bad.sum())} of {value.numel()} values are neither, "
            f"the first {value[where].item()!r} at index {where} ({describe(value)})"
        )
    return value != 0


def group_size(value, batch: int, *, mode: str) -> int:
    """Rows per group: an int >= 1 (>= 2 for modes that divide by G - 1 or a std) dividing the batch."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"group_size must be an int, got {type(value).__name__}")
    minimum = 1 if mode in ("drgrpo", "opo") else 2
    if value < minimum:
        why = "" if minimum == 1 else f" with mode={mode!r} (its std / leave-one-out mean needs two members)"
        raise ValueError(f"group_size must be >= {minimum}{why}, got {value}")
    if batch % value:
        raise ValueError(f"the batch ({batch} rows) must be divisible by group_size={value}")
    return value


# ---------------------------------------------------------------------------------------- check mode
# The checks above cost nothing that scales with the data (bool masks, shapes, dtypes). The value
# checks below read every input once more and sync with the device, so they run only in check mode:
# RLHF_FAST_CHECK=1 in the environment (read once, here, at import), or ``checking()``. The public
# ops test the one cached bool ``CHECK`` and call nothing when it is off.


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


CHECK: bool = _env_flag("RLHF_FAST_CHECK")


@contextlib.contextmanager
def checking(enabled: bool = True):
    """Turn check mode on (or off) for the block, whatever RLHF_FAST_CHECK says; not thread-local."""
    global CHECK
    previous, CHECK = CHECK, bool(enabled)
    try:
        yield
    finally:
        CHECK = previous


def _first_bad(name: str, value: torch.Tensor, bad: torch.Tensor, where: str, expected: str) -> None:
    """Raise naming the first True of ``bad`` (value's shape) and how many there are, if any."""
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"RLHF_FAST_CHECK: {name} holds {value[index].item()} at index {index}{where}; {expected} "
        f"({int(bad.sum())} such value(s); {describe(value)})"
    )


def _at_valid(bad: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``bad`` restricted to the positions where ``valid`` (a prefix of bad's shape) is True."""
    if valid is None:
        return bad
    return bad & valid.reshape(tuple(valid.shape) + (1,) * (bad.dim() - valid.dim())).to(bad.device)


def finite_values(name: str, value: torch.Tensor | None, valid: torch.Tensor | None = None, where: str = "") -> None:
    """Check mode: ``value`` is finite wherever ``valid`` (bool, a prefix of its shape) is True."""
    if value is not None:
        _first_bad(name, value, _at_valid(~torch.isfinite(value), valid), where, "it must be finite there")


def logits_values(name: str, logits: torch.Tensor, labels: torch.Tensor | None, valid: torch.Tensor) -> None:
    """Check mode: logits [..., V] at valid rows hold no NaN and no +inf, and no -inf at the label
    (-inf elsewhere masks a token out of the softmax, which the ops support). ``labels`` None: no
    label check (a vocabulary shard, whose local ids the global labels are not)."""
    where = ", a valid row"
    bad = _at_valid(torch.isnan(logits) | torch.isposinf(logits), valid)
    _first_bad(name, logits, bad, where, "NaN or +inf there makes the row's log-probs and gradient NaN")
    if labels is None:
        return
    vocab = logits.shape[-1]
    at_label = logits.gather(-1, labels.clamp(0, vocab - 1).unsqueeze(-1).to(logits.device)).squeeze(-1)
    bad = torch.isneginf(at_label) & valid & (labels >= 0) & (labels < vocab)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"RLHF_FAST_CHECK: {name} holds -inf at the label of valid row {index} (label {int(labels[index])}): "
                         f"its log-prob would be -inf ({int(bad.sum())} such row(s); {describe(logits)})")  # fmt: skip


def log_prob_values(name: str, value: torch.Tensor | None, valid: torch.Tensor) -> None:
    """Check mode: log-probabilities at valid positions are finite and <= 0 (0.01 allowed for rounding)."""
    if value is None:
        return
    finite_values(name, value, valid, ", a valid token")
    _first_bad(name, value, _at_valid(value > 0.01, valid), ", a valid token",
               "log-probabilities are <= 0 (probabilities or logits passed instead?)")  # fmt: skip


def policy_values(mask: torch.Tensor, **values: torch.Tensor | None) -> None:
    """Check mode, the [B, T] inputs of the policy losses at valid tokens (``mask``, bool): the
    log-probs (``logp``, ``old_logp``, ``ref_logp``, ``rollout_logp``) finite and <= 0, the
    ``advantages`` ([B, T], or [B] at sequences with a valid token) and ``entropy`` finite."""
    for name, value in values.items():
        if value is None:
            continue
        if name == "advantages" and value.dim() == 1:
            finite_values(name, value, mask.any(-1), ", a sequence with valid tokens")
        elif name in ("advantages", "entropy"):
            finite_values(name, value, mask, ", a valid token")
        else:
            log_prob_values(name, value, mask)


def normalizer_value(normalizer) -> None:
    """Check mode: a tensor normalizer is finite and > 0 (a number is always checked)."""
    if isinstance(normalizer, torch.Tensor):
        value = float(normalizer)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"RLHF_FAST_CHECK: normalizer must be finite and > 0, got {value} (a zero one makes the loss "
                             "+-inf, a negative one flips its sign)")  # fmt: skip


def linear_values(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor) -> None:
    """Check mode, the linear ops: hidden [..., H] finite at valid rows, weight [V, H] finite (every
    row of it enters every valid row's softmax), bias free of NaN and +inf (-inf masks a token)."""
    finite_values("hidden", hidden, valid, ", a valid row")
    finite_values("weight", weight, None)
    if bias is not None:
        _first_bad("bias", bias, torch.isnan(bias) | torch.isposinf(bias), "",
                   "NaN or +inf there makes every valid row's log-probs NaN")  # fmt: skip
