"""OpenRLHF entry point: drop-ins for its losses, its KL estimator and its actor's log-probs.

The classes and functions here have the constructor and call signatures, and the return values,
of OpenRLHF 0.11.2's (``openrlhf.models.loss``: ``PolicyLoss``, ``ValueLoss``, ``PairWiseLoss``,
``LogExpLoss``; ``openrlhf.models.utils``: ``compute_approx_kl``, ``log_probs_from_logits``,
``compute_entropy``; ``openrlhf.models.actor``: ``Actor.forward`` as ``actor_forward``, on the
lm_head-fused op), computed by rlhf_fast's ops. They do not import OpenRLHF: use them directly,
or let ``enable()`` put them where OpenRLHF's trainers look them up::

    import rlhf_fast.integrations.openrlhf as rf_openrlhf
    rf_openrlhf.enable()     # before the trainer is built; disable() puts OpenRLHF's own back

What the drop-ins compute differently, on purpose:
- ``log_probs_from_logits`` does not divide the caller's logits by the temperature in place
  (OpenRLHF's does; its Actor has already divided them and passes temperature=1.0).
- ``PolicyLoss`` (ppo) does not clamp the log-ratio to [-20, 20] before exp(): the two agree for
  every ratio below e^20, and its gradient is finite beyond (see ``rlhf_fast.objectives.ppo``).
- the losses come back in float32 whatever the inputs' dtype (OpenRLHF's keep bf16 rewards bf16).
- ``policy_loss_type="gspo"`` needs one advantage per response (the same value on each of its
  tokens, as OpenRLHF's outcome estimators give): rlhf_fast's GSPO weighs the response's ratio by
  that advantage. Per-token advantages (GAE) there raise ValueError naming the option.
- ``actor_forward`` never builds the [B, T, V] logits, so its ``output`` has no logits (and it
  refuses the calls whose answer is the logits, and MoE models' router aux_loss: see there).
"""

from __future__ import annotations

import importlib
import warnings

import torch

from .. import _validate as check
from ..choices import KL_ESTIMATORS
from ..hf import head_of, head_options, hidden_and_head
from ..kl_estimators import kl_loss_values
from ..ops.linear_logprobs import linear_token_logprobs
from ..ops.pairwise_reward_loss import pairwise_reward_loss
from ..ops.policy_loss import policy_loss_with_options, validate_inputs
from ..ops.token_logprobs import token_logprobs
from ..ops.value_loss import value_loss
from ..options import PolicyLossOptions
from ..reference import IGNORE_INDEX
from ..rollout_correction import Correction
from . import check_version, warn_once_if_untested

TESTED = "0.11.2"
SUPPORTED = ("0.11", "0.12")  # [lo, hi): the releases whose loss.py / utils.py the drop-ins mirror

# OpenRLHF's KL clamp (utils.compute_approx_kl) and the cap of the IS weight of its unbiased KL gradient.
KL_CLAMP = 10.0
KL_IS_WEIGHT_CLIP = 10.0


def check_openrlhf_version() -> str:
    """The installed OpenRLHF version; warns ``UntestedVersionWarning`` outside SUPPORTED. ImportError if absent."""
    return check_version("openrlhf", TESTED, *SUPPORTED)


def _soft_version_check() -> None:
    warn_once_if_untested("openrlhf", TESTED, *SUPPORTED)


