"""token_logprobs: log_softmax(logits / T)[label] and entropy, fused, with autograd and torch.library ops.

The public function validates once, flattens [..., V] to [N, V] and calls two registered ops:
``rlhf_fast::token_logprobs_fwd`` and ``rlhf_fast::token_logprobs_bwd`` (or its in-place twin
``token_logprobs_bwd_`` that writes the gradient into the logits' storage). Registering them with
fake implementations lets ``torch.compile(fullgraph=True)`` trace through without graph breaks;
the backend is resolved inside the ops, at run time.
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..backends import registry
from ..reference import IGNORE_INDEX
from . import vocab_parallel

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("rlhf_fast::token_logprobs_fwd", mutates_args=())
def _forward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V], [N] -> logp [N], entropy [N] (or [0] without entropy), lse [N]."""
    n_rows, vocab = logits.shape
    check.labels_in_range(labels, vocab, ignore_index)
    prov = registry.resolve(backend, logits.device, logits.dtype)
    out_dtype = _out_dtype(logits)
    logp = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
    lse = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=out_dtype, device=logits.device)
    if n_rows > 0:
        prov.token_logprobs_forward(
            logits, labels, logp, entropy if with_entropy else None, lse, temperature, ignore_index
        )
    return logp, entropy, lse


@_forward_op.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend):
    n_rows = logits.shape[0]
    out_dtype = _out_dtype(logits)
    entropy_rows = n_rows if with_entropy else 0
    return (
        logits.new_empty(n_rows, dtype=out_dtype),
        logits.new_empty(entropy_rows, dtype=out_dtype),
        logits.new_empty(n_rows, dtype=out_dtype),
    )


def _run_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature, ignore_index, backend):
    if logits.shape[0] == 0:
        return
    with_entropy = entropy.numel() > 0
    prov = registry.resolve(backend, logits.device, logits.dtype)
    prov.token_logprobs_backward(
        logits,
        labels,
        lse,
        entropy if with_entropy else None,
        grad_logp,
        grad_entropy if with_entropy else None,
        grad_logits,
        temperature,
        ignore_index,
    )


@torch.library.custom_op("rlhf_fast::token_logprobs_bwd", mutates_args=())
def _backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """Gradient w.r.t. [N, V] logits, in the logits' dtype; ``entropy``/``grad_entropy`` are [0] when unused."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _run_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature, ignore_index, backend)
    return grad_logits


@_backward_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlhf_fast::token_logprobs_bwd_", mutates_args=("logits",))
def _backward_inplace_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> None:
    """Like token_logprobs_bwd, but overwrites ``logits`` with the gradient (no [N, V] allocation)."""
    _run_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, logits, temperature, ignore_index, backend)


@_backward_inplace_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.options = (temperature, ignore_index, inplace_backward, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, inplace_backward, backend = ctx.options
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if entropy.numel() == 0:
        grad_entropy = entropy
    elif grad_entropy is None:
        grad_entropy = torch.zeros_like(entropy)
    else:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    args = (logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend)
    if inplace_backward:
        _backward_inplace_op(*args)
        grad_logits = logits
    else:
        grad_logits = _backward_op(*args)
    return grad_logits, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _flatten_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with stride(1) == 1: a view when the leading dims merge, else a copy."""
    vocab = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) < vocab):
        flat = flat.contiguous()
    return flat


def check_vocabulary(logits: torch.Tensor) -> None:
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary (last) dimension; got {check.describe(logits)}")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    vocab_group=None,
):
    """Fused log_softmax(logits / temperature) gathered at ``labels``, and optionally the entropy.

    Args:
        logits: [..., V] float32, bfloat16 or float16 (float64 on the torch and host backends).
            The last dim should be contiguous; other layouts are copied once. Leading dims that
            cannot be merged into one stride (e.g. some transposes) are copied too.
        labels: [...] int64 or int32, ``logits.shape[:-1]``, same device. Each label is in
            [0, V) or equals ``ignore_index``; anything else raises ValueError before any kernel.
        temperature: divides the logits before the softmax (> 0).
        ignore_index: label value whose position gets logp 0, entropy 0 and zero gradient.
        return_entropy: also return the entropy -sum p log p of the tempered distribution.
        inplace_backward: let the backward write the logits' gradient into the logits' storage
            (saves one [N, V] buffer). The caller must not use ``logits`` after backward.
        backend: "auto", "triton", "cuda", "host" or "torch" (see ``rlhf_fast.backends``).
        vocab_group: a torch.distributed process group whose ranks each hold a contiguous shard of
            the vocabulary, in rank order: ``logits`` is then this rank's [..., V_r] slice (ids
            [o_r, o_r + V_r), o_r the sum of the lower ranks' V), ``labels`` are global ids in
            [0, V), V = sum of the V_r, and every rank gets the whole vocabulary's logp and entropy
            (two all-reduces of O(N) floats; the backward is local to the shard). See
            ``rlhf_fast.ops.vocab_parallel``. None (default): the whole vocabulary is here.

    Returns:
        float32 logp of ``labels.shape`` (float64 for float64 logits), and entropy if asked.
        Both are differentiable w.r.t. ``logits``.

    NaN or +inf in a valid row's logits makes that row's logp, entropy and gradient NaN (that row
    only; the torch backend gives logp -inf for +inf); -inf masks a token out (p = 0), and at the
    label gives logp -inf. RLHF_FAST_CHECK=1 checks for them (README, "Non-finite values").
    """
    check.tensor("logits", logits, dtypes=LOGIT_DTYPES, min_dim=1)
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape=logits.shape[:-1], like=("logits", logits))
    if vocab_group is None:  # else checked on every rank at once (vocab_parallel.shard_of): no rank left waiting
        check_vocabulary(logits)
    temperature = check.temperature(temperature)
    registry.check_backend_name(backend)
    if check.CHECK:  # RLHF_FAST_CHECK=1: values too (README, "Non-finite values"); sft_loss comes through here
        check.logits_values("logits", logits, labels if vocab_group is None else None, labels != ignore_index)
    return token_logprobs_validated(logits, labels, temperature, int(ignore_index), return_entropy, inplace_backward,
                                    backend, vocab_group)  # fmt: skip


def token_logprobs_validated(logits, labels, temperature, ignore_index, return_entropy, inplace_backward, backend,
                             vocab_group=None):  # fmt: skip
    """``token_logprobs`` on arguments already checked (by it, or by a fused op that calls this)."""
    flat_labels = labels.reshape(-1).contiguous()
    if vocab_group is None:
        logp, entropy, _ = _forward_op(
            _flatten_rows(logits), flat_labels, temperature, ignore_index, return_entropy, inplace_backward, backend
        )
    else:
        # Shapes first, on every rank at once: a rank with an empty shard has no [N, 0] to flatten.
        shard = vocab_parallel.shard_of(vocab_group, logits.shape[-1], flat_labels.shape[0], logits.device, what="logits")
        logp, entropy = vocab_parallel.token_logprobs(_flatten_rows(logits), flat_labels, shard, temperature,
                                                      ignore_index, return_entropy, inplace_backward, backend)  # fmt: skip
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
