"""The linear-head ops on a vocabulary-parallel lm_head: rank r holds weight rows [o_r, o_r + V_r) (bias likewise).

Two sweeps over the token chunks (``linear_chunks.sweep``), as ``linear_token_logprobs``: the
forward computes each chunk's shard logits and the shard's row statistics, ``vocab_parallel.combine``
turns them into the whole vocabulary's logp and entropy and the shard's log share of the softmax
(two all-reduces of O(N) floats); the backward recomputes each chunk's shard logits and writes the
global-softmax gradient with ``vocab_parallel.ShardProvider`` (no communication), pushes it through the head (the weight and
bias gradients of this shard's rows), and all-reduces (SUM) the hidden-state gradient, a sum over
the whole vocabulary of which each rank holds its shard's part (Megatron's ColumnParallelLinear
backward). The gradient-in-forward single sweep of ``linear_loss`` cannot apply: a token's
gradient needs the other shards' statistics, which exist only once the forward's all-reduce is done.
"""

from __future__ import annotations

import torch

from .linear_chunks import LinearSpec, RowStats, gather_rows, kept_rows, logprobs_backward_sweep, scatter_rows, sweep
from .vocab_parallel import Shard, ShardProvider, all_reduce_sum_, check_labels, combine, shard_of


class VocabParallelLinearLogprobs(torch.autograd.Function):
    """logp (and entropy) [N] of the whole vocabulary for the rows ``index`` keeps (None: all), 0 at the others."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, spec: LinearSpec, shard: Shard, with_entropy: bool):
        kept_labels = gather_rows(labels, index)
        prov = ShardProvider(shard, spec.backend)
        rows = RowStats.empty(kept_labels.shape[0], with_entropy, spec.compute_dtype, hidden.device)
        sweep(hidden, weight, bias, kept_labels, spec, rows, forward=True, index=index, provider=prov)
        logp, entropy, log_mass = combine(shard, kept_labels, spec.ignore_index, rows.logp, rows.entropy, rows.lse)
        entropy = entropy if with_entropy else log_mass.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, kept_labels, index, rows.lse, entropy)
        ctx.log_mass = log_mass  # an intermediate: no version to check
        ctx.spec, ctx.prov = spec, prov
        n_rows = labels.shape[0]
        return scatter_rows(logp, index, n_rows), scatter_rows(entropy, index, n_rows) if with_entropy else entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        need = ctx.needs_input_grad[:3]
        grad_hidden, grad_weight, grad_bias = logprobs_backward_sweep(ctx, grad_logp, grad_entropy, provider=ctx.prov,
                                                                      log_mass=ctx.log_mass)  # fmt: skip
        # Each rank holds its shard's part of sum_k G_k W_k: the hidden gradient is their sum.
        if need[0]:
            all_reduce_sum_(grad_hidden, ctx.prov.shard)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def linear_token_logprobs(flat_hidden, weight, bias, flat_labels, spec: LinearSpec, group, with_entropy: bool):
    """Validated [N, H] hidden, this rank's [V_r, H] weight shard (bias [V_r]), global labels [N]
    -> the whole vocabulary's (logp [N], entropy [N] or [0])."""
    shard = shard_of(group, weight.shape[0], flat_labels.shape[0], flat_hidden.device, what="weight",
                     hidden_size=flat_hidden.shape[1])  # fmt: skip
    check_labels(flat_labels, shard, spec.ignore_index)
    index = kept_rows(flat_labels != spec.ignore_index)
    return VocabParallelLinearLogprobs.apply(flat_hidden, weight, bias, flat_labels, index, spec, shard, with_entropy)
