"""rlhf_fast.hf.hidden_and_head on tiny transformers causal LMs built from configs (no download)."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast.hf import head_of, head_options, hidden_and_head

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


def parameter_grads(model, loss) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of ``loss`` (the model's gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_reach_the_model(family):
    """linear_sft_loss on the helper's outputs = the eager loss on model(...).logits, gradients of
    every parameter included (GPT-2: the tied embedding gets both the lookup's and the head's)."""
    model = tiny_model(family)
    input_ids, attention_mask = batch()
    labels = torch.where(attention_mask.bool(), input_ids, -100)[:, 1:]

    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
    fused = parameter_grads(model, rlhf_fast.linear_sft_loss(hidden[:, :-1], weight, labels, bias=bias, chunk_size=5))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    eager = parameter_grads(model, rlhf_fast.reference.sft_loss(logits[:, :-1], labels))
    assert fused.keys() == eager.keys()
    for name in eager:
        assert rel_err(fused[name], eager[name]) < 1e-10, name


# Families whose head transforms its output, each made to matter: the head's weight scaled up so
# that the logits of the tiny model (~0.1 at init) spread over several units, the caps below that.
TRANSFORMED = {
    "gemma2": (lambda: transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=0.4),
               {"logit_scale": 1.0, "logit_softcap": 0.4}),
    "cohere": (lambda: transformers.CohereConfig(**_COMMON, logit_scale=0.3), {"logit_scale": 0.3, "logit_softcap": None}),
    "granite": (lambda: transformers.GraniteConfig(**_COMMON, logits_scaling=4.0),
                {"logit_scale": 0.25, "logit_softcap": None}),
}  # fmt: skip


def transformed_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TRANSFORMED[family][0]()).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model


def right_padded_batch():
    # Right padding: transformers' eager Gemma 2 attention returns NaN for every position of a
    # left-padded row (its own forward, before any head).
    input_ids = torch.randint(3, VOCAB, (2, 8))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plain_heads_have_no_transform(family):
    assert head_options(tiny_model(family)) == {"logit_scale": 1.0, "logit_softcap": None}


@pytest.mark.parametrize("family", TRANSFORMED)
def test_transformed_heads_match_the_model(family):
    """Gemma 2 (final_logit_softcapping), Cohere (logit_scale), Granite (1 / logits_scaling):
    log_softmax of model(...).logits = linear_token_logprobs on hidden_and_head with head_options,
    every backend that serves float64 here, and the transformed reference logits = the logits."""
    model = transformed_model(family)
    options = head_options(model)
    assert options == TRANSFORMED[family][1]
    input_ids, attention_mask = right_padded_batch()
    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert rel_err(rlhf_fast.reference.linear_logits(hidden, weight, bias, **options), logits) < 1e-12
    assert rel_err(rlhf_fast.reference.linear_logits(hidden, weight, bias), logits) > 1e-2, "the transform is a no-op here"
    labels = torch.where(attention_mask.bool(), input_ids, -100)[:, 1:]
    want = rlhf_fast.reference.token_logprobs(logits[:, :-1], labels)
    for backend in ("torch", "host"):
        logp = rlhf_fast.linear_token_logprobs(hidden[:, :-1], weight, labels, bias=bias, backend=backend, chunk_size=4,
                                               **options)  # fmt: skip
        assert rel_err(logp, want) < 1e-10, backend


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_transformed_gradients_reach_the_model(family):
    """linear_sft_loss with head_options = the eager loss on model(...).logits, every parameter's
    gradient (Gemma 2's tied embedding included)."""
    model = transformed_model(family)
    input_ids, attention_mask = right_padded_batch()
    labels = torch.where(attention_mask.bool(), input_ids, -100)[:, 1:]

    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask)
    fused = parameter_grads(model, rlhf_fast.linear_sft_loss(hidden[:, :-1], weight, labels, bias=bias, chunk_size=5,
                                            **head_options(model)))  # fmt: skip
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    eager = parameter_grads(model, rlhf_fast.reference.sft_loss(logits[:, :-1], labels))
    assert fused.keys() == eager.keys()
    for name in eager:
        assert rel_err(fused[name], eager[name]) < 1e-10, name


class _Config:
    def __init__(self, text=None, **fields):
        self.text = text
        self.__dict__.update(fields)

    def get_text_config(self):
        return self.text or self


class _Scaled(torch.nn.Module):
    """A stand-in for a causal LM with the given config fields (and model_type)."""

    def __init__(self, head: torch.nn.Module, config=None, **fields):
        super().__init__()
        self.model, self.head = torch.nn.Identity(), head
        self.config = config if config is not None else _Config(**fields)

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return self.model


def test_transform_is_read_by_family():
    """HyperCLOVAX multiplies by the logits_scaling Granite divides by; a multimodal model's head
    fields live in its text config."""
    linear = torch.nn.Linear(4, 10)
    assert head_options(_Scaled(linear, model_type="hyperclovax", logits_scaling=4))["logit_scale"] == 4.0
    assert head_options(_Scaled(linear, model_type="granite", logits_scaling=4))["logit_scale"] == 0.25
    assert head_options(_Scaled(linear, model_type="recurrent_gemma", logits_soft_cap=30.0))["logit_softcap"] == 30.0
    text = _Config(model_type="gemma3_text", final_logit_softcapping=30.0)
    model = _Scaled(linear, _Config(text, model_type="gemma3"))
    assert head_options(model) == {"logit_scale": 1.0, "logit_softcap": 30.0}
    assert head_of(model)[0] is linear.weight
    assert head_options(_Scaled(linear, model_type="gemma2", final_logit_softcapping=None))["logit_softcap"] is None


@pytest.mark.parametrize(
    "fields,pattern",
    [
        # Not a known family: a transform it does not know how that family applies.
        (dict(logit_scale=0.5), r"model_type=None\) has config.logit_scale=0.5"),
        (dict(model_type="mpt", logit_scale="inv_sqrt_d_model"), r"config.logit_scale='inv_sqrt_d_model'"),
        # A cap of 1 is a cap (a scale of 1 is nothing).
        (dict(model_type="llama", final_logit_softcapping=1.0), r"config.final_logit_softcapping=1.0"),
        (dict(model_type="muse_spark_text", output_multiplier=2.0, final_logit_softcapping=30.0),
         r"config.output_multiplier=2.0"),
        # A known family with another family's field, or with a value no op can take.
        (dict(model_type="cohere", logit_scale=0.5, final_logit_softcapping=30.0), r"config.final_logit_softcapping=30.0"),
        (dict(model_type="gemma2", final_logit_softcapping=0.0), r"config.final_logit_softcapping=0.0; expected a finite"),
        (dict(model_type="granite", logits_scaling=float("inf")), r"config.logits_scaling=inf; expected a finite"),
    ],
)  # fmt: skip
def test_refuses_what_it_cannot_reproduce(fields, pattern):
    model = _Scaled(torch.nn.Linear(4, 10), **fields)
    with pytest.raises(ValueError, match=pattern):
        head_options(model)
    with pytest.raises(ValueError, match=pattern):
        hidden_and_head(model, torch.zeros(1, 3))


def test_refuses_a_head_that_is_not_linear():
    assert head_options(_Scaled(torch.nn.Linear(4, 10), model_type="llama", logit_scale=1)) == {
        "logit_scale": 1.0, "logit_softcap": None,
    }  # fmt: skip
    with pytest.raises(TypeError, match="must be a torch.nn.Linear"):
        hidden_and_head(_Scaled(torch.nn.Embedding(10, 4)), torch.zeros(1, 3))
