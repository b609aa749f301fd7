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


def head_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the model's output embedding, which must be a plain Linear.

    A family that transforms the head's output (``head_options``) is accepted only where that
    transform is known: its logits are ``head_options(model)`` applied to hidden @ weight.T + bias,
    so pass those options to the ops along with the weight.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.get_output_embeddings() must be a torch.nn.Linear lm_head; got "
            f"{type(head).__name__}"
        )
    head_options(model)  # raises for a logit transform the ops cannot reproduce
    return head.weight, head.bias


def hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **model_kwargs):
    """Run a causal LM up to its lm_head: (hidden [B, T, H], weight [V, H], bias [V] or None).

    ``reference.linear_logits(hidden, weight, bias, **head_options(model))`` equals
    ``model(input_ids, attention_mask=attention_mask).logits`` (plain heads: hidden @ weight.T +
    bias); the logits themselves are never computed: pass ``**head_options(model)`` to the ops. The parameters are returned as they are (a tied
    head returns the input embedding's weight), so gradients reach the model through them.
    Position t predicts token t + 1: pass ``hidden[:, :-1]`` with labels ``input_ids[:, 1:]``.
    ``model_kwargs`` go to the decoder (position_ids, ...); ``use_cache`` defaults to False.
    """
    weight, bias = head_of(model)
    model_kwargs.setdefault("use_cache", False)
    outputs = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs[0]  # last_hidden_state, for a ModelOutput and for a return_dict=False tuple
    return hidden, weight, bias
