"""TRL entry point: ``enable(trainer)`` runs a TRL trainer's log-probs and losses on rlhf_fast's ops.

    trainer = GRPOTrainer(model=..., args=GRPOConfig(...), ...)
    rlhf_fast.integrations.trl.enable(trainer)      # returns the trainer; disable(trainer) undoes it
    trainer.train()

What it changes, per trainer instance (the class and every other trainer stay stock):

- ``GRPOTrainer._get_per_token_logps_and_entropies`` (the policy's old log-probs, the reference's, and
  the ones the loss uses): the model's decoder, then ``linear_token_logprobs`` on the last hidden
  states and the lm_head (``rlhf_fast.hf``), at TRL's sampling temperature, with the head's
  logit_scale / soft-cap. No [B, T, V] logits.
- ``GRPOTrainer._compute_loss``: ``fused_linear_policy_loss`` from the hidden states, with TRL's
  options mapped onto ``PolicyLossOptions`` (``grpo_options``: the README's table), TRL's
  off-policy sequence mask as zeroed advantages and its entropy bonus as a separate token mean,
  and TRL's own metrics (kl, entropy, clip ratios, policy_loss, entropy_coef) logged as TRL defines them.
  loss_type "vespo", which no objective of the op is, runs TRL's [B, T] arithmetic on the log-probs
  of ``linear_token_logprobs`` (``_vespo_loss``).
- ``SFTTrainer.compute_loss``: the completion / assistant cross-entropy through ``linear_sft_loss``.
- ``RewardTrainer.compute_loss``: the Bradley-Terry loss through ``pairwise_reward_loss``.

With several processes (DDP; accelerate's MULTI_* types) every cross-process reduction of TRL's loss
is TRL's own, through the trainer's accelerator: the top_entropy_quantile threshold over all
processes' tokens (``get_high_entropy_mask``), the dapo / cispo normaliser (``num_items_in_batch``)
and the metrics; the decoder runs as the DDP wrapper's forward, so DDP syncs the gradient
(``_hidden_and_head``). FSDP, DeepSpeed and a multi-process SFTTrainer are refused.

A TRL option the mapping does not reproduce exactly raises ``NotImplementedError`` naming it, at
``enable`` for the trainer's configuration and at the first step for what only the batch shows
(multimodal or padding-free batches, MoE aux losses); nothing falls back silently to another
loss. Tested with TRL 1.16.0 (``TESTED``); another version warns
(``rlhf_fast.integrations.UntestedVersionWarning``). trl is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types

import torch

from . import check_version

TESTED, LOWEST, FIRST_UNTESTED = "1.16.0", "1.16", "1.17"

_PATCHED = "_rlhf_fast_patched"  # instance attribute: {method name: the instance's own attribute before, or None}
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip

# TRL loss_type -> (objective at importance_sampling_level="token", agg). "sequence" turns "ppo" into "gspo".
_GRPO_LOSSES = {
    "grpo": ("ppo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "token-mean"),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm"),
    "dapo": ("ppo", "token-mean"),  # normalised by TRL's num_items_in_batch, passed as normalizer
    "luspo": ("ppo", "seq-mean-token-sum"),
    "cispo": ("cispo", "token-mean"),  # as dapo
    "sapo": ("sapo", "seq-mean-token-mean"),
}
_GLOBAL_NORMALIZED = ("dapo", "cispo", "vespo")
_VESPO = "vespo"  # no objective of the op: enable's loss computes it on the fused log-probs (_vespo_loss)


def _unsupported(option: str, value, why: str) -> NotImplementedError:
    return NotImplementedError(f"rlhf_fast.integrations.trl: {option}={value!r} is not supported ({why}); "
                               f"disable it or run this trainer without rlhf_fast")  # fmt: skip


def grpo_options(args, *, use_vllm: bool = False):
    """``PolicyLossOptions`` equal to TRL's GRPO loss under ``args`` (a ``GRPOConfig``).

    loss_type picks the objective and agg (``_GRPO_LOSSES``); epsilon / epsilon_high are clip_eps /
    clip_eps_high (cispo's epsilon_high, a bound on the ratio itself, is 1 + clip_eps_high with no
    lower bound); delta is the dual clip; beta the k3 KL coefficient, with use_bias_correction_kl as
    kl_is_correction; top_entropy_quantile as is (``enable``'s loss applies TRL's mask instead, whose
    quantile spans all processes: ``_high_entropy_advantages``); vLLM's importance-sampling correction as rollout_is
    (``_vllm_correction``). Two TRL options are not options of the op, and ``enable``'s loss applies
    them around it: off_policy_mask_threshold (``_off_policy_advantages``) and the entropy bonus,
    entropy_coef / use_adaptive_entropy (``_entropy_bonus``).
    Raises NotImplementedError naming the first option with no exact counterpart.
    """
    from ..options import PolicyLossOptions

    loss_type, level = args.loss_type, args.importance_sampling_level
    if loss_type not in _GRPO_LOSSES:
        raise _unsupported("loss_type", loss_type, f"rlhf_fast maps {sorted(_GRPO_LOSSES)}")
    objective, agg = _GRPO_LOSSES[loss_type]
    if level == "sequence":
        if objective != "ppo":
            raise _unsupported("importance_sampling_level", level, f"no sequence-level {loss_type} objective")
        objective = "gspo"
    elif level != "token":
        raise _unsupported("importance_sampling_level", level, "TRL knows 'token' and 'sequence'")
    fields = dict(objective=objective, agg=agg, top_entropy_quantile=float(args.top_entropy_quantile))
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else eps_low
    if objective == "cispo":
        if not eps_high > 1:
            raise _unsupported("epsilon_high", eps_high, "cispo's bound on the ratio must be > 1")
        fields.update(clip_eps=None, clip_eps_high=eps_high - 1)
    elif objective == "sapo":
        fields.update(sapo_tau_pos=args.sapo_temperature_pos, sapo_tau_neg=args.sapo_temperature_neg)
    else:
        fields.update(clip_eps=eps_low, clip_eps_high=eps_high)
        if args.delta is not None:
            if objective != "ppo":
                raise _unsupported("delta", args.delta, "two-sided clipping of a sequence-level ratio")
            if not args.delta > 1 + eps_high:
                raise _unsupported("delta", args.delta, f"it equals a dual clip only above 1 + epsilon_high = {1 + eps_high}")
            fields["dual_clip"] = float(args.delta)
    if loss_type == "dr_grpo":
        fields["max_response_length"] = args.max_completion_length
    if args.beta != 0.0:
        fields.update(kl_coef=float(args.beta), kl_estimator="k3")
        if args.use_bias_correction_kl:
            if level == "sequence":
                raise _unsupported("use_bias_correction_kl", True, "TRL weights the KL by the sequence-level ratio there")
            fields["kl_is_correction"] = True
    if use_vllm and args.vllm_importance_sampling_correction:
        fields.update(_vllm_correction(args))
    return PolicyLossOptions(**fields)


_VLLM_MODES = {"token_truncate": ("token", "truncate"), "sequence_truncate": ("sequence", "truncate"),
               "token_mask": ("token", "masked_weight"), "sequence_mask": ("sequence", "masked_weight")}  # fmt: skip


def _vllm_correction(args) -> dict:
    """The rollout_is fields of TRL's vLLM importance-sampling correction (``_generate_and_score_completions``):
    w = exp(old - sampled) per token or summed per sequence; *_truncate weights the policy-gradient
    term by clamp(w, clip_min, clip_max), *_mask by w inside [clip_min, clip_max] and 0 outside with
    the token kept in the normaliser and KL term (rlhf_fast's "masked_weight"). A bound that is None is
    none (clip_max None: rollout_is_threshold=math.inf)."""
    mode = args.vllm_importance_sampling_mode
    if mode not in _VLLM_MODES:
        raise _unsupported("vllm_importance_sampling_mode", mode, f"rlhf_fast maps {sorted(_VLLM_MODES)}")
    level, kind = _VLLM_MODES[mode]
    clip_min, clip_max = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if clip_max is not None and not clip_max > 1:
        raise _unsupported("vllm_importance_sampling_clip_max", clip_max, "rlhf_fast's upper bound is > 1")
    if clip_min is not None and not 0 <= clip_min <= 1:
        raise _unsupported("vllm_importance_sampling_clip_min", clip_min, "rlhf_fast's lower bound is in [0, 1]")
    low = (0.0 if clip_min is None else float(clip_min)) if kind == "masked_weight" else clip_min
    return dict(rollout_is=level, rollout_is_mode=kind, rollout_is_threshold=math.inf if clip_max is None else float(clip_max),
                rollout_is_threshold_low=None if low is None else float(low))  # fmt: skip


_SHARDED = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")  # accelerate's DistributedType values that shard parameters


def _hidden_and_head(trainer, model, input_ids, attention_mask, **model_kwargs):
    """(hidden, weight, bias, head options) of the causal LM ``model`` (``rlhf_fast.hf.hidden_and_head``).

    With several processes ``model`` is the trainer's DistributedDataParallel wrapper, and DDP syncs
    gradients only for a graph built inside its forward: its forward arms the reducer
    (``prepare_for_backward``) and, with find_unused_parameters (transformers' default without
    gradient checkpointing), marks every parameter its outputs do not reach as unused. So the
    decoder runs *as* the wrapper's forward (the forward redirection of TRL's distillation trainer)
    and returns the head's parameters as views, which puts them in the outputs' graph too.
    """
    from ..hf import head_options, hidden_and_head

    processes = trainer.accelerator.num_processes
    if processes > 1 and trainer.accelerator.distributed_type in _SHARDED:
        raise _unsupported("distributed_type", str(trainer.accelerator.distributed_type),
                           "sharded parameters; rlhf_fast maps DistributedDataParallel runs")  # fmt: skip
    inner = trainer.accelerator.unwrap_model(model)
    head = head_options(inner)
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if processes > 1 and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            raise _unsupported("model", type(model).__name__, "a trainable model with several processes that is not "
                               "the trainer's DistributedDataParallel wrapper: its gradients would not be synced")  # fmt: skip
        return (*hidden_and_head(inner, input_ids, attention_mask, **model_kwargs), head)

    def run():
        hidden, weight, bias = hidden_and_head(model.module, input_ids, attention_mask, **model_kwargs)
        return hidden, weight.view_as(weight), None if bias is None else bias.view_as(bias)

    return (*_as_forward_of(model, run), head)


def _as_forward_of(wrapper, function):
    """``function()`` run as ``wrapper``'s forward: wrapper.module's forward is replaced for this one call."""
    module, missing = wrapper.module, object()
    own = module.__dict__.get("forward", missing)  # accelerate's autocast wraps the instance's forward

    def restore():
        if own is missing:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    def forward(*args, **kwargs):
        restore()  # before the decoder runs, which may call the module's own forward
        return function()

    module.forward = forward
    try:
        return wrapper()
    finally:
        restore()


def _completion_hidden(trainer, model, input_ids, attention_mask, logits_to_keep):
    """(hidden [B, K, H], weight, bias, head options) predicting the last K tokens of input_ids."""
    hidden, weight, bias, head = _hidden_and_head(trainer, model, input_ids, attention_mask)
    hidden = hidden[:, -logits_to_keep - 1 : -1]
    if getattr(trainer.args, "cast_lm_head_to_fp32", False):
        hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
    return hidden, weight, bias, head


def _head_context(trainer, hidden):
    """Where the head runs: under the trainer's autocast, or outside it with cast_lm_head_to_fp32 (as TRL does)."""
    if getattr(trainer.args, "cast_lm_head_to_fp32", False):
        return torch.autocast(hidden.device.type, enabled=False)
    return contextlib.nullcontext()


