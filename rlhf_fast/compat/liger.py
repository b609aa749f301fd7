"""Liger-Kernel's fused losses, by rlhf_fast's ops: switching is one import line.

    # from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    # from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerCrossEntropyLoss
    from rlhf_fast.compat.liger import (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss,
                                        LigerFusedLinearGRPOLoss)

The classes have the constructor and ``forward`` signatures of Liger-Kernel 0.8.5's, and return
what those return: the GRPO loss ``(loss, metrics)`` with metrics ``(kl, clip_ratio)`` (``(clip_ratio,)``
when beta is 0); the cross-entropies a scalar (or [N] with reduction="none"). They compute with
``fused_linear_policy_loss``, ``linear_sft_loss`` / ``linear_token_logprobs`` and ``sft_loss`` /
``token_logprobs``. This module does not import Liger. An option Liger has that these cannot honour
raises ``NotImplementedError`` naming it, at construction.

Options that change nothing here: ``compiled`` and ``chunk_size`` (Liger's compile switch and
sequences per chunk; rlhf_fast's sweep picks its own token chunks, ``rlhf_fast.LinearOptions``).
Where the results differ on purpose:
- loss_type="cispo": the clip_ratio metric counts the tokens whose weight was clipped whatever the
  advantage's sign (Liger's, those with A > 0 only); the loss and its gradient are Liger's.
- use_bias_correction_kl=True: the kl metric is the KL before the importance weight (the loss
  weighs it, as Liger's does).
- an all-ignored batch gives loss 0 with zero gradients, where a mean over no token is 0 / 0.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import _validate as check
from ..integrations import warn_once_if_untested
from ..ops.aggregate import global_loss_normalizer
from ..ops.fused_linear_policy_loss import fused_linear_policy_loss
from ..ops.linear_logprobs import linear_token_logprobs
from ..ops.linear_sft_loss import linear_sft_loss
from ..ops.sft_loss import sft_loss
from ..ops.token_logprobs import token_logprobs
from ..options import LinearOptions, PolicyLossOptions
from ..reference import IGNORE_INDEX

TESTED = "0.8.5"
SUPPORTED = ("0.8.5", "0.9")  # [lo, hi): the signatures these classes copy

# loss_type -> (objective, agg) for token-level importance sampling; the normaliser is in _normalizer.
_LOSS_TYPES = {
    "grpo": ("ppo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "token-mean"),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm"),
    "dapo": ("ppo", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
}
_UNSUPPORTED_LOSS_TYPES = ("luspo", "vespo")
# vllm_is_ratio is a weight the caller already truncated: applied through rollout_is="token" with
# a threshold no ratio reaches, so that it is never truncated again.
_NO_TRUNCATION = 1e30


def _soft_version_check() -> None:
    warn_once_if_untested("liger-kernel", TESTED, *SUPPORTED)


def _unsupported(option: str, value, why: str):
    raise NotImplementedError(f"rlhf_fast.compat.liger: {option}={value!r} is not supported ({why})")


def _check_ce_options(*, weight_name, weight, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
                      return_token_accuracy, return_predicted_tokens):  # fmt: skip
    """Liger's own checks (its assertions, as ValueError), then the options rlhf_fast cannot honour."""
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    check.choice("reduction", reduction, ("mean", "sum", "none"))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must greater than 0.0 or None. Got: {softcap}")
    if weight is not None:
        _unsupported(weight_name, "<tensor>", "class weights: the ops weigh every token alike")
    if lse_square_scale != 0:
        _unsupported("lse_square_scale", lse_square_scale, "no z-loss term")
    if label_smoothing != 0:
        _unsupported("label_smoothing", label_smoothing, "the ops gather the label's log-prob only")
    for name, value in (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy),
                        ("return_predicted_tokens", return_predicted_tokens)):  # fmt: skip
        if value:
            _unsupported(name, value, "the ops return the loss only")


