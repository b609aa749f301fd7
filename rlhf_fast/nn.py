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


class TokenLogProbs(torch.nn.Module):
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
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        return token_logprobs(
            logits,
            labels,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            return_entropy=self.return_entropy,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"return_entropy={self.return_entropy}, backend={self.backend!r}"
        )


def _options_repr(options) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in asdict(options).items())


class PolicyLoss(torch.nn.Module):
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
        super().__init__()
        self.options = PolicyLossOptions(clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, agg)

    def forward(self, logp, old_logp, advantages, mask, ref_logp=None, normalizer=None):
        return policy_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, normalizer=normalizer, **asdict(self.options)
        )

    def extra_repr(self) -> str:
        return _options_repr(self.options)


class FusedPolicyLoss(torch.nn.Module):
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
        super().__init__()
        self.options = PolicyLossOptions(clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, agg)
        self.temperature = temperature
        self.entropy_coef = entropy_coef
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits, labels, old_logp, advantages, mask, ref_logp=None, normalizer=None):
        return fused_policy_loss(
            logits, labels, old_logp, advantages, mask,
            temperature=self.temperature, entropy_coef=self.entropy_coef,
            inplace_backward=self.inplace_backward, backend=self.backend,
            ref_logp=ref_logp, normalizer=normalizer, **asdict(self.options),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, entropy_coef={self.entropy_coef}, backend={self.backend!r}, "
            + _options_repr(self.options)
        )


class ValueLoss(torch.nn.Module):
    """Module form of ``rlhf_fast.value_loss``: forward(values, old_values, returns, mask, normalizer=None)."""

    def __init__(self, *, clip_eps: float | None = None, agg: str = "token-mean"):
        super().__init__()
        self.clip_eps = clip_eps
        self.agg = agg

    def forward(self, values, old_values, returns, mask, normalizer=None):
        return value_loss(values, old_values, returns, mask, clip_eps=self.clip_eps, agg=self.agg, normalizer=normalizer)

    def extra_repr(self) -> str:
        return f"clip_eps={self.clip_eps}, agg={self.agg!r}"


class PairwiseRewardLoss(torch.nn.Module):
    """Module form of ``rlhf_fast.pairwise_reward_loss``: forward(chosen, rejected, margin=None) -> (loss, stats)."""

    def __init__(self, *, margin: float | None = None, center_coef: float = 0.0):
        super().__init__()
        self.margin = margin
        self.center_coef = center_coef

    def forward(self, chosen, rejected, margin=None):
        margin = self.margin if margin is None else margin
        return pairwise_reward_loss(chosen, rejected, margin=margin, center_coef=self.center_coef)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, center_coef={self.center_coef}"


class LinearTokenLogProbs(torch.nn.Module):
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
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.backend = backend
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(self, hidden, weight, labels, bias=None):
        return linear_token_logprobs(
            hidden, weight, labels, bias=bias, temperature=self.temperature, ignore_index=self.ignore_index,
            return_entropy=self.return_entropy, backend=self.backend, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"return_entropy={self.return_entropy}, backend={self.backend!r}, chunk_size={self.chunk_size}, "
            f"accum_dtype={self.accum_dtype}"
        )


class LinearSFTLoss(torch.nn.Module):
    """Module form of ``rlhf_fast.linear_sft_loss``: forward(hidden, weight, labels, bias=None) -> loss."""

    def __init__(
        self,
        *,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.backend = backend
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(self, hidden, weight, labels, bias=None):
        return linear_sft_loss(
            hidden, weight, labels, bias=bias, ignore_index=self.ignore_index, backend=self.backend,
            chunk_size=self.chunk_size, accum_dtype=self.accum_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, backend={self.backend!r}, chunk_size={self.chunk_size}, "
            f"accum_dtype={self.accum_dtype}"
        )


class FusedLinearPolicyLoss(torch.nn.Module):
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
        super().__init__()
        self.options = PolicyLossOptions(clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, agg)
        self.temperature = temperature
        self.entropy_coef = entropy_coef
        self.backend = backend
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(self, hidden, weight, labels, old_logp, advantages, mask, bias=None, ref_logp=None, normalizer=None):
        return fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias=bias,
            temperature=self.temperature, entropy_coef=self.entropy_coef, backend=self.backend,
            chunk_size=self.chunk_size, accum_dtype=self.accum_dtype, ref_logp=ref_logp, normalizer=normalizer, **asdict(self.options),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, entropy_coef={self.entropy_coef}, backend={self.backend!r}, "
            f"chunk_size={self.chunk_size}, accum_dtype={self.accum_dtype}, " + _options_repr(self.options)
        )
