"""fused_policy_loss: from [B, T, V] logits straight to the policy-gradient loss and its gradient.

It is ``token_logprobs`` (the fused [N, V] kernel, logp and entropy in one read of the logits)
composed with the [B, T] policy-loss math of ``policy_loss``: the loss adds only elementwise work
on [B, T], which is V times smaller than the [N, V] stream.

When only the logits need a gradient (the training case), the whole gradient is computed in the
forward, as Liger's cross-entropy does; the backward only scales it by the upstream gradient, and
hands it over untouched for ``loss.backward()``. Two ways, chosen by
``_loss_gradient_fits_the_kernel``:

- One kernel (the "policy_epilogue" op: kernels/policy_epilogue.py on Triton,
  csrc/cuda/policy_epilogue.cu on "cuda", csrc/host/policy_epilogue.cpp on "host"; separable
  objectives "ppo", "cispo", "gpg", "sapo" with any agg, KL estimator, entropy bonus and rollout
  correction): per row, pass 1 reads the logits (logp, entropy, lse), the epilogue computes
  d loss / d logp_t and d loss / d H_t from the token's own inputs and the aggregation's weight of
  the token (``aggregate_weights``: aggregate is linear, so its gradient is that weight), pass 2
  reads the row again and writes the gradient. On a GPU the second read is meant to hit L2 (a bf16
  row of 128256 is 250 KB), leaving about one HBM read and one write of [N, V]; on an H200 it did
  not yet (see the kernels' notes), and the loss took 1.4-1.6x token_logprobs' fwd+bwd. The host
  runs the same three steps on chunks of rows that fit in a core's L2, reusing its token_logprobs kernels (float64 logits in double). The loss and stats
  are then the [B, T] code on the kernel's detached logp and entropy.
- Three steps (other objectives, kl_is_correction, top_entropy_quantile < 1, the torch backend,
  torch.compile): the forward kernel, the
  objective's d loss / d logp and d loss / d entropy on [B, T] by autograd (any registered
  objective, every option), then the backward kernel: the logits read twice, the gradient written once.

Either way the gradient goes into the logits' storage with ``inplace_backward``, and what goes is
the autograd graph over the [B, T] math and the logits kept alive until the backward (with
``inplace_backward``, the gradient has replaced them by then).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..backends import registry
from ..reference import IGNORE_INDEX
from .aggregate import aggregate_weights, check_normalizer
from ..options import PolicyLossOptions, no_leftovers, take
from .policy_loss import loss_with_entropy_bonus, validate_inputs
# The registered kernel ops themselves: the few-frames rule (tests/test_call_path.py) leaves no room for a wrapper.
from .token_logprobs import (
    _backward_inplace_op,
    _backward_op,
    _flatten_rows,
    _forward_op,
    check_vocabulary,
    token_logprobs_validated,
)


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    vocab_group=None,
    options: PolicyLossOptions | None = None,
    **option_kwargs,
):
    """Policy-gradient loss from logits, with an entropy bonus, in one pass over the logits.

    Equal in value and gradient to::

        logp, entropy = token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
        loss, stats = policy_loss(logp, old_logp, advantages, mask, options=options)
        loss - entropy_coef * aggregate(entropy, mask, options.agg, normalizer)

    Args:
        logits: [B, T, V] float32/bfloat16/float16 (differentiable).
        labels: [B, T] int64/int32 sampled tokens. Labels at masked positions are ignored, so they
            may be padding ids or -100; valid labels must be in [0, V).
        old_logp, advantages, mask, ref_logp, rollout_logp, normalizer, options (and its fields
            as keywords): as in ``policy_loss``.
        temperature: divides the logits before the softmax (> 0), as at sampling time.
        entropy_coef: weight of the entropy bonus (finite; the loss *subtracts* it).
        inplace_backward: write the logits' gradient into the logits' storage (see token_logprobs).
            When only the logits need a gradient it is computed in the forward, so their storage
            holds the gradient from the moment this call returns (as with Liger's in-place
            cross-entropy); only one backward is then possible.
        backend: provider of the [N, V] kernel: "auto", "triton", "cuda", "host" or "torch".
        vocab_group: a process group whose ranks each hold a contiguous vocabulary shard of the
            logits [B, T, V_r], in rank order; labels are global ids (see ``token_logprobs``).
            Every rank gets the same loss and stats and the gradient of its own shard. The loss
            then takes the composed path (logp and entropy from the vocabulary-parallel
            token_logprobs, then the [B, T] math under autograd). None: the whole vocabulary here.

    Returns:
        (loss, stats) as ``policy_loss``, plus stats["entropy"], the mean entropy over valid tokens.
        When the logits are the only input that needs a gradient, it is computed during this call
        (module docstring); old_logp, advantages, ref_logp needing one take the composed path.

    Non-finite values: as ``token_logprobs`` for the logits and ``policy_loss`` for the rest (a
    NaN advantage: a NaN loss, and a NaN gradient in that token's row only). RLHF_FAST_CHECK=1
    checks them all.
    """
    options = take(PolicyLossOptions, options, option_kwargs)
    no_leftovers("fused_policy_loss", option_kwargs, PolicyLossOptions)
    check.tensor("logits", logits, dtypes=check.FLOAT_DTYPES)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V]; got {check.describe(logits)}")
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape=logits.shape[:2], like=("logits", logits))
    if vocab_group is None:  # else checked on every rank at once (vocab_parallel.shard_of): no rank left waiting
        check_vocabulary(logits)
    correction = validate_inputs(labels, old_logp, advantages, mask, ref_logp, logp_name="labels",
                                 rollout_logp=rollout_logp, options=options)  # fmt: skip
    mask = correction.mask
    entropy_coef = check.number("entropy_coef", entropy_coef)
    temperature = check.temperature(temperature)
    registry.check_backend_name(backend)
    normalizer = check_normalizer(normalizer)
    # Any label id at a masked position becomes ignore_index: its logp, entropy and gradient are 0
    # and the kernel never indexes the vocabulary with it.
    labels = torch.where(mask, labels, IGNORE_INDEX)
    if check.CHECK:  # RLHF_FAST_CHECK=1 (validate_inputs checked the [B, T] inputs)
        check.logits_values("logits", logits, labels if vocab_group is None else None, mask)
        check.normalizer_value(normalizer)
    loss_inputs = (old_logp, advantages, correction, ref_logp, options, entropy_coef, normalizer)
    if vocab_group is None and _gradient_in_forward(logits, old_logp, advantages, ref_logp):
        stats: dict = {}
        in_kernel = _loss_gradient_fits_the_kernel(logits, options, backend, ref_logp)
        loss = _GradientInForward.apply(logits, labels, temperature, inplace_backward, backend, loss_inputs, stats,
                                        in_kernel)  # fmt: skip
        return loss, stats
    logp, entropy = token_logprobs_validated(logits, labels, temperature, IGNORE_INDEX, True, inplace_backward, backend,
                                             vocab_group)  # fmt: skip
    return loss_with_entropy_bonus(logp, entropy, *loss_inputs)


def _gradient_in_forward(logits, *others) -> bool:
    """Training on the logits alone: the gradient can be computed in the forward. Not under
    torch.compile (which traces the composed ops instead), nor when another input needs a gradient."""
    if not (torch.is_grad_enabled() and logits.requires_grad) or torch.compiler.is_compiling():
        return False
    return not any(t is not None and t.requires_grad for t in others)


# The separable objectives that kernels/policy_epilogue.py computes (its OBJECTIVE_CODE; the op
# names them here so that deciding needs no Triton import).
KERNEL_OBJECTIVES = ("ppo", "cispo", "gpg", "sapo")


def _loss_gradient_fits_the_kernel(logits, options: PolicyLossOptions, backend: str, ref_logp=None) -> bool:
    """Whether a policy_epilogue kernel (Triton, CUDA or host; the provider's op family
    "policy_epilogue") computes this loss's gradient in one read of the logits: an objective it
    has, options it computes exactly (not the KL's importance correction, not the entropy-ranked
    token mask, which needs every entropy first), and a backend that has the op here ("auto":
    the provider it resolves to; the torch reference has none). Anything else keeps the forward
    kernel, the [B, T] autograd and the backward kernel; so does a kl_coef without ref_logp,
    which that path rejects before any gradient is written over in-place logits."""
    if options.objective not in KERNEL_OBJECTIVES or options.kl_is_correction or options.top_entropy_quantile < 1:
        return False
    if options.kl_coef and ref_logp is None:
        return False
    name = registry.default_backend() if backend == "auto" else backend
    if name != "auto":  # a named backend that cannot serve the op keeps the three-step path (which says why)
        return bool(registry.can_serve(name, logits.device, logits.dtype, "policy_epilogue"))
    chosen = registry.resolve(name, logits.device, logits.dtype, "policy_epilogue")
    return bool(chosen.supports_op("policy_epilogue"))


def _loss_in_one_kernel(flat_logits, labels, temperature, inplace, backend, loss_inputs):
    """The provider's policy_epilogue kernel on prepared [N] inputs, then the loss and stats by the
    [B, T] code on its detached logp and entropy. Returns (loss, stats, grad [N, V], the [N] rows a
    recomputed backward needs). The [N] rows are float32, float64 for float64 logits (host)."""
    old_logp, advantages, correction, ref_logp, options, entropy_coef, normalizer = loss_inputs
    mask = correction.mask
    rows_dtype = torch.float64 if flat_logits.dtype == torch.float64 else torch.float32
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(mask.shape)
    # In float64 for float64 logits, whose one-kernel gradient keeps float64 accuracy.
    weight = aggregate_weights(mask, options.agg, normalizer, options.max_response_length, rows_dtype)
    pg_weight = weight if correction.weights is None else (weight * correction.weights).to(rows_dtype)
    with_kl = ref_logp is not None and options.kl_coef != 0.0
    # Masked positions may hold NaN or inf: zeroed here, as policy_loss_terms does, never read there.
    old, adv, ref = (None if t is None else torch.where(mask, t.to(rows_dtype), 0.0).reshape(-1)
                     for t in (old_logp, advantages, ref_logp if with_kl else None))  # fmt: skip
    # The composed path checks the labels in token_logprobs' forward op; this kernel indexes the row with them too.
    check.labels_in_range(labels, flat_logits.shape[-1], IGNORE_INDEX)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy, lse, grad_logp, grad_entropy = torch.empty(5, flat_labels.shape[0], dtype=rows_dtype,
                                                              device=flat_logits.device)  # fmt: skip
    grad = flat_logits if inplace else torch.empty(flat_logits.shape, dtype=flat_logits.dtype, device=flat_logits.device)
    registry.resolve(backend, flat_logits.device, flat_logits.dtype, "policy_epilogue").policy_epilogue_forward(
        flat_logits, flat_labels, old, adv, pg_weight.reshape(-1), weight.reshape(-1), ref, logp, entropy, lse,
        grad_logp, grad_entropy, grad, temperature, IGNORE_INDEX, options, entropy_coef)  # fmt: skip
    if inplace:
        torch.autograd.graph.increment_version(flat_logits)  # as the in-place backward op marks it
    with torch.no_grad():
        loss, stats = loss_with_entropy_bonus(logp.view(mask.shape), entropy.view(mask.shape), *loss_inputs)
    return loss, stats, grad, (flat_labels, lse, entropy, grad_logp, grad_entropy)


def _exact_in(dtype: torch.dtype, scale: torch.Tensor) -> bool:
    """Whether multiplying values of ``dtype`` by ``scale`` rounds nothing (in range): float32 and
    float64 round once more at their own precision (as a product in eager would); a 16-bit dtype
    only for a power of two (GradScaler's scales)."""
    return dtype in (torch.float32, torch.float64) or bool(torch.frexp(scale.float()).mantissa.abs() == 0.5)


class _GradientInForward(torch.autograd.Function):
    """The loss, with its gradient w.r.t. the logits computed in the forward (see the module's doc)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, inplace, backend, loss_inputs, stats_out, in_kernel):
        flat_logits, flat_labels = _flatten_rows(logits), labels.reshape(-1).contiguous()
        if in_kernel:  # one kernel: the logits' gradient with the objective's in its epilogue
            loss, stats, grad, ctx.rows = _loss_in_one_kernel(flat_logits, labels, temperature, inplace, backend,
                                                              loss_inputs)  # fmt: skip
            ctx.grad = grad.view(logits.shape)
            if not inplace:
                ctx.save_for_backward(logits)
            ctx.args = (temperature, inplace, backend)
            stats_out.update(stats)
            return loss
        # One frame from the public op to the kernels (tests/test_call_path.py): kernel, [B, T]
        # autograd for d loss / d logp and d loss / d entropy, kernel.
        logp, entropy, lse = _forward_op(flat_logits, flat_labels, temperature, IGNORE_INDEX, True, False, backend)
        with torch.enable_grad():
            leaves = [t.view(labels.shape).detach().requires_grad_() for t in (logp, entropy)]
            loss, stats = loss_with_entropy_bonus(*leaves, *loss_inputs)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grad_logp, grad_entropy = (torch.zeros_like(lse) if g is None else g.reshape(-1).to(lse.dtype).contiguous()
                                   for g in grads)  # fmt: skip
        args = (flat_logits, flat_labels, lse, entropy, grad_logp, grad_entropy, temperature, IGNORE_INDEX, backend)
        if inplace:
            _backward_inplace_op(*args)
            ctx.grad = flat_logits.view(logits.shape)
        else:
            ctx.grad = _backward_op(*args).view(logits.shape)
            # Saved (no copy) so that an in-place change of the logits before the backward raises,
            # and so that a rescaled or second backward can recompute the gradient from them.
            ctx.save_for_backward(logits)
        ctx.rows, ctx.args = args[1:6], (temperature, inplace, backend)
        stats_out.update(stats)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        temperature, inplace, backend = ctx.args
        logits = None if inplace else ctx.saved_tensors[0]  # raises if modified in place since the forward
        grad, ctx.grad = ctx.grad, None
        if grad is None and inplace:
            raise RuntimeError("fused_policy_loss(inplace_backward=True) wrote its gradient over the logits: "
                               "it cannot be computed again for a second backward")  # fmt: skip
        if grad is not None and bool(grad_loss == 1):  # loss.backward(): hand it over, no [N, V] product
            return grad, None, None, None, None, None, None, None
        if grad is not None and (inplace or _exact_in(grad.dtype, grad_loss)):
            return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None
        # A 16-bit gradient times an arbitrary scale would round twice, and a second backward has
        # no gradient left: recompute it from the logits with the scaled token gradients (the same
        # [N, V] traffic as the product).
        flat_labels, lse, entropy, grad_logp, grad_entropy = ctx.rows
        grad = _backward_op(_flatten_rows(logits), flat_labels, lse, entropy, grad_logp * grad_loss, grad_entropy * grad_loss,
                            temperature, IGNORE_INDEX, backend)  # fmt: skip
        return grad.view(logits.shape), None, None, None, None, None, None, None