def _agg_and_normalizer(token_level_loss: bool, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's aggregate_loss as an ``agg`` mode and a normaliser: token level, masked sum over
    batch_num_tokens / dp_size (this batch's token count when None); sample level, the sum of the
    responses' token means over global_batch_size / dp_size (this batch's non-empty rows when None)."""
    if token_level_loss:
        return "token-mean", None if batch_num_tokens is None else batch_num_tokens / dp_size
    return "seq-mean-token-mean", None if global_batch_size is None else global_batch_size / dp_size


def _mask_of(action_mask, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool, device=like.device) if action_mask is None else action_mask


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x.float(), 0.0).sum() / mask.sum().clamp(min=1)


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` (PPO / dual-clip PPO / GSPO, with its vLLM-mismatch correction) on
    ``rlhf_fast.policy_loss``'s objectives: the same constructor, ``forward`` and return value
    ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` (the last two None unless
    is_correction_level is on and the type is ppo).

    Mapping: clip_eps_low / clip_eps_high -> clip_eps / clip_eps_high, dual_clip -> dual_clip,
    token_level_loss -> agg "token-mean" / "seq-mean-token-mean", policy_loss_type "ppo" / "gspo" ->
    objective "ppo" / "gspo"; dp_size, batch_num_tokens, global_batch_size -> normalizer. The
    is_correction_* gate (ratio, binary_kl or tv; token or seq; mask or clip) is OpenRLHF's,
    computed from the inputs and applied as detached per-token weights of the policy-gradient term.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
    ) -> None:
        super().__init__()
        _soft_version_check()
        check.choice("policy_loss_type", policy_loss_type, ("ppo", "gspo"))
        check.choice("is_correction_level", is_correction_level, ("off", "token", "seq"))
        check.choice("is_correction_mode", is_correction_mode, ("mask", "clip"))
        check.choice("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv"))
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' requires is_correction_level='token' and is_correction_gating='ratio'")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating!r} takes an upper bound only: "
                             f"is_correction_threshold[0] must be 0, got {is_correction_threshold[0]}")  # fmt: skip
        if dual_clip is not None and policy_loss_type != "ppo":
            raise ValueError(f"dual_clip={dual_clip} with policy_loss_type={policy_loss_type!r}: rlhf_fast's dual clip "
                             "applies to policy_loss_type='ppo' only")  # fmt: skip
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        # As OpenRLHF: GSPO is a sequence-level loss (the mean of the responses' losses).
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = tuple(is_correction_threshold)
        # clip_eps_high is given explicitly even when equal, so that the options never depend on a default.
        self.options = PolicyLossOptions(
            objective=policy_loss_type, clip_eps=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
            agg="token-mean" if self.token_level_loss else "seq-mean-token-mean",
        )  # fmt: skip

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ):
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs (the rollout "
                             "engine's log-probs); got None")  # fmt: skip
        mask = _mask_of(action_mask, log_probs)
        _, normalizer = _agg_and_normalizer(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        # OpenRLHF's GSPO with the correction on takes its ratio against the rollout's log-probs.
        behaviour = rollout_log_probs if correcting and self.policy_loss_type == "gspo" else old_log_probs
        correction = validate_inputs(log_probs, behaviour, advantages, mask, None)
        mask = correction.mask
        if self.policy_loss_type == "gspo":
            _check_one_advantage_per_response(advantages, mask)
        vllm_kl = is_filter_ratio = None
        if correcting and self.policy_loss_type == "ppo":
            check.tensor("rollout_log_probs", rollout_log_probs, dtypes=check.FLOAT_DTYPES, shape=log_probs.shape)
            weights, is_filter_ratio, vllm_kl = self._correction(old_log_probs, rollout_log_probs, mask)
            correction = Correction(mask, weights, {})
        loss, stats = policy_loss_with_options(log_probs, behaviour, advantages, correction, None, self.options, normalizer)
        ppo_kl = _masked_mean(old_log_probs.detach().float() - log_probs.detach().float(), mask)
        return loss, stats["clipfrac"], ppo_kl, vllm_kl, is_filter_ratio

    @torch.no_grad()
    def _correction(self, old_log_probs, rollout_log_probs, mask):
        """OpenRLHF's train/rollout mismatch gate: the per-token weights of the policy-gradient term
        (clip: the token ratio clamped to the band; mask: the token ratio where the gated statistic
        is in the band, else 0), the filtered fraction and vllm_kl = mean(rollout - old)."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        old, rollout = (torch.where(mask, t.float(), 0.0) for t in (old_log_probs, rollout_log_probs))
        log_w = old - rollout  # log(pi_train / pi_rollout)
        token_w = torch.exp(log_w)
        count = mask.sum(-1, keepdim=True).clamp(min=1)
        if self.is_correction_gating == "ratio":
            stat = torch.exp(log_w.sum(-1, keepdim=True) / count) if seq_level else token_w
        else:
            p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = torch.where(mask, stat, 0.0).sum(-1, keepdim=True) / count
        if self.is_correction_mode == "clip":
            weights, filtered = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            weights, filtered = torch.where(keep, token_w, 0.0), ~keep
        if seq_level:
            # OpenRLHF's per-response mean of an empty response is 0 / 0: never in the band, so filtered.
            filtered = filtered | ~mask.any(-1, keepdim=True)
        filter_ratio = filtered.float().mean() if seq_level else _masked_mean(filtered, mask)
        return torch.where(mask, weights, 0.0), filter_ratio, _masked_mean(rollout - old, mask)


def _check_one_advantage_per_response(advantages: torch.Tensor, mask: torch.Tensor) -> None:
    """rlhf_fast's GSPO takes one advantage per response; OpenRLHF's weighs each token's copy of the
    sequence ratio by that token's advantage. Equal when the advantage is constant over each
    response; otherwise refuse rather than compute a different loss (one host sync)."""
    if advantages.dim() == 1:
        return
    adv = torch.where(mask, advantages.detach().float(), 0.0)
    mean = adv.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    spread = torch.where(mask, (adv - mean).abs(), 0.0).amax() if adv.numel() else adv.new_zeros(())
    scale = adv.abs().amax() if adv.numel() else adv.new_zeros(())
    if spread.item() > 1e-6 * max(scale.item(), 1.0):
        raise ValueError(
            "policy_loss_type='gspo': rlhf_fast's GSPO needs one advantage per response (the same value on "
            f"each of its tokens); these advantages vary within a response by up to {spread.item():.3g}. "
            "Use outcome advantages (grpo, reinforce++) or OpenRLHF's own PolicyLoss."
        )


class ValueLoss(torch.nn.Module):
    """OpenRLHF's ``ValueLoss`` on ``rlhf_fast.value_loss``: 0.5 * the (clipped) squared error,
    aggregated as OpenRLHF's aggregate_loss."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        _soft_version_check()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> torch.Tensor:
        agg, normalizer = _agg_and_normalizer(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        if old_values is None and self.clip_eps is None:
            old_values = values.detach()  # not read without clipping, as in OpenRLHF
        return value_loss(values, old_values, returns, _mask_of(action_mask, values), clip_eps=self.clip_eps,
                          agg=agg, normalizer=normalizer)  # fmt: skip


def _flat_pair(chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin):
    """The [B] scores rlhf_fast's pairwise loss takes; OpenRLHF's takes any shape (its mean is over all)."""
    chosen, rejected = chosen_reward.reshape(-1), reject_reward.reshape(-1)
    if isinstance(margin, torch.Tensor):
        margin = margin.expand(chosen_reward.shape).reshape(-1)
    return chosen, rejected, margin


class PairWiseLoss(torch.nn.Module):
    """OpenRLHF's ``PairWiseLoss`` (Bradley-Terry, optional margin) on ``rlhf_fast.pairwise_reward_loss``:
    mean(-log sigmoid(chosen - reject - margin)), a float32 scalar."""

    def forward(self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor = None) -> torch.Tensor:
        _soft_version_check()  # OpenRLHF's class has no __init__ of its own
        chosen, rejected, margin = _flat_pair(chosen_reward, reject_reward, margin)
        return pairwise_reward_loss(chosen, rejected, margin=margin)[0]


class LogExpLoss(torch.nn.Module):
    """OpenRLHF's ``LogExpLoss``, mean(log(1 + exp(reject - chosen))): the same Bradley-Terry loss
    as PairWiseLoss without margin (OpenRLHF ignores the margin here too), computed without the
    overflow of exp for large gaps."""

    def forward(self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor = None) -> torch.Tensor:
        _soft_version_check()  # OpenRLHF's class has no __init__ of its own
        chosen, rejected, _ = _flat_pair(chosen_reward, reject_reward, None)
        return pairwise_reward_loss(chosen, rejected)[0]


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl`` on rlhf_fast's estimators (``kl_estimators.kl_loss_values``):
    k1 / k2 / k3 (and "abs") of log_probs - log_probs_base, clamped to [-10, 10]. float32, the inputs' shape.

    unbiased_gradient: the value as above with the gradient of w * k2, w = min(pi / pi_old, 10)
    detached (1 without log_probs_old): the straight-through estimator of OpenRLHF (and verl's "k3+").
    """
    check.tensor("log_probs", log_probs, dtypes=check.FLOAT_DTYPES)
    check.tensor("log_probs_base", log_probs_base, dtypes=check.FLOAT_DTYPES, shape=log_probs.shape,
                 like=("log_probs", log_probs))  # fmt: skip
    check.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    logp, base = log_probs.float(), log_probs_base.float()
    if kl_estimator == "k3":
        # As OpenRLHF: below d = -10, k3 already exceeds the clamp; holding d there keeps e^{-d}
        # finite, so the clamped token's gradient is 0, not 0 * inf.
        base = torch.where(logp - base < -KL_CLAMP, (logp + KL_CLAMP).detach(), base)
    value = kl_loss_values(logp, base, kl_estimator, KL_CLAMP)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        weight = 1.0
    else:
        check.tensor("log_probs_old", log_probs_old, dtypes=check.FLOAT_DTYPES, shape=log_probs.shape,
                     like=("log_probs", log_probs))  # fmt: skip
        weight = torch.exp(logp.detach() - log_probs_old.detach().float()).clamp(max=KL_IS_WEIGHT_CLIP)
    # "k1+": value 0 after subtracting its detached self, gradient that of k2 = d^2 / 2 (in both inputs).
    k2_grad = kl_loss_values(logp, log_probs_base.float(), "k1+", None)
    return value.detach() + weight * (k2_grad - k2_grad.detach())


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits`` by ``rlhf_fast.token_logprobs``: log_softmax(logits /
    temperature) at labels, float32, [..., V], [...] -> [...]; the logits are not modified."""
    return token_logprobs(logits, labels, temperature=temperature)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's ``compute_entropy`` by ``rlhf_fast.token_logprobs``: the entropy of softmax(logits)
    per position, float32, [..., V] -> [...] (the fused kernel computes it next to a log-prob
    of token 0, which is dropped)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True)[1]


def actor_forward(
    self,
    sequences: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    return_output=False,
    allgather_logits=False,
    return_logprobs=False,
    ring_attn_group=None,
    packed_seq_lens: list[int] | None = None,
    return_entropy=False,
    **mm_inputs,
):
    """OpenRLHF's ``Actor.forward`` on ``rlhf_fast.linear_token_logprobs``: the same signature and
    return values, computed from the model's last hidden states and its lm_head
    (``rlhf_fast.hf.hidden_and_head``), so the [B, T, V] logits are never built. ``self`` is an
    OpenRLHF ``Actor`` (its ``model``, ``temperature``, ``packing_samples``); ``enable()`` makes
    this its forward.

    Returns, as OpenRLHF, for sequences [B, T]: with ``action_mask`` [B, A] the action log-probs
    [B, A] (those of the tokens sequences[:, T-A:], times action_mask; only those rows are
    computed); without it and ``return_logprobs=True`` every next-token log-prob [B, T-1]. Both
    are float32 log_softmax(logits / temperature), the head's logit transform included
    (``rlhf_fast.hf.head_options``). ``return_output=True`` also returns a transformers
    ``CausalLMOutputWithPast`` without logits; ``return_entropy=True`` (which needs
    return_output, as in OpenRLHF) sets its ``entropy`` [B, T-1], every position's as OpenRLHF
    computes it (so every row of the sequences is computed then). Packed samples
    (``packing_samples``: the padding removed, one [1, N] row with per-sample position_ids)
    are supported as in OpenRLHF, padding positions 0.

    Raises ValueError, naming the option, for what it cannot serve: a call that returns the logits
    (action_mask=None and return_logprobs=False), ring attention (ring_attn_group), multimodal
    actors (is_vlm, mm_inputs), return_output on an MoE model whose config sets
    output_router_logits (OpenRLHF's output then carries the router's aux_loss), and a head
    under DeepSpeed ZeRO-3 (partitioned: its forward, which gathers it, is never run). With
    ``enable(fused_actor=False)`` OpenRLHF's own forward runs instead.
    """
    model = self.model
    _check_actor_call(self, model, sequences, action_mask, attention_mask, return_output, return_logprobs,
                      ring_attn_group, return_entropy, mm_inputs)  # fmt: skip
    batch, seqlen = sequences.shape
    # Row t predicts token t + 1; the last row (OpenRLHF's rolled label wraps to token 0) is dropped.
    needed = torch.zeros(batch, seqlen, dtype=torch.bool, device=sequences.device)
    if return_entropy or action_mask is None:
        needed[:, :-1] = True  # OpenRLHF returns every row's entropy, or every row's log-prob
    else:
        needed[:, seqlen - 1 - action_mask.shape[1] : -1] = action_mask != 0
    labels = torch.where(needed, torch.roll(sequences, shifts=-1, dims=1), IGNORE_INDEX)
    if getattr(self, "packing_samples", False):
        # OpenRLHF's unpad_and_slice_tensor: the attended tokens in one row, positions restarting per sample.
        kept = torch.nonzero(attention_mask.flatten()).flatten()
        positions = torch.clip(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
        inputs, mask, position_ids = sequences.flatten()[kept][None], None, positions.flatten()[kept][None]
        labels = labels.flatten()[kept][None]
    else:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        inputs, mask = sequences, attention_mask
    hidden, weight, bias = hidden_and_head(model, inputs, mask, position_ids=position_ids)
    result = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                   return_entropy=return_entropy, **head_options(model))  # fmt: skip
    logp, entropy = result if return_entropy else (result, None)
    if getattr(self, "packing_samples", False):
        # OpenRLHF's gather_and_pad_tensor: back to [B, T], 0 at the padding.
        logp = _pad_packed(logp, kept, batch, seqlen)
        entropy = None if entropy is None else _pad_packed(entropy, kept, batch, seqlen)
    output = None
    if return_output:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        output = CausalLMOutputWithPast()
        if return_entropy:
            output.entropy = entropy[:, :-1]  # an attribute, not a key, as OpenRLHF sets it
    log_probs = logp[:, :-1]
    if action_mask is not None:
        log_probs = log_probs[:, -action_mask.shape[1] :] * action_mask.float()
    return (log_probs, output) if return_output else log_probs


def _pad_packed(values: torch.Tensor, kept: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    return values.new_zeros(batch * seqlen).index_copy(0, kept, values.flatten()).view(batch, seqlen)


def _check_actor_call(actor, model, sequences, action_mask, attention_mask, return_output, return_logprobs,
                      ring_attn_group, return_entropy, mm_inputs) -> None:
    """actor_forward's refusals, each naming the option (see its docstring), before any compute."""
    fallback = "; enable(fused_actor=False) (rlhf_fast.integrations.openrlhf) keeps OpenRLHF's Actor.forward"
    if action_mask is None and not return_logprobs:
        raise ValueError("Actor.forward with action_mask=None and return_logprobs=False returns the model's logits, "
                         "which the fused actor never builds" + fallback)  # fmt: skip
    if return_entropy and not return_output:
        raise ValueError("Actor.forward: return_entropy=True needs return_output=True (the entropy is output.entropy)")
    if ring_attn_group is not None:
        raise ValueError("Actor.forward: ring_attn_group (ring attention) is not supported by the fused actor"
                         + fallback)  # fmt: skip
    if getattr(actor, "is_vlm", False) or mm_inputs:
        raise ValueError(f"Actor.forward: multimodal actors (is_vlm, mm_inputs {sorted(mm_inputs)}) are not supported "
                         "by the fused actor" + fallback)  # fmt: skip
    if attention_mask is None:
        raise ValueError("Actor.forward: attention_mask is required (OpenRLHF derives position_ids from it); got None")
    check.tensor("sequences", sequences, dtypes=check.INDEX_DTYPES)
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be [B, T] with T >= 2; got {check.describe(sequences)}")
    check.tensor("attention_mask", attention_mask, shape=sequences.shape, like=("sequences", sequences))
    if action_mask is not None:
        check.tensor("action_mask", action_mask, like=("sequences", sequences))
        rows, tokens = sequences.shape
        if action_mask.dim() != 2 or action_mask.shape[0] != rows or not 1 <= action_mask.shape[1] < tokens:
            raise ValueError(f"action_mask must be [B, A] with B = {rows} and 1 <= A < T = {tokens} (sequences "
                             f"{tuple(sequences.shape)}); got {check.describe(action_mask)}")  # fmt: skip
    config = getattr(model, "config", None)
    if return_output and getattr(config, "output_router_logits", False):
        raise ValueError("Actor.forward: return_output=True on a model with config.output_router_logits=True (an MoE "
                         "model; OpenRLHF's output then carries the router's aux_loss, which the fused actor does not "
                         "compute)" + fallback)  # fmt: skip
    if any(hasattr(p, "ds_id") for p in head_of(model) if p is not None):
        raise ValueError("Actor.forward: the lm_head is partitioned by DeepSpeed ZeRO-3 (zero_stage=3); the fused "
                         "actor never runs the head's forward, which gathers it" + fallback)  # fmt: skip


# Where OpenRLHF 0.11.2 defines the names and where its trainers import them from.
_LOSSES = ("PolicyLoss", "ValueLoss", "PairWiseLoss", "LogExpLoss")
DEFINITIONS = {
    "openrlhf.models.loss": _LOSSES,
    "openrlhf.models": _LOSSES,
    "openrlhf.models.utils": ("compute_approx_kl", "log_probs_from_logits", "compute_entropy"),
    "openrlhf.models.actor": ("log_probs_from_logits", "compute_entropy"),  # Actor.forward's log-probs and entropy
}
TRAINERS = {
    "openrlhf.trainer.ray.ppo_actor": ("PolicyLoss", "compute_approx_kl"),
    "openrlhf.trainer.ray.ppo_critic": ("ValueLoss",),
    "openrlhf.trainer.ppo_utils.experience_maker": ("compute_approx_kl",),
    "openrlhf.trainer.rm_trainer": ("PairWiseLoss", "LogExpLoss"),
}
_DROP_INS = {
    "PolicyLoss": PolicyLoss, "ValueLoss": ValueLoss, "PairWiseLoss": PairWiseLoss, "LogExpLoss": LogExpLoss,
    "compute_approx_kl": compute_approx_kl, "log_probs_from_logits": log_probs_from_logits,
    "compute_entropy": compute_entropy,
}  # fmt: skip
# Replaced on the class itself (openrlhf.models.Actor is the same class), so actors built before
# enable() and the ones DeepSpeed wraps run it too.
ACTOR_FORWARD = ("openrlhf.models.actor", "Actor.forward")
_originals: dict[tuple[str, str], object] = {}


def _owner_and_attr(module_name: str, name: str):
    owner, *path = [importlib.import_module(module_name), *name.split(".")]
    for attr in path[:-1]:
        owner = getattr(owner, attr)
    return owner, path[-1]


def enable(fused_actor: bool = True) -> tuple[str, ...]:
    """Put the drop-ins in place of OpenRLHF's names, in ``openrlhf.models`` (and its ``loss``,
    ``utils``, ``actor`` modules) and in the trainer modules that import them (ppo_actor,
    ppo_critic, experience_maker, rm_trainer). Call it before the trainers are built: an object
    made earlier keeps OpenRLHF's class.

    fused_actor: also make ``actor_forward`` OpenRLHF's ``Actor.forward`` (the actor's and the
    reference model's log-probs and entropy from the hidden states and the lm_head, without
    the [B, T, V] logits). False keeps OpenRLHF's forward, which then computes them from its
    logits with the ``log_probs_from_logits`` / ``compute_entropy`` drop-ins: for what
    ``actor_forward`` refuses (ZeRO-3, ring attention, VLMs, MoE aux_loss).

    A trainer module that cannot be imported here (ray, vllm or deepspeed missing) is skipped,
    with a warning: that trainer cannot run in this environment either. Returns the patched names
    as "module.name". Idempotent; ``disable()`` restores OpenRLHF's own.
    """
    check_openrlhf_version()
    patched, skipped = [], []
    for module_name, names in (DEFINITIONS | TRAINERS).items():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # a trainer's own dependencies may fail in other ways than ImportError
            if module_name in DEFINITIONS:
                raise ImportError(f"rlhf_fast.integrations.openrlhf.enable(): cannot import {module_name} ({error})") from error
            skipped.append(f"{module_name} ({error})")
            continue
        for name in names:
            if not hasattr(module, name):
                raise AttributeError(f"rlhf_fast.integrations.openrlhf.enable(): {module_name} has no {name}; "
                                     f"this entry point was written for openrlhf {TESTED}")  # fmt: skip
            _originals.setdefault((module_name, name), getattr(module, name))
            setattr(module, name, _DROP_INS[name])
            patched.append(f"{module_name}.{name}")
    owner, attr = _owner_and_attr(*ACTOR_FORWARD)
    if fused_actor:
        _originals.setdefault(ACTOR_FORWARD, owner.__dict__[attr])
        setattr(owner, attr, actor_forward)
        patched.append(".".join(ACTOR_FORWARD))
    elif ACTOR_FORWARD in _originals:
        setattr(owner, attr, _originals.pop(ACTOR_FORWARD))
    if skipped:
        warnings.warn("rlhf_fast.integrations.openrlhf.enable(): not patched, cannot be imported here: "
                      + "; ".join(skipped), stacklevel=2)  # fmt: skip
    return tuple(patched)


def disable() -> None:
    """Restore every name ``enable()`` replaced."""
    for (module_name, name), original in _originals.items():
        setattr(*_owner_and_attr(module_name, name), original)
    _originals.clear()