def _refuse_multimodal(inputs: dict):
    given = [name for name in _MULTIMODAL if inputs.get(name) is not None]
    if given:
        raise _unsupported(given[0], "<tensor>", "multimodal batches")


def _grpo_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                              compute_entropy=False, compute_aux_loss=False, **multimodal):  # fmt: skip
    """TRL's ``_get_per_token_logps_and_entropies`` through ``linear_token_logprobs``: the same
    [B, K] log-probs (0 at padding) and entropies, from the decoder's hidden states and the head."""
    from ..ops.linear_logprobs import linear_token_logprobs

    _refuse_multimodal(multimodal)
    if compute_aux_loss:
        raise _unsupported("aux_loss (router_aux_loss_coef)", getattr(self, "router_aux_loss_coef", None), "MoE load-balancing loss")
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, am = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        labels = ids[:, -logits_to_keep:].masked_fill(am[:, -logits_to_keep:] == 0, -100)
        with self.accelerator.autocast():
            hidden, weight, bias, head = _completion_hidden(self, model, ids, am, logits_to_keep)
            with _head_context(self, hidden):
                    out = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                            return_entropy=compute_entropy, **head)  # fmt: skip
        logp, entropy = out if compute_entropy else (out, None)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


def _grpo_compute_loss(self, model, inputs):
    """TRL's ``GRPOTrainer._compute_loss`` with the loss from ``fused_linear_policy_loss``.

    The same value and gradient (the options: ``grpo_options``) and the same metrics, which TRL
    computes from the per-token log-probs and entropies: those come from one more forward sweep of
    ``linear_token_logprobs`` without gradient (2 N H V FLOPs besides the loss's 6 N H V). With TRL's
    entropy bonus that sweep keeps its graph, and its backward (4 N H V more) is the bonus's gradient.
    """
    from ..ops.fused_linear_policy_loss import fused_linear_policy_loss
    from ..ops.linear_logprobs import linear_token_logprobs

    _refuse_multimodal(inputs)
    if self.aux_loss_enabled:
        raise _unsupported("aux_loss (router_aux_loss_coef)", getattr(self, "router_aux_loss_coef", None), "MoE load-balancing loss")
    options = self.__dict__["_rlhf_fast_options"]
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    bool_mask = mask.bool()
    advantages = inputs["advantages"]
    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

    with self.accelerator.autocast():
        hidden, weight, bias, head = _completion_hidden(self, model, input_ids, attention_mask, logits_to_keep)
    with self.accelerator.autocast(), _head_context(self, hidden):
        labels = completion_ids.masked_fill(~bool_mask, -100)
        if self._entropy_bonus_enabled or options is None:  # the bonus and vespo need this sweep's graph
            graph_logp, graph_entropies = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                                          return_entropy=True, **head)  # fmt: skip
            logp, entropies = graph_logp.detach(), graph_entropies.detach()
        else:
            with torch.no_grad():  # TRL's metrics (and its old log-probs when it has none) need them per token
                logp, entropies = linear_token_logprobs(hidden.detach(), weight.detach(), labels,
                                                        bias=None if bias is None else bias.detach(),
                                                        temperature=self.temperature, return_entropy=True, **head)  # fmt: skip
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp if old_logp is None else old_logp
        ref_logp = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        rollout_logp, normalizer = None, None
        if options is not None and options.rollout_is is not None:
            # TRL gives a token vLLM could not score (NaN) a ratio of 1
            sampled = inputs["sampling_per_token_logps"]
            rollout_logp = torch.where(torch.isnan(sampled), old_logp, sampled)
        if self.loss_type in _GLOBAL_NORMALIZED:
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss_advantages = advantages
        if self.off_policy_mask_threshold is not None:
            loss_advantages = _off_policy_advantages(self, inputs, advantages, logp, old_logp, mask)
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            # float32 entropies, as TRL's fused head gives them: ties at the threshold fall the same way
            entropy_mask = self.get_high_entropy_mask(entropies.float(), mask, 1 - self.top_entropy_quantile)
            loss_advantages = _high_entropy_advantages(loss_advantages, entropy_mask)
        phi = None
        if options is None:
            loss, phi = _vespo_loss(self, inputs, graph_logp, old_logp, ref_logp, advantages, loss_advantages, mask, normalizer)
        else:
            loss, _ = fused_linear_policy_loss(hidden, weight, completion_ids, old_logp, loss_advantages, mask, bias=bias,
                                               ref_logp=ref_logp, rollout_logp=rollout_logp, normalizer=normalizer,
                                               temperature=self.temperature, options=options, **head)  # fmt: skip
        policy_loss = loss.detach()
        if self.loss_type not in _GLOBAL_NORMALIZED:
            loss = loss / accumulation
        if self._entropy_bonus_enabled:
            loss = loss - _entropy_bonus(self, mode, graph_entropies, mask, entropy_mask, policy_loss)
    _log_grpo_metrics(self, mode, logp, entropies, old_logp, ref_logp, advantages, mask, phi)
    return loss


