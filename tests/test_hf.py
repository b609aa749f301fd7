"""rlhf_fast.hf.hidden_and_head on tiny transformers causal LMs built from configs (no download)."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast.hf import hidden_and_head

from numerics import rel_err

transformers = pytest.importorskip("transformers")

VOCAB = 97
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)  # fmt: skip


def tiny_model(family: str) -> torch.nn.Module:
    configs = {
        "llama": lambda: transformers.LlamaConfig(**_COMMON),
        "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
        "mistral": lambda: transformers.MistralConfig(**_COMMON),
        # GPT-2 ties lm_head to the token embedding (wte).
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                                eos_token_id=1),  # fmt: skip
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]()).double()
    return model.eval()  # no dropout: the two paths must see the same network


def batch():
    input_ids = torch.randint(3, VOCAB, (2, 8))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    return input_ids, attention_mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_hidden_times_head_is_the_logits(family):
    model = tiny_model(family)
    input_ids, attention_mask = batch()
    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
    assert weight is model.get_output_embeddings().weight
    assert (weight is model.get_input_embeddings().weight) == (family == "gpt2")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert rel_err(rlhf_fast.reference.linear_logits(hidden, weight, bias), logits) < 1e-12


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_reach_the_model(family):
    """linear_sft_loss on the helper's outputs = the eager loss on model(...).logits, gradients of
    every parameter included (GPT-2: the tied embedding gets both the lookup's and the head's)."""
    model = tiny_model(family)
    input_ids, attention_mask = batch()
    labels = torch.where(attention_mask.bool(), input_ids, -100)[:, 1:]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
    fused = grads(rlhf_fast.linear_sft_loss(hidden[:, :-1], weight, labels, bias=bias, chunk_size=5))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    eager = grads(rlhf_fast.reference.sft_loss(logits[:, :-1], labels))
    assert fused.keys() == eager.keys()
    for name in eager:
        assert rel_err(fused[name], eager[name]) < 1e-10, name


class _Scaled(torch.nn.Module):
    """A stand-in for families that transform the logits after the head (Cohere's logit_scale)."""

    def __init__(self, head: torch.nn.Module, **config):
        super().__init__()
        self.model, self.head = torch.nn.Identity(), head
        self.config = type("Config", (), config)()

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return self.model


def test_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match=r"config.logit_scale=0.5"):
        hidden_and_head(_Scaled(torch.nn.Linear(4, 10), logit_scale=0.5), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="must be a torch.nn.Linear"):
        hidden_and_head(_Scaled(torch.nn.Embedding(10, 4)), torch.zeros(1, 3))
