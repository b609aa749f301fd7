"""linear_token_logprobs: token_logprobs(hidden @ weight.T + bias, labels) without the [N, V] logits.

At vocabularies of 128k-152k the logits of an RLHF batch dwarf everything else (bf16 [16384 x
128256] is 4 GiB, and eager PyTorch keeps several float32 copies). This op computes them a chunk
of tokens at a time (``linear_chunks.sweep``) and keeps only lse and entropy per token; the
backward recomputes each chunk's logits. See ``linear_chunks`` for the memory and FLOP counts.
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..options import LinearOptions, no_leftovers, take
from ..reference import IGNORE_INDEX
from . import linear_vocab_parallel
from .linear_chunks import LinearSpec, RowStats, gather_rows, kept_rows, logprobs_backward_sweep, scatter_rows, sweep

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def autocast_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype ``F.linear`` would compute this head in under the active autocast, or None.

    Under autocast (the usual mixed-precision training: float32 weights, bf16 matmuls) the head
    runs in autocast's dtype like torch's own linear, whatever mix of float32/bf16/fp16 hidden and
    weight come in; the gradients come back in the inputs' own dtypes (the weight's summed in
    float32 straight into a float32 weight's gradient). float64 is never cast, as in autocast.
    """
    device = hidden.device.type
    low = (torch.float32, torch.bfloat16, torch.float16)
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device) and hidden.dtype in low and weight.dtype in low:
        return torch.get_autocast_dtype(device)
    return None


def check_linear(hidden, weight, bias, labels, *, labels_shape=None):
    """Validate the linear head's inputs; return (hidden [N, H], labels [N] contiguous).

    hidden [..., H] float; weight [V, H] of hidden's dtype (any float16/bfloat16/float32 mix under
    autocast) and device; bias [V] or None, weight's dtype; labels of shape ``labels_shape``
    (default hidden.shape[:-1]), int64 or int32.
    """
    check.tensor("hidden", hidden, dtypes=HIDDEN_DTYPES, min_dim=1)
    check.tensor("weight", weight, dtypes=HIDDEN_DTYPES, like=("hidden", hidden))
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the lm_head / output embedding); got {check.describe(weight)}")
    if weight.dtype != hidden.dtype and autocast_dtype(hidden, weight) is None:
        raise TypeError(
            f"weight must have hidden's dtype ({hidden.dtype}) outside autocast; got {check.describe(weight)}. "
            "Cast one of them (the logits are computed in that dtype)."
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}; got {check.describe(weight)} "
            f"(hidden: {check.describe(hidden)})"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a non-empty vocabulary (first) dimension; got {check.describe(weight)}")
    if bias is not None:
        check.tensor("bias", bias, dtypes=(weight.dtype,), shape=weight.shape[:1], like=("hidden", hidden))
    shape = hidden.shape[:-1] if labels_shape is None else labels_shape
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape=shape, like=("hidden", hidden))
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).contiguous()


def weight_grad_sum_dtype(accum_dtype: torch.dtype | None, weight: torch.Tensor) -> torch.dtype:
    """The dtype the weight gradient is summed in over chunks: float32 by default (float64 for a
    float64 weight), or with ``accum_dtype=None`` the weight's own dtype, as Liger's default: a
    bf16/fp16 weight then needs a 2-byte [V, H] sum instead of a 4-byte one (half the memory at
    the peak), at the price of one rounding per chunk of C rows instead of one in all."""
    if accum_dtype is not None and accum_dtype not in (torch.float32, weight.dtype):
        raise ValueError(
            f"accum_dtype must be torch.float32 (sum the weight gradient in float32) or None (in the weight's "
            f"dtype, {weight.dtype}); got {accum_dtype!r}"
        )
    if accum_dtype is None or weight.dtype == torch.float64:
        return weight.dtype
    return accum_dtype


def make_spec(temperature, ignore_index, linear: LinearOptions, hidden, weight) -> LinearSpec:
    temperature = check.temperature(temperature)
    scale = float(linear.logit_scale)
    if temperature / scale < check.MIN_TEMPERATURE:
        # The scale may reach the kernels as the temperature T / s (LinearSpec.kernel_temperature):
        # s z / T must stay finite in float32 as z / T must (check.MIN_TEMPERATURE).
        raise ValueError(
            f"temperature / logit_scale must be >= {check.MIN_TEMPERATURE:g} (the scaled logits over the "
            f"temperature must stay finite in float32); got temperature={temperature:g}, logit_scale={scale:g}"
        )
    cap = None if linear.logit_softcap is None else float(linear.logit_softcap)
    compute = autocast_dtype(hidden, weight) or hidden.dtype
    sum_dtype = weight_grad_sum_dtype(linear.accum_dtype, weight)
    return LinearSpec(temperature, int(ignore_index), linear.backend, linear.chunk_size, compute, sum_dtype, scale, cap)


