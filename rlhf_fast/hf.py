"""Hugging Face causal LMs: the last hidden states and the lm_head, without the logits.

The linear-head ops (``linear_token_logprobs``, ``fused_linear_policy_loss``, ``linear_sft_loss``)
take what comes *before* the [B, T, V] logits. ``hidden_and_head`` runs a transformers causal LM's
decoder stack (``model.get_decoder()``: ``model.model`` for Llama / Qwen2 / Mistral,
``model.transformer`` for GPT-2) and returns its output with the head's parameters, so that
``hidden @ weight.T + bias`` is ``model(...).logits``. Families that scale or soft-cap the head's
output (Cohere, Granite, Gemma 2/3, ...) have that transform in ``head_options(model)``, which the
linear-head ops take as keyword arguments (``LinearOptions.logit_scale`` / ``logit_softcap``).
transformers is not imported here: any model with that structure works.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _HeadTransform:
    """How a family's CausalLM transforms z = lm_head(hidden): z * config.<scale> (z / it with
    ``divide``), then config.<softcap> * tanh(z / config.<softcap>), each where the field is set."""

    scale: str | None = None
    divide: bool = False
    softcap: str | None = None


# model_type (of the text config) -> its logit transform, as the modeling files of transformers 5
# apply it after lm_head. Keyed by family, not by field: HyperCLOVAX multiplies by the same
# logits_scaling that Granite divides by.
_HEAD_TRANSFORMS = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), _HeadTransform(scale="logit_scale")),
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid"),
        _HeadTransform(scale="logits_scaling", divide=True),
    ),
    "hyperclovax": _HeadTransform(scale="logits_scaling"),
    "falcon_h1": _HeadTransform(scale="lm_head_multiplier"),
    **dict.fromkeys(
        ("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat"),
        _HeadTransform(softcap="final_logit_softcapping"),
    ),
    "recurrent_gemma": _HeadTransform(softcap="logits_soft_cap"),
}
# Config fields that transform the logits in some family: set in a family not listed above (or
# not the one its entry reads), they are refused rather than guessed at. A scale of 1 changes nothing.
_SCALE_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")


def _configs(model: torch.nn.Module) -> list:
    """The model's config and, for a multimodal one, its text config (where the head's fields live)."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text = get_text_config() if callable(get_text_config) else config
    return [text] + ([config] if config is not None and config is not text else [])


def head_options(model: torch.nn.Module) -> dict:
    """The logit transform of the model's head as the linear-head ops' keyword arguments:
    ``{"logit_scale": s, "logit_softcap": c or None}``, so that

        linear_token_logprobs(hidden, weight, labels, bias=bias, **head_options(model))

    on ``hidden_and_head(model, ...)`` gives the log-probs of ``model(...).logits``. Plain heads
    get the identity (scale 1, no cap); Cohere's logit_scale, Granite's 1 / logits_scaling, Gemma
    2/3's final_logit_softcapping (and the other families of ``_HEAD_TRANSFORMS``) are read from
    the config. Raises ValueError, naming the field, for a transform it does not know how the
    family applies, or a value that is not a finite number > 0.
    """
    text, *others = _configs(model)
    family = getattr(text, "model_type", None)
    known = _HEAD_TRANSFORMS.get(family, _HeadTransform())
    for config in (text, *others):
        for field in _SCALE_FIELDS + _SOFTCAP_FIELDS:
            if field in (known.scale, known.softcap):  # read below, from the text config
                continue
            value = getattr(config, field, None)
            if value is not None and not (field in _SCALE_FIELDS and value == 1):
                raise ValueError(
                    f"{type(model).__name__} (model_type={family!r}) has config.{field}={value!r}, a transform of its "
                    "logits after the head that rlhf_fast.hf does not know how this family applies, so the "
                    "linear-head ops would not reproduce model(...).logits; compute the logits with the model instead"
                )

    def read(field):
        value = getattr(text, field, None) if field is not None else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{type(model).__name__} has config.{field}={value!r}; expected a finite number > 0")
        return float(value)

    scale, softcap = read(known.scale), read(known.softcap)
    if scale is None:
        scale = 1.0
    elif known.divide:
        scale = 1.0 / scale
    return {"logit_scale": scale, "logit_softcap": softcap}


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module a causal LM feeds into its lm_head: ``get_decoder()``, else its base model."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        raise TypeError(
            f"cannot find the decoder of {type(model).__name__}: it has no get_decoder() and no base model "
            f"attribute (base_model_prefix={getattr(model, 'base_model_prefix', None)!r})"
        )
    return decoder


def _head_module(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's output embedding, checked: a plain Linear whose logit transform is known."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.get_output_embeddings() must be a torch.nn.Linear lm_head; got "
            f"{type(head).__name__}"
        )
    head_options(model)  # raises for a logit transform the ops cannot reproduce
    return head


