"""fused_linear_policy_loss: the policy-gradient loss from the last hidden states and the lm_head.

``fused_policy_loss(hidden @ weight.T + bias, ...)`` without the [B, T, V] logits: one pass over
token chunks (``linear_chunks.linear_loss``) computes logp and entropy *and* the gradients w.r.t.
hidden, weight and bias, because the policy loss is a sum of per-token terms with weights fixed by
the mask: d loss / d logp_t depends on logp_t alone once the ``agg`` normaliser is known, and that
comes from the mask before any logit exists. No logits are recomputed (6 N H V FLOPs in all, N
counting the tokens of the mask only: padding and prompt positions are never computed). That
holds for separable objectives (``rlhf_fast.objectives``); one coupled across a response runs as
two sweeps (``two_sweeps``).
"""

from __future__ import annotations

import torch

from .. import _validate as check
from ..reference import IGNORE_INDEX
from .aggregate import aggregate_weights, check_normalizer
from . import linear_vocab_parallel
from .linear_chunks import RowStats, TokenObjective, gather_rows, kept_rows, linear_loss, scatter_rows
from ..objectives import OBJECTIVES
from ..options import LinearOptions, PolicyLossOptions, no_leftovers, take
from .linear_logprobs import LinearTokenLogprobs, check_linear, make_spec
from .policy_loss import loss_with_entropy_bonus, policy_loss_terms, validate_inputs


class PolicyObjective(TokenObjective):
    """policy_loss(logp, ...) - entropy_coef * aggregate(entropy, ...) on [B, T], as in fused_policy_loss.

    aggregate is linear in the per-token loss: loss = sum_t w_t l_t(logp_t) with w = d aggregate /
    d l, a function of the mask (and normalizer) only. So, per chunk of tokens,
        d loss / d logp_t = w_t * d l_t / d logp_t,   d loss / d entropy_t = -entropy_coef * w_t,
    both evaluated with autograd through ``policy_loss_terms`` (the same per-token code as
    policy_loss, every option included) on the chunk's tokens. The loss value and the stats come
    from ``policy_loss_with_options`` on the full [B, T] logp once the sweep is done, exactly as
    fused_policy_loss computes them.
    """

    with_entropy = True

    def __init__(self, old_logp, advantages, correction, ref_logp, options, entropy_coef, normalizer, index):
        self.inputs = (old_logp, advantages, correction, ref_logp)
        self.options, self.entropy_coef, self.normalizer, self.index = options, entropy_coef, normalizer, index
        self.stats: dict[str, torch.Tensor] = {}
        mask = correction.mask
        per_token_adv = advantages.unsqueeze(-1).expand(mask.shape) if advantages.dim() == 1 else advantages
        agg_weights = aggregate_weights(mask, options.agg, normalizer, options.max_response_length)
        per_token = (old_logp, per_token_adv, mask, ref_logp, correction.weights, agg_weights)
        *self.flat, self.agg_weights = (None if t is None else gather_rows(t.reshape(-1), index) for t in per_token)

    def token_grads(self, rows: RowStats, start: int, end: int):
        old_logp, adv, mask, ref_logp, rollout_weights = (
            t[start:end].view(1, -1) if t is not None else None for t in self.flat
        )
        agg_weights = self.agg_weights[start:end]
        with torch.enable_grad():
            logp = rows.logp[start:end].view(1, -1).detach().requires_grad_()
            per_token, _ = policy_loss_terms(logp, old_logp, adv, mask, ref_logp, self.options, rollout_weights)
            (grad_logp,) = torch.autograd.grad((per_token.view(-1) * agg_weights).sum(), logp)
        grad_entropy = (-self.entropy_coef * agg_weights).to(rows.lse.dtype) if self.entropy_coef else None
        return grad_logp.view(-1).to(rows.lse.dtype), grad_entropy

    def value(self, rows: RowStats) -> torch.Tensor:
        old_logp, advantages, correction, ref_logp = self.inputs
        shape = correction.mask.shape
        logp, entropy = (scatter_rows(t, self.index, correction.mask.numel()).view(shape) for t in (rows.logp, rows.entropy))
        loss, self.stats = loss_with_entropy_bonus(logp, entropy, old_logp, advantages, correction, ref_logp, self.options,
                                                   self.entropy_coef, self.normalizer)  # fmt: skip
        return loss