def _reduce(loss_mean, logp_fn, target, ignore_index, reduction):
    """Liger's reductions from the mean loss (whose gradient the fused ops compute in their forward)
    or, for "none", the per-token -log p (0 at ignored tokens)."""
    if reduction == "none":
        return -logp_fn()
    if reduction == "sum":
        return loss_mean * (target != ignore_index).sum().clamp(min=1)
    return loss_mean


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearCrossEntropyLoss`` by ``rlhf_fast.linear_sft_loss``:
    cross-entropy of ``_input @ lin_weight.T + bias`` against ``target`` without the [N, V] logits.
    softcap -> LinearOptions.logit_softcap, accum_dtype -> LinearOptions.accum_dtype (None: the
    weight's dtype, as Liger's)."""

    def __init__(
        self,
        ce_weight: torch.FloatTensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        accum_dtype: torch.dtype | None = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ):
        super().__init__()
        _soft_version_check()
        _check_ce_options(weight_name="ce_weight", weight=ce_weight, lse_square_scale=lse_square_scale,
                          label_smoothing=label_smoothing, reduction=reduction, softcap=softcap,
                          return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                          return_predicted_tokens=return_predicted_tokens)  # fmt: skip
        if use_token_scaling:
            _unsupported("use_token_scaling", use_token_scaling, "tokens are not scaled by their predicted probability")
        self.ce_weight, self.ignore_index, self.lse_square_scale = ce_weight, ignore_index, lse_square_scale
        self.label_smoothing, self.reduction, self.softcap = label_smoothing, reduction, softcap
        self.return_z_loss, self.accum_dtype, self.use_token_scaling = return_z_loss, accum_dtype, use_token_scaling
        self.return_token_accuracy, self.return_predicted_tokens = return_token_accuracy, return_predicted_tokens
        self.linear = LinearOptions(accum_dtype=accum_dtype, logit_softcap=softcap)

    def forward(self, lin_weight, _input, target, bias=None):
        def logp():
            return linear_token_logprobs(_input, lin_weight, target, bias=bias, ignore_index=self.ignore_index,
                                         linear=self.linear)  # fmt: skip

        if self.reduction == "none":
            return _reduce(None, logp, target, self.ignore_index, "none")
        loss = linear_sft_loss(_input, lin_weight, target, bias=bias, ignore_index=self.ignore_index, linear=self.linear)
        return _reduce(loss, logp, target, self.ignore_index, self.reduction)


class LigerCrossEntropyLoss(torch.nn.Module):
    """Liger's ``LigerCrossEntropyLoss`` by ``rlhf_fast.sft_loss`` / ``token_logprobs`` on [N, V]
    logits. softcap is applied to the logits in torch first (one more [N, V] tensor)."""

    def __init__(
        self,
        weight: torch.FloatTensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ):
        super().__init__()
        _soft_version_check()
        _check_ce_options(weight_name="weight", weight=weight, lse_square_scale=lse_square_scale,
                          label_smoothing=label_smoothing, reduction=reduction, softcap=softcap,
                          return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                          return_predicted_tokens=return_predicted_tokens)  # fmt: skip
        self.weight, self.ignore_index, self.lse_square_scale = weight, ignore_index, lse_square_scale
        self.label_smoothing, self.reduction, self.softcap = label_smoothing, reduction, softcap
        self.return_z_loss, self.return_token_accuracy = return_z_loss, return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens

    def forward(self, _input: torch.Tensor, target: torch.Tensor):
        logits = _input if self.softcap is None else self.softcap * torch.tanh(_input / self.softcap)
        if self.reduction == "none":
            return -token_logprobs(logits, target, ignore_index=self.ignore_index)
        loss = sft_loss(logits, target, ignore_index=self.ignore_index)
        return _reduce(loss, None, target, self.ignore_index, self.reduction)


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearGRPOLoss`` by ``rlhf_fast.fused_linear_policy_loss``.

    Mapping: loss_type grpo / bnpo / dr_grpo / dapo -> objective "ppo" with agg seq-mean-token-mean
    (over all B rows) / token-mean / seq-mean-token-sum-norm (max_completion_length) / token-mean
    over num_items_in_batch (or the mask's tokens on every rank) per rank; cispo -> "cispo" (its
    weight capped at epsilon_high), sapo -> "sapo" (sapo_temperature_pos / _neg);
    importance_sampling_level="sequence" -> "gspo"; epsilon_low / epsilon_high -> clip_eps /
    clip_eps_high; delta -> dual_clip (equal to INTELLECT-2's two-sided clip when delta >
    1 + epsilon_high); beta -> kl_coef with k3; use_bias_correction_kl -> kl_is_correction;
    vllm_is_ratio -> a per-token weight of the policy-gradient term (rollout_is="token").
    Without old_per_token_logps the log-probs are computed once more first (the on-policy ratio 1).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ):
        super().__init__()
        _soft_version_check()
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if loss_type in _UNSUPPORTED_LOSS_TYPES:
            _unsupported("loss_type", loss_type, f"rlhf_fast has the loss types {', '.join(_LOSS_TYPES)}")
        check.choice("loss_type", loss_type, tuple(_LOSS_TYPES))
        check.choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo"):
            raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
                             "Use importance_sampling_level='token' instead.")  # fmt: skip
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.delta, self.use_bias_correction_kl = temperature, delta, use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.options = self._options()

    def _options(self) -> PolicyLossOptions:
        objective, agg = _LOSS_TYPES[self.loss_type]
        sequence = self.importance_sampling_level == "sequence"
        if sequence:
            objective = "gspo"
        clip = {"clip_eps": self.epsilon_low, "clip_eps_high": self.epsilon_high}
        if objective == "cispo":
            # Liger caps CISPO's weight at epsilon_high itself; rlhf_fast's cap is 1 + clip_eps_high.
            if not self.epsilon_high > 1:
                _unsupported("epsilon_high", self.epsilon_high, "loss_type='cispo' caps the weight at epsilon_high; "
                             "rlhf_fast's cap is above 1")  # fmt: skip
            clip = {"clip_eps": None, "clip_eps_high": self.epsilon_high - 1}
        elif objective == "sapo":
            clip = {}
        dual_clip = None
        if self.delta is not None and objective in ("ppo", "gspo"):
            # -min(min(r, delta) A, clip(r) A) is PPO's dual clip at c = delta whenever delta > 1 + epsilon_high.
            if sequence:
                _unsupported("delta", self.delta, "importance_sampling_level='sequence' has no dual clip")
            if not self.delta > 1 + self.epsilon_high:
                _unsupported("delta", self.delta, f"it equals a dual clip only above 1 + epsilon_high = {1 + self.epsilon_high}")
            dual_clip = self.delta
        if self.use_bias_correction_kl and sequence:
            _unsupported("use_bias_correction_kl", True, "Liger weighs the KL by the sequence ratio there; "
                         "rlhf_fast's kl_is_correction by the token ratio")  # fmt: skip
        return PolicyLossOptions(
            objective=objective, agg=agg, dual_clip=dual_clip, kl_estimator="k3",
            kl_is_correction=bool(self.use_bias_correction_kl),
            max_response_length=self.max_completion_length if agg == "seq-mean-token-sum-norm" else None,
            sapo_tau_pos=self.sapo_temperature_pos, sapo_tau_neg=self.sapo_temperature_neg, **clip,
        )  # fmt: skip

    def _normalizer(self, mask: torch.Tensor, num_items_in_batch):
        if self.loss_type in ("grpo", "sapo"):
            return float(max(mask.shape[0], 1))  # every row counts, empty ones included
        if self.loss_type not in ("dapo", "cispo"):
            return None  # bnpo: this batch's tokens; dr_grpo: B * max_completion_length
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if num_items_in_batch is None:
            total = global_loss_normalizer([mask], "token-mean")
        else:
            total = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
        return (total.float() / world).clamp(min=1.0)

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        mask = check.mask("attention_mask", attention_mask, shape=selected_token_ids.shape)
        labels = torch.where(mask, selected_token_ids, IGNORE_INDEX)
        if self.use_ref_model and ref_per_token_logps is None and ref_input is None:
            raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input (with ref_weight)")
        ref_logp = ref_per_token_logps
        if ref_logp is None and self.use_ref_model:
            if ref_weight is None:
                raise ValueError("ref_input needs ref_weight (the reference model's lm_head weight)")
            with torch.no_grad():
                ref_logp = linear_token_logprobs(ref_input, ref_weight, labels, bias=ref_bias, temperature=self.temperature)
        old_logp = old_per_token_logps
        if old_logp is None:  # on-policy: the ratio is 1, its gradient that of log p
            with torch.no_grad():
                old_logp = linear_token_logprobs(_input, lin_weight, labels, bias=bias, temperature=self.temperature)
        changes = {"kl_coef": self.beta if ref_logp is not None else 0.0}
        rollout_logp = None
        if vllm_is_ratio is not None:
            ratio = vllm_is_ratio.float()
            ratio = (ratio.unsqueeze(-1) if ratio.dim() == 1 else ratio).expand(mask.shape)
            rollout_logp = old_logp.float() - torch.log(ratio)  # exp(old - rollout) = the given ratio
            changes |= {"rollout_is": "token", "rollout_is_mode": "truncate", "rollout_is_threshold": _NO_TRUNCATION}
        options = dataclasses.replace(self.options, **changes)
        loss, stats = fused_linear_policy_loss(
            _input, lin_weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp,
            rollout_logp=rollout_logp, normalizer=self._normalizer(mask, num_items_in_batch),
            temperature=self.temperature, options=options,
        )  # fmt: skip
        clip_ratio = stats["clipfrac"]
        if self.beta == 0.0:
            return loss, (clip_ratio,)
        return loss, (stats.get("kl", torch.zeros_like(clip_ratio)), clip_ratio)
