"""nn.Module wrappers that hold an op's options."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .ops import (
    fused_linear_policy_loss,
    fused_policy_loss,
    linear_sft_loss,
    linear_token_logprobs,
    pairwise_reward_loss,
    policy_loss,
    token_logprobs,
    value_loss,
)
from .options import LinearOptions, PolicyLossOptions, no_leftovers, take
from .reference import IGNORE_INDEX


class _OpModule(torch.nn.Module):
    """A functional op with its keyword options held as attributes (change them between calls if you
    like) and its option groups as validated objects (``options``: PolicyLossOptions, ``linear``:
    LinearOptions), taken once here and handed to the op as they are; the repr lists every field.
    The logits and lm_head ops also hold ``vocab_group`` (None, or the process group of a
    vocabulary-parallel head: see ``rlhf_fast.token_logprobs``)."""

    def __init__(self, groups: dict | None = None, **kwargs):
        super().__init__()
        self._option_names = tuple(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._group_names = tuple(groups or {})
        for name, value in (groups or {}).items():
            setattr(self, name, value)

    def op_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names + self._group_names}

    def extra_repr(self) -> str:
        shown = {name: getattr(self, name) for name in self._option_names}
        for name in self._group_names:
            shown |= asdict(getattr(self, name))
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())


def _groups(module: str, option_kwargs: dict, **given) -> dict:
    """The option groups of an nn module from its ``options=`` / ``linear=`` and flat keywords."""
    classes = {"options": PolicyLossOptions, "linear": LinearOptions}
    groups = {name: take(classes[name], value, option_kwargs, name) for name, value in given.items()}
    no_leftovers(module, option_kwargs, *(classes[name] for name in given))
    return groups


class TokenLogProbs(_OpModule):
    """Module form of ``rlhf_fast.token_logprobs``: forward(logits, labels) -> logp (and entropy)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        return_entropy: bool = False,
        inplace_backward: bool = False,
        backend: str = "auto",
        vocab_group=None,
    ):
        super().__init__(
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
            inplace_backward=inplace_backward, backend=backend, vocab_group=vocab_group,
        )  # fmt: skip

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        return token_logprobs(logits, labels, **self.op_kwargs())


class PolicyLoss(_OpModule):
    """Module form of ``rlhf_fast.policy_loss``: forward(logp, old_logp, advantages, mask, ref_logp=None,
    normalizer=None, rollout_logp=None, entropy=None) -> (loss, stats). Takes ``options=PolicyLossOptions(...)`` or its fields as keywords."""

    def __init__(self, *, options: PolicyLossOptions | None = None, **option_kwargs):
        super().__init__(_groups("PolicyLoss", option_kwargs, options=options))

    def forward(self, logp, old_logp, advantages, mask, ref_logp=None, normalizer=None, rollout_logp=None, entropy=None):
        return policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, normalizer=normalizer,
                           rollout_logp=rollout_logp, entropy=entropy, **self.op_kwargs())  # fmt: skip


class FusedPolicyLoss(_OpModule):
    """Module form of ``rlhf_fast.fused_policy_loss``: forward(logits, labels, old_logp, advantages, mask,
    ref_logp=None, normalizer=None, rollout_logp=None) -> (loss, stats). Takes ``options=`` or its fields as keywords."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        inplace_backward: bool = False,
        backend: str = "auto",
        vocab_group=None,
        options: PolicyLossOptions | None = None,
        **option_kwargs,
    ):
        super().__init__(
            _groups("FusedPolicyLoss", option_kwargs, options=options),
            temperature=temperature, entropy_coef=entropy_coef, inplace_backward=inplace_backward, backend=backend,
            vocab_group=vocab_group,
        )  # fmt: skip

    def forward(self, logits, labels, old_logp, advantages, mask, ref_logp=None, normalizer=None, rollout_logp=None):
        return fused_policy_loss(
            logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, normalizer=normalizer,
            rollout_logp=rollout_logp, **self.op_kwargs(),
        )  # fmt: skip


class ValueLoss(_OpModule):
    """Module form of ``rlhf_fast.value_loss``: forward(values, old_values, returns, mask, normalizer=None)."""

    def __init__(self, *, clip_eps: float | None = None, agg: str = "token-mean"):
        super().__init__(clip_eps=clip_eps, agg=agg)

    def forward(self, values, old_values, returns, mask, normalizer=None):
        return value_loss(values, old_values, returns, mask, normalizer=normalizer, **self.op_kwargs())


class PairwiseRewardLoss(_OpModule):
    """Module form of ``rlhf_fast.pairwise_reward_loss``: forward(chosen, rejected, margin=None) -> (loss, stats)."""

    def __init__(self, *, margin: float | None = None, center_coef: float = 0.0):
        super().__init__(margin=margin, center_coef=center_coef)

    def forward(self, chosen, rejected, margin=None):
        kwargs = self.op_kwargs()
        if margin is not None:  # a per-call margin (one per pair, say) wins over the held one
            kwargs["margin"] = margin
        return pairwise_reward_loss(chosen, rejected, **kwargs)


class LinearTokenLogProbs(_OpModule):
    """Module form of ``rlhf_fast.linear_token_logprobs``: forward(hidden, weight, labels, bias=None).
    Takes ``linear=LinearOptions(...)`` or its fields (backend, chunk_size, accum_dtype, logit_scale,
    logit_softcap) as keywords."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        return_entropy: bool = False,
        vocab_group=None,
        linear: LinearOptions | None = None,
        **option_kwargs,
    ):
        super().__init__(
            _groups("LinearTokenLogProbs", option_kwargs, linear=linear),
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy, vocab_group=vocab_group,
        )  # fmt: skip

    def forward(self, hidden, weight, labels, bias=None):
        return linear_token_logprobs(hidden, weight, labels, bias=bias, **self.op_kwargs())


class LinearSFTLoss(_OpModule):
    """Module form of ``rlhf_fast.linear_sft_loss``: forward(hidden, weight, labels, bias=None) -> loss.
    Takes ``linear=`` or its fields as keywords."""

    def __init__(self, *, ignore_index: int = IGNORE_INDEX, vocab_group=None, linear: LinearOptions | None = None,
                 **option_kwargs):  # fmt: skip
        super().__init__(_groups("LinearSFTLoss", option_kwargs, linear=linear), ignore_index=ignore_index,
                         vocab_group=vocab_group)  # fmt: skip

    def forward(self, hidden, weight, labels, bias=None):
        return linear_sft_loss(hidden, weight, labels, bias=bias, **self.op_kwargs())


class FusedLinearPolicyLoss(_OpModule):
    """Module form of ``rlhf_fast.fused_linear_policy_loss``: forward(hidden, weight, labels, old_logp,
    advantages, mask, bias=None, ref_logp=None, normalizer=None, rollout_logp=None) -> (loss, stats). Takes ``options=``,
    ``linear=`` or their fields as keywords."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        vocab_group=None,
        options: PolicyLossOptions | None = None,
        linear: LinearOptions | None = None,
        **option_kwargs,
    ):
        super().__init__(
            _groups("FusedLinearPolicyLoss", option_kwargs, options=options, linear=linear),
            temperature=temperature, entropy_coef=entropy_coef, vocab_group=vocab_group,
        )  # fmt: skip

    def forward(self, hidden, weight, labels, old_logp, advantages, mask, bias=None, ref_logp=None, normalizer=None,
                rollout_logp=None):  # fmt: skip
        return fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp, normalizer=normalizer,
            rollout_logp=rollout_logp, **self.op_kwargs(),
        )  # fmt: skip