def head_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output embedding, which must be a plain Linear.

    A family that transforms the head's output (``head_options``) is accepted only where that
    transform is known: its logits are ``head_options(model)`` applied to hidden @ weight.T + bias,
    so pass those options to the ops along with the weight.

    These are the parameters registered on the head now: on a model sharded with FSDP2, outside a
    forward, the rank's shards (DTensors); ``hidden_and_head`` returns the gathered ones.
    """
    head = _head_module(model)
    return head.weight, head.bias


def _loaded(module: str, name: str):
    """``module.name`` if that module has been imported, else None: no model is an FSDPModule and no
    tensor a DTensor before torch.distributed's FSDP / tensor packages are imported, so a single-device
    model pays no import for the check."""
    return getattr(sys.modules.get(module), name, None)


def _is_fsdp_module(model: torch.nn.Module) -> bool:
    FSDPModule = _loaded("torch.distributed.fsdp", "FSDPModule")
    return FSDPModule is not None and isinstance(model, FSDPModule)


def is_dtensor(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a torch.distributed DTensor (an FSDP2 shard, or a value made of shards)."""
    DTensor = _loaded("torch.distributed.tensor", "DTensor")
    return DTensor is not None and isinstance(tensor, DTensor)


def _as_root_forward(model: torch.nn.Module, run, **kwargs):
    """``run(**kwargs)`` called as ``model``'s forward: the hooks FSDP2 put on the root module (lazy
    init, inputs to the device, all-gather of the root's parameters, the pre-backward hook on the
    output) run around it, as they do around ``model(**kwargs)``, while the lm_head's [B, T, V]
    product is never computed.

    The instance attribute shadows the class's forward for the call only (nn.Module.__call__ looks
    ``self.forward`` up); one the model already had (accelerate puts one there) is put back."""
    had = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    model.forward = run
    try:
        with warnings.catch_warnings():
            # GPT-2's decoder returns its last hidden state as a .view(); FSDP2 warns that an in-place
            # op on a returned view would drop its pre-backward hook. The ops read hidden, never write it.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            return model(**kwargs)
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward


def _gathered_head(model: torch.nn.Module, head: torch.nn.Linear):
    """(weight, bias) of ``head`` as plain gathered parameters, after the root's forward.

    FSDP2 leaves the root's parameters (with ``shard_model``: embeddings, final norm, lm_head)
    gathered after the forward: the head is then already a plain parameter and nothing moves.
    Where its group reshards after forward (``reshard_after_forward=True``, its own group), the
    group that owns it is unsharded again here. Either way the tensors returned are FSDP2's own
    unsharded parameters: their gradients accumulate where FSDP2's post-backward (the root's
    final callback, after the whole backward, since the head's group ran no forward of its own
    on inputs that need a gradient) reduce-scatters them into the sharded parameters' ``.grad``,
    and then reshards them. No other copy of [V, H] is made."""
    weight = head.weight
    if is_dtensor(weight):
        owners = [m for m in model.modules() if _is_fsdp_module(m) and any(p is weight for p in m.parameters())]
        # The owner is the innermost one: fully_shard runs bottom-up and an outer call skips the
        # parameters an inner one holds. A tied weight grouped with fully_shard([embed, head])
        # has two owners sharing one state; either unshards it.
        inner = [m for m in owners if not any(o is not m and any(x is o for x in m.modules()) for o in owners)]
        if not inner:
            raise TypeError(f"{type(model).__name__}'s lm_head weight is a DTensor that no FSDP2 module of the model holds")
        inner[0].unshard()
        weight = head.weight
    return weight, head.bias


def hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **model_kwargs):
    """Run a causal LM up to its lm_head: (hidden [B, T, H], weight [V, H], bias [V] or None).

    ``reference.linear_logits(hidden, weight, bias, **head_options(model))`` equals
    ``model(input_ids, attention_mask=attention_mask).logits`` (plain heads: hidden @ weight.T +
    bias); the logits themselves are never computed: pass ``**head_options(model)`` to the ops. The parameters are returned as they are (a tied
    head returns the input embedding's weight), so gradients reach the model through them.
    Position t predicts token t + 1: pass ``hidden[:, :-1]`` with labels ``input_ids[:, 1:]``.
    ``model_kwargs`` go to the decoder (position_ids, ...); ``use_cache`` defaults to False.

    A model sharded with FSDP2 (``fully_shard`` applied to the causal LM itself, as the root:
    ``rlhf_fast.train.fsdp.shard_model``) runs its decoder as the root's forward, inside FSDP2's
    hooks, and the weight and bias returned are the gathered parameters FSDP2 holds (in its
    ``param_dtype`` under mixed precision), never a copy; the head's gradient is reduce-scattered
    into its shard with the rest of the root's at the end of the backward. FSDP2 keeps the root
    gathered from its forward to its backward, so several calls may precede one backward; a
    head whose group reshards after forward (``reshard_after_forward=True``) is gathered again
    here, and then the op and its backward must run before that group's next forward frees it.
    """
    head = _head_module(model)
    decoder = decoder_of(model)
    model_kwargs.setdefault("use_cache", False)

    def run_decoder(**kwargs):
        return decoder(**kwargs)[0]  # last_hidden_state, for a ModelOutput and for a return_dict=False tuple

    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    if _is_fsdp_module(model):
        hidden = _as_root_forward(model, run_decoder, **kwargs)
    elif is_dtensor(head.weight):
        raise TypeError(
            f"{type(model).__name__}'s lm_head weight is a DTensor but the model is not an FSDP2 module: apply "
            "fully_shard to the whole causal LM as the root (rlhf_fast.train.fsdp.shard_model), so that its "
            "forward hooks gather the head and its backward reduces the head's gradient"
        )
    else:
        return run_decoder(**kwargs), head.weight, head.bias
    weight, bias = _gathered_head(model, head)
    return hidden, weight, bias
