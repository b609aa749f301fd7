"""Vocabulary-parallel log-probs: each rank of ``vocab_group`` holds a contiguous slice of the vocabulary.

Megatron's ColumnParallelLinear (gather_output=False) leaves rank r with logits [N, V_r] of the
vocabulary ids [o_r, o_r + V_r), o_r = V_0 + ... + V_{r-1} (rank order; uneven V_r allowed). The
ops keep labels global and never gather the logits. Per row, with z = logits / T:

1. Each rank runs the ordinary forward kernel on its shard with the shard's vocabulary offset
   (``ShardProvider``): the shard's lse_r, entropy H_r of its own softmax p_r = e^(z - lse_r), and
   logp_r of the label if it owns it (0 if not; the kernel never reads a column it does not have).
2. ``combine``: m = max_r lse_r (one MAX all-reduce of [N]), d_r = lse_r - m <= 0, e_r = e^(d_r),
   then one SUM all-reduce of the stacked [k, N] rows
        S = sum_r e_r,   A = sum_r [r owns the label] (logp_r + d_r),   B = sum_r e_r (H_r - d_r),
   giving lse = m + log S, logp = z_label - lse = A - log S and the entropy
        H = -sum_k p_k log p_k,  p_k = (e_r / S) p_r,k   =>   H = B / S + log S.
   Every term of B and log S is >= 0 (H_r >= 0, d_r <= 0, S >= 1): nothing cancels. The shard's
   log share of the probability mass, log_mass_r = lse_r - lse = d_r - log S <= 0, is a sum of
   two non-positive terms; it carries the rounding of the shards' float32 lse (2^-24 |lse_r|,
   as a saved whole-vocabulary lse would), nothing more.
3. Backward, local to each shard (no communication for the logits' gradient): the same backward
   kernel as the whole vocabulary's, given the shard's lse_r, log_mass_r and offset. The global
   softmax on the shard's columns is log p_k = z_k - lse_r + log_mass_r, and
        d/dz_k = g [k = label] - p_k (g + g_H (log p_k + H)),   d/dlogits = d/dz / T,
   the label term on the owning rank only. Where |lse_r| is large the kernels recompute the
   shard's own max and sum (kernels/token_logprobs.py), but log_mass_r keeps the lse rounding
   above: logits near 1e6 get a float32 lse's accuracy on a shard, not the single process's.

The linear ops use the same provider in ``linear_chunks.sweep``; their hidden-state gradient is a
sum over the vocabulary, so each rank's partial is all-reduced (SUM), as Megatron does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _validate as check
from ..backends import registry
from ..backends.base import Provider

@dataclass(frozen=True)
class Shard:
    """This rank's slice [offset, offset + size) of a vocabulary of ``total`` ids, and its group."""

    group: object
    offset: int
    size: int
    total: int


def shard_of(group, local_vocab: int, n_rows: int, device: torch.device, *, what: str, hidden_size: int = -1) -> Shard:
    """Validate ``vocab_group`` and the shards' sizes (one small all-gather), and place this rank's shard.

    Every rank must hold a non-empty shard and the same rows N (and hidden size H for the linear
    ops); otherwise every rank raises the same error, naming each rank's sizes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"vocab_group was given ({group!r}) but torch.distributed is not initialised: vocab_group is for "
            "vocabulary shards spread over processes (torchrun + init_process_group); pass vocab_group=None "
            "to run on the whole vocabulary in this process"
        )
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError(
            f"vocab_group has {world} process; a vocabulary-parallel op needs at least 2 ranks holding a shard "
            f"each. Pass vocab_group=None for the whole vocabulary in one process ({what}: V = {local_vocab})"
        )
    mine = torch.tensor([local_vocab, n_rows, hidden_size], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    sizes = [tuple(int(v) for v in t.tolist()) for t in every]
    vocab = [s[0] for s in sizes]
    rows = {s[1] for s in sizes}
    hidden = {s[2] for s in sizes}
    if min(vocab) < 1 or len(rows) > 1 or len(hidden) > 1:
        names = "(V_r, N, H)" if hidden_size >= 0 else "(V_r, N)"
        table = ", ".join(f"rank {r}: {s if hidden_size >= 0 else s[:2]}" for r, s in enumerate(sizes))
        raise ValueError(
            f"vocab_group shards disagree: {what} {names} per rank are {table}. Every rank needs a non-empty "
            "vocabulary shard V_r and the same tokens N" + (" and hidden size H" if hidden_size >= 0 else "")
        )
    rank = dist.get_rank(group)
    return Shard(group, sum(vocab[:rank]), vocab[rank], sum(vocab))


def check_labels(labels: torch.Tensor, shard: Shard, ignore_index: int) -> None:
    """Labels are global ids: in [0, V) of the whole vocabulary, or ignore_index."""
    check.labels_in_range(labels, shard.total, ignore_index)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def combine(shard: Shard, labels, ignore_index, logp_r, entropy_r, lse_r):
    """The shards' row statistics [N] -> the whole vocabulary's (logp, entropy or None) and this
    shard's log share of the softmax mass, log_mass (<= 0).

    Two collectives of O(N) floats: MAX of the shards' lse, then one SUM of the stacked [k, N]
    (k = 2, or 3 with entropy); see the module docstring, step 2. Ignored rows give 0.
    """
    keep = labels != ignore_index
    here = keep & (labels >= shard.offset) & (labels < shard.offset + shard.size)
    m = _all_reduce(torch.where(keep, lse_r, 0.0), dist.ReduceOp.MAX, shard.group)
    d = lse_r - m
    e = d.exp()
    parts = [e, torch.where(here, logp_r + d, 0.0)]
    if entropy_r is not None:
        parts.append(torch.where(e > 0, e * (entropy_r - d), 0.0))
    sums = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, shard.group)
    log_s = sums[0].log()
    logp = torch.where(keep, sums[1] - log_s, 0.0)
    entropy = torch.where(keep, sums[2] / sums[0] + log_s, 0.0) if entropy_r is not None else None
    return logp, entropy, torch.where(keep, d - log_s, 0.0)


def all_reduce_sum_(t: torch.Tensor | None, shard: Shard) -> torch.Tensor | None:
    """The hidden-state gradient: each shard's partial sum over its vocabulary, summed over the group."""
    if t is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