class LinearTokenLogprobs(torch.autograd.Function):
    """logp (and entropy) [N] of the rows ``index`` keeps (None: all), 0 at the others."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, spec: LinearSpec, with_entropy: bool):
        kept_labels = gather_rows(labels, index)
        rows = RowStats.empty(kept_labels.shape[0], with_entropy, spec.compute_dtype, hidden.device)
        sweep(hidden, weight, bias, kept_labels, spec, rows, forward=True, index=index)
        entropy = rows.entropy if with_entropy else rows.lse.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, kept_labels, index, rows.lse, entropy)
        ctx.spec = spec
        n_rows = labels.shape[0]
        return scatter_rows(rows.logp, index, n_rows), scatter_rows(entropy, index, n_rows) if with_entropy else entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return logprobs_backward_sweep(ctx, grad_logp, grad_entropy) + (None, None, None, None)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    linear: LinearOptions | None = None,
    vocab_group=None,
    **option_kwargs,
):
    """Log-probability of each label (and the entropy) under softmax((hidden @ weight.T + bias) / T).

    Same values and gradients as ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` (with
    the logits scaled and soft-capped as ``reference.linear_logits`` does, if ``linear`` says so), with
    peak extra memory of one [C, V] chunk of logits, the [V, H] float32 weight gradient and the
    [N, H] hidden gradient instead of several [N, V] tensors.

    Args:
        hidden: [..., H] float32, bfloat16, float16 (float64 on the torch and host backends):
            the last hidden states, before the head (see ``rlhf_fast.hf.hidden_and_head``).
        weight: [V, H], hidden's dtype and device: the lm_head (possibly tied to the embedding).
            Under autocast the head runs in autocast's dtype, as ``F.linear`` would (float32
            weights with bf16 hidden states included).
        labels: [...] = hidden.shape[:-1], int64 or int32, in [0, V) or ``ignore_index``.
        bias: [V] or None.
        temperature, ignore_index, return_entropy: as in ``token_logprobs``.
        linear: a ``LinearOptions`` (None: its defaults); its fields may also be passed as keyword
            arguments: backend (as in ``token_logprobs``), chunk_size (token rows per chunk; None
            picks it from the shape, ``linear_chunks.chunk_rows``), accum_dtype (what the weight
            gradient is summed over chunks in: torch.float32, the default, or None for the
            weight's own dtype, which halves that [V, H] sum's memory for bf16/fp16 weights and
            rounds it once per chunk, Liger's default; ``weight_grad_sum_dtype``), logit_scale and
            logit_softcap (the head's logit transform, before the temperature:
            logits = c tanh(s (hidden @ weight.T + bias) / c); ``rlhf_fast.hf.head_options`` reads
            them from a transformers model's config).
        vocab_group: a torch.distributed process group whose ranks each hold a contiguous shard of
            the lm_head's rows, in rank order: ``weight`` is then this rank's [V_r, H] (``bias``
            its [V_r]) for the ids [o_r, o_r + V_r), o_r the sum of the lower ranks' V_r, labels
            are global ids, and every rank gets the whole vocabulary's logp and entropy (two
            all-reduces of O(N) floats, ``linear_vocab_parallel``). The backward gives this
            shard's weight and bias gradients and the hidden gradient summed over the group (one
            all-reduce of [N, H]). None (default): the whole head is here.

    Returns:
        float32 logp of ``labels.shape`` (float64 for float64 inputs), and the entropy if asked;
        differentiable w.r.t. hidden, weight and bias. The weight gradient is summed in float32
        whatever the inputs' dtype, unless ``accum_dtype=None``. The backward recomputes the
        logits chunk by chunk. Rows whose label is ``ignore_index`` (prompts, padding) cost no FLOPs.

    Non-finite values: NaN or inf in a valid row of ``hidden`` makes that row's logp, entropy and
    hidden gradient NaN, and the whole weight (and bias) gradient NaN, since every vocabulary
    row's gradient sums over the valid rows; NaN or inf anywhere in ``weight`` makes every valid
    row NaN. Ignored rows never reach a result. RLHF_FAST_CHECK=1 checks for them.
    """
    linear = take(LinearOptions, linear, option_kwargs, "linear")
    no_leftovers("linear_token_logprobs", option_kwargs, LinearOptions)
    flat_hidden, flat_labels = check_linear(hidden, weight, bias, labels)
    spec = make_spec(temperature, ignore_index, linear, hidden, weight)
    if check.CHECK:  # RLHF_FAST_CHECK=1: values too (README, "Non-finite values")
        check.linear_values(flat_hidden, weight, bias, flat_labels != spec.ignore_index)
    if vocab_group is not None:
        logp, entropy = linear_vocab_parallel.linear_token_logprobs(flat_hidden, weight, bias, flat_labels, spec,
                                                                    vocab_group, return_entropy)  # fmt: skip
    else:
        check.labels_in_range(flat_labels, weight.shape[0], spec.ignore_index)
        index = kept_rows(flat_labels != spec.ignore_index)
        logp, entropy = LinearTokenLogprobs.apply(flat_hidden, weight, bias, flat_labels, index, spec, return_entropy)
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
