"""Vocabulary-parallel log-probs: each rank of ``vocab_group`` holds a contiguous slice of the vocabulary.

Megatron's ColumnParallelLinear (gather_output=False) leaves rank r with logits [N, V_r] of the
vocabulary ids [o_r, o_r + V_r), o_r = V_0 + ... + V_{r-1} (rank order; uneven V_r allowed). The
ops keep labels global and never gather the logits. Per row, with z = logits / T:

1. Each rank runs the ordinary forward kernel on its shard (``ShardProvider.token_logprobs_forward``,
   labels shifted by -o_r, a label owned elsewhere read as column 0 and discarded): the shard's
   lse_r, entropy H_r of its own softmax p_r = e^(z - lse_r), and logp_r of the label if it owns it.
2. ``combine``: m = max_r lse_r (one MAX all-reduce of [N]), d_r = lse_r - m <= 0, e_r = e^(d_r),
   then one SUM all-reduce of the stacked [k, N] rows
        S = sum_r e_r,   A = sum_r [r owns the label] (logp_r + d_r),   B = sum_r e_r (H_r - d_r),
   giving lse = m + log S, logp = z_label - lse = A - log S and the entropy
        H = -sum_k p_k log p_k,  p_k = (e_r / S) p_r,k   =>   H = B / S + log S.
   Every term of B and log S is >= 0 (H_r >= 0, d_r <= 0, S >= 1): nothing cancels.
3. Backward, local to each shard (no communication for the logits' gradient): with the global lse
   and H, p_k = e^(z_k - lse) is the global softmax on the shard's columns and
        d/dz_k = g [k = label] - p_k (g + g_H (log p_k + H)),   d/dlogits = d/dz / T,
   the label term on the owning rank only. The existing backward kernels cannot serve it: they
   put the label's one-hot on every row that is not ignored, and the torch provider recomputes the
   shard's own lse instead of reading the saved one. So ``ShardProvider.token_logprobs_backward``
   is a torch formulation on every backend, [rows, V_r] float32 slices at a time (as the torch
   provider's), written into the gradient (or the logits' storage) in the logits' dtype.

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

# [rows, V_r] slices of at most this many elements in the backward (16 MiB of float32).
CHUNK_ELEMENTS = 2**22
# log p floored here in the entropy term: e^-1000 is 0, and a -inf logit gives 0 * finite, not NaN.
LOG_FLOOR = -1000.0


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
    """The shards' row statistics [N] -> this rank's share of the global (logp, entropy or None, lse).

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
    return logp, entropy, torch.where(keep, m + log_s, 0.0)


def all_reduce_sum_(t: torch.Tensor | None, shard: Shard) -> torch.Tensor | None:
    """The hidden-state gradient: each shard's partial sum over its vocabulary, summed over the group."""
    if t is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


class ShardProvider(Provider):
    """The token_logprobs provider of one vocabulary shard, called with global labels.

    forward: the backend's own kernel on the shard (local statistics for ``combine``);
    backward: the global-softmax gradient from the combined lse and entropy (module docstring, 3).
    """

    def __init__(self, shard: Shard, backend: str):
        self.shard, self.backend = shard, backend
        self.name = f"vocab-parallel {backend}"

    def local_labels(self, labels: torch.Tensor, ignore_index: int):
        """(labels shifted into the shard with 0 for labels owned elsewhere, and the owned-here mask)."""
        shifted = labels - self.shard.offset
        here = (labels != ignore_index) & (shifted >= 0) & (shifted < self.shard.size)
        return torch.where(labels == ignore_index, labels, torch.where(here, shifted, 0)), here

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index):
        inner = registry.resolve(self.backend, logits.device, logits.dtype)
        local, _ = self.local_labels(labels, ignore_index)
        inner.token_logprobs_forward(logits, local, logp, entropy, lse, temperature, ignore_index)

    def token_logprobs_backward(
        self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature, ignore_index
    ):
        local, here = self.local_labels(labels, ignore_index)
        keep = (labels != ignore_index).unsqueeze(-1)
        safe = torch.where(here, local, 0).long().unsqueeze(-1)
        g = torch.where(keep.squeeze(-1), grad_logp, 0.0).unsqueeze(-1)
        g_label = torch.where(here, grad_logp, 0.0).unsqueeze(-1)
        lse = torch.where(keep.squeeze(-1), lse, 0.0).unsqueeze(-1)
        if entropy is not None:
            h = torch.where(keep.squeeze(-1), entropy, 0.0).unsqueeze(-1)
            g_h = torch.where(keep.squeeze(-1), grad_entropy, 0.0).unsqueeze(-1)
        step = max(1, CHUNK_ELEMENTS // max(logits.shape[1], 1))
        for r0 in range(0, logits.shape[0], step):
            rows = slice(r0, min(r0 + step, logits.shape[0]))
            # A copy (float32 logits too: the logits stay as they were), read before any write to grad_logits.
            log_p = logits[rows].to(lse.dtype, copy=True).div_(temperature).sub_(lse[rows])
            if entropy is None:  # one [rows, V_r] float32 slice alive
                grad = log_p.exp_().mul_(-g[rows])
            else:  # two: p and the coefficient
                p = log_p.exp()
                coef = log_p.clamp_(min=LOG_FLOOR).add_(h[rows]).mul_(g_h[rows]).add_(g[rows])
                grad = p.mul_(coef).neg_()
            grad.scatter_add_(-1, safe[rows], g_label[rows])
            grad.div_(temperature).masked_fill_(~keep[rows], 0.0)  # ignored rows: 0 even where p is NaN
            grad_logits[rows].copy_(grad)


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
        logp, entropy, lse = combine(shard, labels, ignore_index, logp_r, entropy_r, lse_r)
        entropy = entropy if with_entropy else logp.new_empty(0)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.options = (prov, temperature, ignore_index, inplace)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        prov, temperature, ignore_index, inplace = ctx.options
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        with_entropy = entropy.numel() > 0
        if with_entropy:
            grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.to(lse.dtype)
        grad_logits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        prov.token_logprobs_backward(logits, labels, lse, entropy if with_entropy else None, grad_logp,
                                     grad_entropy if with_entropy else None, grad_logits, temperature, ignore_index)  # fmt: skip
        return grad_logits, None, None, None, None, None, None, None


def token_logprobs(flat_logits, flat_labels, shard: Shard, temperature, ignore_index, with_entropy, inplace, backend):
    """``token_logprobs`` of a logits shard [N, V_r] (validated, flattened; ``shard_of``) with global labels [N]."""
    check_labels(flat_labels, shard, ignore_index)
    return VocabParallelLogprobs.apply(flat_logits, flat_labels, shard, temperature, ignore_index, with_entropy,
                                       inplace, backend)  # fmt: skip
