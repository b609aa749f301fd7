"""nn.Module wrappers that hold an op's options."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .ops import (
    PolicyLossOptions,
    fused_linear_policy_loss,
    fused_policy_loss,
    linear_sft_loss,
    linear_token_logprobs,
    pairwise_reward_loss,
    policy_loss,
    token_logprobs,
    value_loss,
)
from .reference import IGNORE_INDEX




class _OpModule(torch.nn.Module):
    """A functional op with its keyword options held as attributes (change them between calls if you
    like); ``op_kwargs()`` hands them back by name, and the repr lists them. ``options``: a
    validated ``PolicyLossOptions`` whose fields are spread in after the others."""

    def __init__(self, options: PolicyLossOptions | None = None, **kwargs):
        super().__init__()
        self._option_names = tuple(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.options = options

    def op_kwargs(self) -> dict:
        kwargs = {name: getattr(self, name) for name in self._option_names}
        return kwargs | (asdict(self.options) if self.options is not None else {})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.op_kwargs().items())


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
    ):
        super().__init__(
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
            inplace_backward=inplace_backward, backend=backend,
        )  # fmt: skip

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        return token_logprobs(logits, labels, **self.op_kwargs())


class PolicyLoss(_OpModule):
    """Module form of ``rlhf_fast.policy_loss``: forward(logp, old_logp, advantages, mask, ref_logp=None,
    normalizer=None) -> (loss, stats). The options are a validated ``PolicyLossOptions``."""

    def __init__(
        self,
        *,
        clip_eps: float | None = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        agg: str = "token-mean",
    ):
        super().__init__(PolicyLossOptions(clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, agg))

    def forward(self, logp, old_logp, advantages, mask, ref_logp=None, normalizer=None):
        options = self.op_kwargs()
        return policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, normalizer=normalizer, **options)


class FusedPolicyLoss(_OpModule):
    """Module form of ``rlhf_fast.fused_policy_loss``: forward(logits, labels, old_logp, advantages, mask,
    ref_logp=None, normalizer=None) -> (loss, stats)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        inplace_backward: bool = False,
        backend: str = "auto",
        clip_eps: float | None = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        agg: str = "token-mean",
    ):
        super().__init__(
            PolicyLossOptions(clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, agg),
            temperature=temperature, entropy_coef=entropy_coef, inplace_backward=inplace_backward, backend=backend,
        )  # fmt: skip

    def forward(self, logits, labels, old_logp, advantages, mask, ref_logp=None, normalizer=None):
        return fused_policy_loss(
            logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, normalizer=normalizer, **self.op_kwargs()
        )


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
    """Module form of ``rlhf_fast.linear_token_logprobs``: forward(hidden, weight, labels, bias=None)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        return_entropy: bool = False,
        backend: str = "auto",
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__(
            temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy, backend=backend,
            chunk_size=chunk_size, accum_dtype=accum_dtype,
        )  # fmt: skip

    def forward(self, hidden, weight, labels, bias=None):
        return linear_token_logprobs(hidden, weight, labels, bias=bias, **self.op_kwargs())


class LinearSFTLoss(_OpModule):
    """Module form of ``rlhf_fast.linear_sft_loss``: forward(hidden, weight, labels, bias=None) -> loss."""

    def __init__(
        self,
        *,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__(ignore_index=ignore_index, backend=backend, chunk_size=chunk_size, accum_dtype=accum_dtype)

    def forward(self, hidden, weight, labels, bias=None):
        return linear_sft_loss(hidden, weight, labels, bias=bias, **self.op_kwargs())


class FusedLinearPolicyLoss(_OpModule):
    """Module form of ``rlhf_fast.fused_linear_policy_loss``: forward(hidden, weight, labels, old_logp,
    advantages, mask, bias=None, ref_logp=None, normalizer=None) -> (loss, stats)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        backend: str = "auto",
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
        clip_eps: float | None = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        agg: str = "token-mean",
    ):
        super().__init__(
            PolicyLossOptions(clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, agg),
            temperature=temperature, entropy_coef=entropy_coef, backend=backend, chunk_size=chunk_size,
            accum_dtype=accum_dtype,
        )  # fmt: skip

    def forward(self, hidden, weight, labels, old_logp, advantages, mask, bias=None, ref_logp=None, normalizer=None):
        return fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp, normalizer=normalizer,
            **self.op_kwargs(),
        )  # fmt: skip