def two_sweeps(hidden, weight, bias, labels, old_logp, advantages, correction, ref_logp, options, spec, entropy_coef, normalizer):
    """An objective coupled across a sequence: its d loss / d logp_t needs the whole response's
    log-probs, which one sweep has not computed yet when it reaches token t. So: sweep 1, the
    log-probs and entropies ([N] each, no gradient kept but the lse); then the objective on [B, T]
    by autograd; sweep 2, the backward, recomputes each chunk's logits (8 N H V FLOPs in all
    instead of 6; still no [N, V] tensor)."""
    mask = correction.mask
    index = kept_rows(labels != IGNORE_INDEX)
    logp, entropy = LinearTokenLogprobs.apply(hidden, weight, bias, labels, index, spec, True)
    logp, entropy = logp.view(mask.shape), entropy.view(mask.shape)
    return loss_with_entropy_bonus(logp, entropy, old_logp.detach(), advantages.detach(), correction,
                                   None if ref_logp is None else ref_logp.detach(), options, entropy_coef, normalizer)  # fmt: skip


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    options: PolicyLossOptions | None = None,
    linear: LinearOptions | None = None,
    vocab_group=None,
    **option_kwargs,
):
    """``fused_policy_loss(hidden @ weight.T + bias, labels, ...)`` without materialising the logits.

    Args:
        hidden: [B, T, H] float32/bfloat16/float16 (float64 on the torch and host backends): the
            last hidden states before the head (``rlhf_fast.hf.hidden_and_head``).
        weight: [V, H], hidden's dtype and device; bias: [V] or None.
        labels: [B, T] sampled tokens; labels at masked positions are ignored (any value).
        old_logp, advantages, mask, ref_logp, rollout_logp, normalizer, temperature, entropy_coef,
            options: as in ``fused_policy_loss``. old_logp, advantages and ref_logp are treated as
            constants (no gradient flows to them).
        linear: as in ``linear_token_logprobs`` (logit_scale and logit_softcap: the head's logit
            transform). The fields of ``options`` and of ``linear`` (backend, chunk_size,
            accum_dtype, logit_scale, logit_softcap) may also be passed as keyword arguments.
        vocab_group: a process group whose ranks each hold a contiguous shard of the head's rows,
            in rank order (``weight`` [V_r, H], ``bias`` [V_r]); labels are global ids, as in
            ``linear_token_logprobs``. Every rank gets the same loss and stats, its shard's weight
            and bias gradients and the hidden gradient summed over the group. The loss then takes
            two sweeps (the logp and entropy of the vocabulary-parallel linear_token_logprobs,
            then the [B, T] math under autograd). None: the whole head is here.

    Returns:
        (loss, stats) as ``fused_policy_loss``: the loss is differentiable w.r.t. hidden, weight and
        bias. Their gradients are computed during the forward (the weight's summed in
        float32 unless ``accum_dtype=None``)
        and scaled by the upstream gradient in the backward.

    Non-finite values: as ``fused_policy_loss`` for the [B, T] inputs, and as
    ``linear_token_logprobs`` for hidden and weight (one NaN hidden row makes the whole weight
    gradient NaN). RLHF_FAST_CHECK=1 checks them all.
    """
    options = take(PolicyLossOptions, options, option_kwargs)
    linear = take(LinearOptions, linear, option_kwargs, "linear")
    no_leftovers("fused_linear_policy_loss", option_kwargs, PolicyLossOptions, LinearOptions)
    check.tensor("hidden", hidden, dtypes=check.FLOAT_DTYPES)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H]; got {check.describe(hidden)}")
    flat_hidden, flat_labels = check_linear(hidden, weight, bias, labels)
    correction = validate_inputs(labels, old_logp, advantages, mask, ref_logp, logp_name="labels",
                                 rollout_logp=rollout_logp, options=options)  # fmt: skip
    mask = correction.mask
    entropy_coef = check.number("entropy_coef", entropy_coef)
    normalizer = check_normalizer(normalizer)
    if options.kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={options.kl_coef} needs ref_logp (the reference model's log-probs); got None")
    spec = make_spec(temperature, IGNORE_INDEX, linear, hidden, weight)
    # As in fused_policy_loss: any label at a masked position becomes ignore_index (logp, entropy
    # and gradient 0 there, and the vocabulary is never indexed with it).
    flat_labels = torch.where(mask.reshape(-1), flat_labels, IGNORE_INDEX)
    if check.CHECK:  # RLHF_FAST_CHECK=1 (validate_inputs checked the [B, T] inputs)
        check.linear_values(flat_hidden, weight, bias, mask.reshape(-1))
        check.normalizer_value(normalizer)
    if vocab_group is not None:
        logp, entropy = linear_vocab_parallel.linear_token_logprobs(flat_hidden, weight, bias, flat_labels, spec,
                                                                    vocab_group, True)  # fmt: skip
        return loss_with_entropy_bonus(logp.view(mask.shape), entropy.view(mask.shape), old_logp.detach(),
                                       advantages.detach(), correction, None if ref_logp is None else ref_logp.detach(),
                                       options, entropy_coef, normalizer)  # fmt: skip
    check.labels_in_range(flat_labels, weight.shape[0], IGNORE_INDEX)
    # A sequence-coupled objective, or a token mask ranked over the whole batch's entropies.
    if not OBJECTIVES[options.objective].separable or options.top_entropy_quantile < 1:
        return two_sweeps(flat_hidden, weight, bias, flat_labels, old_logp, advantages, correction, ref_logp, options,
                          spec, entropy_coef, normalizer)  # fmt: skip
    index = kept_rows(mask.reshape(-1))
    objective = PolicyObjective(
        old_logp.detach(), advantages.detach(), correction, ref_logp.detach() if ref_logp is not None else None,
        options, entropy_coef, normalizer, index,
    )  # fmt: skip
    loss = linear_loss(flat_hidden, weight, bias, flat_labels, index, spec, objective)
    return loss, objective.stats
