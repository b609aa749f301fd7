"""fused_policy_loss: from [B, T, V] logits straight to the policy-gradient loss and its gradient.

It is ``token_logprobs`` (the fused [N, V] kernel, logp and entropy in one read of the logits)
composed with the [B, T] policy-loss math of ``policy_loss``. The logits are read once forward
and read and written once backward, exactly as in token_logprobs alone: the loss adds only
elementwise work on [B, T], which is V times smaller than the [N, V] stream.
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..backends import registry
from ..reference import IGNORE_INDEX
from .aggregate import check_normalizer
from ..options import PolicyLossOptions, no_leftovers, take
from .policy_loss import loss_with_entropy_bonus, validate_inputs
from .token_logprobs import check_vocabulary, token_logprobs_validated


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
        backend: provider of the [N, V] kernel: "auto", "triton", "cuda", "host" or "torch".

    Returns:
        (loss, stats) as ``policy_loss``, plus stats["entropy"], the mean entropy over valid tokens.
    """
    options = take(PolicyLossOptions, options, option_kwargs)
    no_leftovers("fused_policy_loss", option_kwargs, PolicyLossOptions)
    check.tensor("logits", logits, dtypes=check.FLOAT_DTYPES)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V]; got {check.describe(logits)}")
    check.tensor("labels", labels, dtypes=check.INDEX_DTYPES, shape=logits.shape[:2], like=("logits", logits))
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
    logp, entropy = token_logprobs_validated(logits, labels, temperature, IGNORE_INDEX, True, inplace_backward, backend)
    return loss_with_entropy_bonus(logp, entropy, old_logp, advantages, correction, ref_logp, options, entropy_coef,
                                   normalizer)  # fmt: skip
