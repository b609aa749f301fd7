"""Hugging Face causal LMs: the last hidden states and the lm_head, without the logits.

The linear-head ops (``linear_token_logprobs``, ``fused_linear_policy_loss``, ``linear_sft_loss``)
take what comes *before* the [B, T, V] logits. ``hidden_and_head`` runs a transformers causal LM's
decoder stack (``model.get_decoder()``: ``model.model`` for Llama / Qwen2 / Mistral,
``model.transformer`` for GPT-2) and returns its output with the head's parameters, so that
``hidden @ weight.T + bias`` is ``model(...).logits``. transformers is not imported here: any
model with that structure works.
"""

from __future__ import annotations

import torch

# Config fields of families whose logits are not hidden @ W.T + b: a scale or a soft cap applied
# after the head (Cohere's logit_scale, Granite's logits_scaling, Gemma 2's final softcapping).
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping")


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
    """(weight [V, H], bias [V] or None) of the model's output embedding, which must be a plain Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.get_output_embeddings() must be a torch.nn.Linear lm_head; got "
            f"{type(head).__name__}"
        )
    config = getattr(model, "config", None)
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            raise ValueError(
                f"{type(model).__name__} applies config.{field}={value} to its logits, so they are not "
                "hidden @ lm_head.weight.T + bias and the linear-head ops would not reproduce them"
            )
    return head.weight, head.bias


def hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **model_kwargs):
    """Run a causal LM up to its lm_head: (hidden [B, T, H], weight [V, H], bias [V] or None).

    ``hidden @ weight.T + bias`` equals ``model(input_ids, attention_mask=attention_mask).logits``;
    the logits themselves are never computed. The parameters are returned as they are (a tied
    head returns the input embedding's weight), so gradients reach the model through them.
    Position t predicts token t + 1: pass ``hidden[:, :-1]`` with labels ``input_ids[:, 1:]``.
    ``model_kwargs`` go to the decoder (position_ids, ...); ``use_cache`` defaults to False.
    """
    weight, bias = head_of(model)
    model_kwargs.setdefault("use_cache", False)
    outputs = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs[0]  # last_hidden_state, for a ModelOutput and for a return_dict=False tuple
    return hidden, weight, bias