def _vespo_loss(self, inputs, logp, old_logp, ref_logp, advantages, loss_advantages, mask, normalizer):
    """TRL 1.16's vespo loss (``_compute_loss``, loss_type "vespo"; arXiv:2602.10693) on ``logp``, the
    log-probs of ``linear_token_logprobs`` with their graph: per token -phi * A * log p, phi TRL's own
    ``get_gamma_weights`` (a detached per-sequence weight of the sequence's summed log-ratio and
    vLLM's importance ratio, with TRL's k / lambda for A >= 0 and A < 0), plus beta times the k3 KL
    (times the importance ratio with use_bias_correction_kl), summed over the mask and divided by
    ``normalizer`` (dapo's). No objective of the op is a per-sequence-weighted REINFORCE term, so
    the [B, T] arithmetic is TRL's, in torch; the [B, T, V] work is the fused sweep and its backward.
    ``loss_advantages`` carry the off-policy and high-entropy masks as zeros; phi comes from the
    unmasked ``advantages``, as in TRL. Returns (loss, phi [B, 1])."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    loss_adv = loss_advantages.unsqueeze(1) if loss_advantages.dim() == 1 else loss_advantages
    log_ratio = logp - old_logp
    args = self.args
    phi = self.get_gamma_weights(advantages=adv, log_ratio_per_token=log_ratio, mask=mask,
                                 importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                                 k_pos=args.vespo_k_pos, lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                                 lambda_neg=args.vespo_lambda_neg)  # fmt: skip
    per_token_loss = -phi * loss_adv * logp
    if self.beta != 0.0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        if args.use_bias_correction_kl:
            if self.importance_sampling_level == "sequence":
                log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            kl = kl * torch.exp(log_ratio)
        per_token_loss = per_token_loss + self.beta * kl
    return (per_token_loss * mask).sum() / normalizer, phi


def _off_policy_advantages(self, inputs, advantages, logp, old_logp, mask):
    """The advantages with TRL's off-policy sequence mask (DeepSeek-V3.2, arXiv:2512.02556, eq. 9)
    applied: TRL multiplies a dropped sequence's policy-gradient term by 0 (before the KL term,
    the normaliser unchanged). Every objective TRL has is 0, with zero gradient, at A = 0, so zeroing
    the dropped sequences' advantages gives the same loss and gradient. The mask is TRL's own
    ``get_off_policy_mask`` on the same quantities: A >= 0 or the sequence's mean of
    (sampler's or old log-prob - current log-prob) <= off_policy_mask_threshold."""
    per_token = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    keep = self.get_off_policy_mask(advantages=per_token, per_token_logps=logp,
                                    sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logp), mask=mask,
                                    off_policy_threshold=self.off_policy_mask_threshold)  # fmt: skip
    kept = per_token * keep.to(per_token.dtype)
    return kept.squeeze(1) if advantages.dim() == 1 else kept


