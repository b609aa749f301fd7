"""Group advantages over an arbitrary [B] group index: groups of any size in any order, singleton
groups, and NaN scores (unscorable responses) left out of their group (reference.indexed_group_advantages).

Segment reductions in torch on the scores' device: a stable sort numbers the groups 0.. without
knowing how many there are (torch.unique would synchronise with the device to size its output),
and index_add / scatter_reduce into [B] buffers give every group's count, mean and spread. The
work is O(B log B) on [B] vectors, which no batch makes worth a kernel of its own.
"""

from __future__ import annotations

import torch


def dense_group_ids(index: torch.Tensor) -> torch.Tensor:
    """[B] ints -> [B] int64 group numbers in [0, B): equal index, equal number."""
    sorted_index, order = torch.sort(index, stable=True)
    starts = torch.ones_like(sorted_index, dtype=torch.bool)
    starts[1:] = sorted_index[1:] != sorted_index[:-1]
    ids = torch.empty_like(order)
    ids[order] = starts.cumsum(0) - 1
    return ids


def _group_sum(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of ``values`` over its group. [B] -> [B]"""
    return torch.zeros_like(values).index_add(0, ids, values)[ids]


def indexed_group_advantages(scores: torch.Tensor, index: torch.Tensor, mode: str, eps: float,
                             lengths: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """[B] float32 scores, [B] integer index (validated) -> [B] float32 advantages."""
    ids = dense_group_ids(index)
    valid = torch.isfinite(scores)
    s = torch.where(valid, scores, 0.0)
    count = _group_sum(valid.float(), ids)
    mean = _group_sum(s, ids) / count.clamp(min=1)
    dev = torch.where(valid, s - mean, 0.0)
    var = _group_sum(dev * dev, ids) / (count - 1).clamp(min=1)
    # sqrt's derivative is infinite at 0: a group of equal scores takes the constant branch, whose
    # gradient is the limit (dev = 0 there, so the std's own term vanishes, as in the kernels).
    std = torch.where(var > 0, torch.sqrt(torch.where(var > 0, var, 1.0)), 0.0)
    single = count == 1
    if mode == "grpo":
        out = torch.where(single, s / (1 + eps), dev / (std + eps))
    elif mode == "drgrpo":
        out = torch.where(single, s, dev)
    elif mode == "rloo":
        out = torch.where(single, s, dev * count / (count - 1).clamp(min=1))
    elif mode == "opo":
        length = torch.where(valid, lengths.float(), 0.0)
        baseline = _group_sum(length * s, ids) / _group_sum(length, ids).clamp(min=torch.finfo(torch.float32).tiny)
        out = torch.where(single, s, s - baseline)
    else:
        out = _pass_at_k(s, valid, ids, std, single, eps)
    return torch.where(valid, out, 0.0)


def _pass_at_k(s, valid, ids, std, single, eps):
    """The best row of each group (the first among equal maxima) gets (max - second) / (std + eps)."""
    rows = torch.arange(s.shape[0], device=s.device)
    group_max = _group_reduce(torch.where(valid, s, -torch.inf), ids, "amax")
    is_max = valid & (s == group_max)
    first_max = _group_reduce(torch.where(is_max, rows, s.shape[0]), ids, "amin")
    best = rows == first_max
    second = _group_reduce(torch.where(valid & ~best, s, -torch.inf), ids, "amax")
    gap = torch.where(best & ~single, s - second, 0.0)
    return gap / (std + eps)


def _group_reduce(values: torch.Tensor, ids: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per row, ``reduce`` ("amax" / "amin") of ``values`` over its group. [B] -> [B]"""
    # torch's backward of scatter_reduce counts the elements of self equal to the result among the
    # tied extrema even with include_self=False (they take a share of the gradient): NaN equals
    # nothing. (Uninitialised memory here made the gradient depend on what the allocator held.)
    fill = torch.nan if values.is_floating_point() else 0
    out = torch.full_like(values, fill).scatter_reduce(0, ids, values, reduce, include_self=False)
    return out[ids]