class ShardProvider(Provider):
    """The token_logprobs provider of one vocabulary shard, called with global labels: the
    backend's own kernels with the shard's vocabulary offset (the backward also needs log_mass)."""

    def __init__(self, shard: Shard, backend: str):
        self.shard, self.backend = shard, backend
        self.name = f"vocab-parallel {backend}"

    def _inner(self, logits: torch.Tensor) -> Provider:
        return registry.resolve(self.backend, logits.device, logits.dtype)

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index, vocab_offset=0):
        self._inner(logits).token_logprobs_forward(logits, labels, logp, entropy, lse, temperature, ignore_index,
                                                   self.shard.offset)  # fmt: skip

    def token_logprobs_backward(self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature,
                                ignore_index, vocab_offset=0, log_mass=None):  # fmt: skip
        if log_mass is None:
            raise ValueError("a vocabulary shard's backward needs log_mass, the shard's log share of the softmax (combine)")
        self._inner(logits).token_logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits,
                                                    temperature, ignore_index, self.shard.offset, log_mass)  # fmt: skip


class VocabParallelLogprobs(torch.autograd.Function):
    """[N, V_r] logits shard, [N] global labels -> global logp [N] and entropy [N] (or [0])."""

    @staticmethod
    def forward(ctx, logits, labels, shard: Shard, temperature, ignore_index, with_entropy, inplace, backend):
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        prov = ShardProvider(shard, backend)
        n_rows = logits.shape[0]
        logp_r, lse_r = (torch.zeros(n_rows, dtype=out_dtype, device=logits.device) for _ in range(2))
        entropy_r = torch.zeros(n_rows, dtype=out_dtype, device=logits.device) if with_entropy else None
        if n_rows > 0:
            prov.token_logprobs_forward(logits, labels, logp_r, entropy_r, lse_r, temperature, ignore_index)
        logp, entropy, log_mass = combine(shard, labels, ignore_index, logp_r, entropy_r, lse_r)
        entropy = entropy if with_entropy else logp.new_empty(0)
        ctx.save_for_backward(logits, labels, lse_r, entropy, log_mass)
        ctx.options = (prov, temperature, ignore_index, inplace)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy, log_mass = ctx.saved_tensors
        prov, temperature, ignore_index, inplace = ctx.options
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
        with_entropy = entropy.numel() > 0
        if with_entropy:
            grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.to(lse.dtype).contiguous()
        grad_logits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        prov.token_logprobs_backward(logits, labels, lse, entropy if with_entropy else None, grad_logp,
                                     grad_entropy if with_entropy else None, grad_logits, temperature, ignore_index,
                                     log_mass=log_mass)  # fmt: skip
        return grad_logits, None, None, None, None, None, None, None


def token_logprobs(flat_logits, flat_labels, shard: Shard, temperature, ignore_index, with_entropy, inplace, backend):
    """``token_logprobs`` of a logits shard [N, V_r] (validated, flattened; ``shard_of``) with global labels [N]."""
    check_labels(flat_labels, shard, ignore_index)
    return VocabParallelLogprobs.apply(flat_logits, flat_labels, shard, temperature, ignore_index, with_entropy,
                                       inplace, backend)  # fmt: skip