def _high_entropy_advantages(advantages, entropy_mask):
    """[B, T] advantages that are 0 where TRL's high-entropy mask (top_entropy_quantile < 1) drops the
    token. TRL multiplies those tokens' policy-gradient term by 0, before the KL term, the normaliser
    unchanged: at A = 0 every objective is 0 with zero gradient, as for ``_off_policy_advantages``.
    The mask is TRL's own ``get_high_entropy_mask``, whose quantile is over the valid tokens of all
    processes (it gathers them through the accelerator); the op's own top_entropy_quantile would rank
    this process's tokens only, so ``enable`` sets it to 1 and passes this instead."""
    per_token = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return per_token * entropy_mask.to(per_token.dtype)


def _entropy_bonus(self, mode, entropies, mask, entropy_mask, policy_loss):
    """TRL 1.16's entropy bonus (``_compute_loss``, "Entropy bonus"), the term subtracted from the
    loss: coef times the token mean of the entropy over the mask (times TRL's high-entropy mask,
    ``entropy_mask``, with top_entropy_quantile < 1), divided by the accumulation steps, whatever the
    loss_type; the adaptive controller (use_adaptive_entropy, Skywork-OR1) updated and its metrics
    logged as TRL does."""
    effective_mask = mask if entropy_mask is None else mask * entropy_mask
    accumulation_factor = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_factor
    if self.use_adaptive_entropy:
        apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
    else:
        apply_coef = self.entropy_coef
    metrics = self._metrics[mode]
    metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
    if self.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.accelerator.sync_gradients:
            window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
            if world_entropy <= self.args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None
    if mode == "train" and self.accelerator.sync_gradients:
        metrics["entropy_coef"].append(self.entropy_coef)
    return apply_coef * entropy_loss


def _log_grpo_metrics(self, mode, logp, entropies, old_logp, ref_logp, advantages, mask, phi=None):
    """TRL 1.16's metrics of ``_compute_loss``, from the same per-token quantities, as it writes them
    (``phi``: vespo's sequence weights)."""
    from trl.trainer.utils import nanmax, nanmin

    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    if self.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        metrics["kl"].append(global_masked_mean(kl * coef_1 if self.args.use_bias_correction_kl else kl))  # as TRL logs it
    metrics["entropy"].append(global_masked_mean(entropies))
    if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
    elif self.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_masked_mean(((coef_1 > self.epsilon_high) & (advantages > 0)).float()))
    elif self.loss_type == _VESPO:
        metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))


def _check_sft(trainer):
    """The SFTTrainer configurations whose loss is not a plain mean -log p of the labels."""
    if trainer.args.loss_type != "nll":
        raise _unsupported("loss_type", trainer.args.loss_type, "rlhf_fast maps 'nll'")
    if trainer.compute_loss_func is not None:
        raise _unsupported("compute_loss_func", trainer.compute_loss_func, "a loss of the logits")
    if trainer.label_smoother is not None:
        raise _unsupported("label_smoothing_factor", trainer.args.label_smoothing_factor, "needs the full logits")


_SFT_ROWS = 1024  # token rows per chunk of the metrics pass: one [rows, V] float32 block at a time


def _sft_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """TRL's ``SFTTrainer.compute_loss`` (loss_type "nll") with the cross-entropy from ``linear_sft_loss``:
    the sum of -log p over the labelled tokens divided by num_items_in_batch when Trainer gives it (the
    tokens of the whole accumulation window), else by this batch's count, as TRL does. Its metrics
    (entropy, mean_token_accuracy) come from a no-gradient pass over the labelled rows in chunks."""
    from ..ops.linear_sft_loss import linear_sft_loss
    from ..reference import linear_logits

    mode = "train" if self.model.training else "eval"
    if return_outputs:
        raise _unsupported("return_outputs", True, "the logits are never built; compute_metrics needs them")
    if self.aux_loss_enabled:
        raise _unsupported("aux_loss (router_aux_loss_coef)", getattr(self, "router_aux_loss_coef", None), "MoE load-balancing loss")
    extra = sorted(set(inputs) - {"input_ids", "attention_mask", "labels", "position_ids", "use_cache"})
    if extra or "attention_mask" not in inputs:
        raise _unsupported("batch keys", extra or "no attention_mask (padding-free)", "plain causal-LM batches only")
    if self.accelerator.num_processes > 1:
        raise _unsupported("num_processes", self.accelerator.num_processes,
                           "the SFT loss is checked against TRL's in one process only")  # fmt: skip
    kwargs = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
    hidden, weight, bias, head = _hidden_and_head(self, model, inputs["input_ids"], inputs["attention_mask"], **kwargs)
    hidden, labels = hidden[:, :-1], inputs["labels"][:, 1:]
    mean = linear_sft_loss(hidden, weight, labels, bias=bias, **head)
    kept = labels != -100
    count = kept.sum()
    loss = mean if num_items_in_batch is None else mean * count / torch.as_tensor(num_items_in_batch).clamp(min=1)
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())

    with torch.no_grad():
        rows, targets = hidden[kept], labels[kept]
        entropy_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, rows.shape[0], _SFT_ROWS):
            logits = linear_logits(rows[start : start + _SFT_ROWS], weight, bias, **head).float()
            log_p = torch.log_softmax(logits, dim=-1)
            entropy_sum += -(log_p.exp() * log_p).sum()
            correct += (logits.argmax(dim=-1) == targets[start : start + _SFT_ROWS]).sum()
    num_valid = self.accelerator.gather_for_metrics(count).sum()
    entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
    num_correct = self.accelerator.gather_for_metrics(correct).sum()
    self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
    self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    return loss


def _reward_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """TRL's ``RewardTrainer.compute_loss`` with the Bradley-Terry loss from ``pairwise_reward_loss``:
    -log sigmoid(chosen - rejected - margin), plus center_rewards_coefficient * mean((c + r)^2), as TRL
    writes it; the same metrics."""
    from ..ops.pairwise_reward_loss import pairwise_reward_loss

    mode = "train" if self.model.training else "eval"
    inputs["use_cache"] = False
    outputs = model(**inputs)
    rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
    loss, stats = pairwise_reward_loss(rewards_chosen, rewards_rejected, margin=inputs.get("margin"),
                                       center_coef=self.args.center_rewards_coefficient or 0.0)  # fmt: skip
    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    with torch.no_grad():
        all_rewards = self.accelerator.gather(outputs.logits)
        self._metrics[mode]["min_reward"].append(all_rewards.min().item())
        self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
        self._metrics[mode]["max_reward"].append(all_rewards.max().item())
        self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(stats["accuracy"]).mean().item())
        self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(stats["margin"]).mean().item())
    return (loss, outputs) if return_outputs else loss


def _patches(trainer) -> dict:
    """{method name: replacement function} for this trainer, after checking its options."""
    from trl import GRPOTrainer, RewardTrainer, SFTTrainer

    if isinstance(trainer, SFTTrainer):
        _check_sft(trainer)
        return {"compute_loss": _sft_compute_loss}
    if isinstance(trainer, RewardTrainer):
        return {"compute_loss": _reward_compute_loss}
    if isinstance(trainer, GRPOTrainer):
        if trainer.args.loss_type == _VESPO:
            options = None  # _vespo_loss
        else:
            options = grpo_options(trainer.args, use_vllm=bool(trainer.use_vllm))
            # the loss applies TRL's cross-process top-entropy mask itself (_high_entropy_advantages)
            options = dataclasses.replace(options, top_entropy_quantile=1.0)
        trainer.__dict__["_rlhf_fast_options"] = options
        return {"_get_per_token_logps_and_entropies": _grpo_logps_and_entropies, "_compute_loss": _grpo_compute_loss}
    raise TypeError(f"rlhf_fast.integrations.trl.enable: {type(trainer).__name__} is not a trainer it knows "
                    "(GRPOTrainer, SFTTrainer, RewardTrainer)")  # fmt: skip


def enable(trainer):
    """Run ``trainer``'s log-probs and loss on rlhf_fast's ops (see the module docstring); returns it.

    Patches this instance only; calling it again is a no-op. Raises NotImplementedError naming a
    TRL option it cannot reproduce exactly, TypeError for a trainer it does not know.
    """
    check_version("trl", TESTED, LOWEST, FIRST_UNTESTED)
    if _PATCHED in getattr(trainer, "__dict__", {}):
        return trainer
    patches = _patches(trainer)
    saved = {name: trainer.__dict__.get(name) for name in patches}
    for name, function in patches.items():
        setattr(trainer, name, types.MethodType(function, trainer))
    trainer.__dict__[_PATCHED] = saved
    return trainer


def disable(trainer):
    """Undo ``enable``: the trainer's methods are its class's again (or what the instance had before)."""
    saved = trainer.__dict__.pop(_PATCHED, None)
    if saved is None:
        return trainer
    for name, before in saved.items():
        if before is None:
            del trainer.__dict__[name]
        else:
            trainer.__dict__[name] = before
    trainer.__dict__.pop("_rlhf_fast_options", None)
    return trainer


def is_enabled(trainer) -> bool:
    return _PATCHED in getattr(trainer, "__dict__", {})
