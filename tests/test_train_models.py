"""Policies, tokenizers and the reward model: local loading only, vocabulary checks, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig

from rlhf_fast.train.config import ConfigError, ModelConfig, TokenizerConfig
from rlhf_fast.train.models import arch_config, check_vocab, load_policy, load_tokenizer
from rlhf_fast.train.rm import load_reward_model
from rlhf_fast.train.reward_model import RewardModel, last_token_index
from rlhf_fast.train.task import build_tokenizer

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_built_policy_matches_the_tokenizer_and_reloads_from_a_directory(tok, tmp_path, arch):
    lm = load_policy(ModelConfig(arch=arch, **TINY), tok)
    assert lm.get_input_embeddings().num_embeddings == len(tok)
    assert lm.config.hidden_size == 32 and lm.config.eos_token_id == tok.eos_token_id
    lm.save_pretrained(tmp_path)
    again = load_policy(ModelConfig(path=str(tmp_path)), tok)
    assert type(again) is type(lm)
    for (name, a), b in zip(lm.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_config_only_directory_gives_a_random_init(tok, tmp_path):
    arch_config(ModelConfig(**TINY), tok).save_pretrained(tmp_path)
    lm = load_policy(ModelConfig(path=str(tmp_path)), tok)
    assert lm.config.num_hidden_layers == 1


def test_missing_model_directory_names_the_option(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.path='.*nowhere' is not a directory \(nothing is downloaded"):
        load_policy(ModelConfig(path=str(tmp_path / "nowhere")), tok)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.path="):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "nowhere")), ModelConfig())


def test_tokenizer_comes_from_the_model_directory_by_default(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(TokenizerConfig(), ModelConfig(path=str(tmp_path)))
    assert loaded("write 3 words about sea :").input_ids == tok("write 3 words about sea :").input_ids


def test_vocab_mismatch_is_an_error_at_load_time(tok, tmp_path):
    small = LlamaConfig(vocab_size=len(tok) - 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    small.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=rf"vocabulary mismatch: the tokenizer produces ids up to {len(tok) - 1}.*embedding of {len(tok) - 5} rows"):
        load_policy(ModelConfig(path=str(tmp_path)), tok)
    with pytest.raises(ConfigError, match="reward model backbone has an embedding"):
        load_reward_model(ModelConfig(path=str(tmp_path)), tok)
    check_vocab(tok, len(tok) + 64)  # padded embedding rows are fine


def test_last_token_index_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_score_ignores_padding_side(tok, arch):
    rm = load_reward_model(ModelConfig(arch=arch, **TINY), tok).eval()
    ids = tok("write 3 words about sea : wave fish").input_ids + [tok.eos_token_id]
    n, pad = len(ids), tok.pad_token_id
    right = torch.tensor([ids + [pad] * 3])
    left = torch.tensor([[pad] * 3 + ids])
    right_mask = (torch.arange(n + 3) < n).long()[None]
    left_mask = right_mask.flip(-1)
    with torch.no_grad():
        a, b = rm.score(right, right_mask), rm.score(left, left_mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.dtype == torch.float32 and a.shape == (1,)


def test_reward_model_saves_and_loads_without_the_training_code(tok, tmp_path):
    rm = load_reward_model(ModelConfig(**TINY), tok).eval()
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    assert sorted(p.name for p in (tmp_path / "rm").iterdir() if p.suffix in (".json", ".safetensors"))[:2] == ["model.safetensors", "reward_model.json"]
    ids = torch.tensor([[1, 4, 5, 6, 2, 0], [1, 4, 7, 2, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = rm.score(ids, mask)
        assert torch.equal(RewardModel.from_pretrained(tmp_path / "rm").score(ids, mask), expected)

        # The recipe of the reward_model module docstring: transformers + safetensors only.
        d = tmp_path / "rm"
        cfg = json.loads((d / "reward_model.json").read_text())
        backbone = AutoModel.from_config(AutoConfig.for_model(**cfg["backbone"])).eval()
        weights = load_file(str(d / "model.safetensors"))
        backbone.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("backbone.")})
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        last = (mask * torch.arange(mask.shape[1])).argmax(-1)
        score = hidden[torch.arange(len(ids)), last] @ weights["head.weight"][0] + weights["head.bias"][0]
    torch.testing.assert_close(score, expected)
    # the directory also carries the tokenizer, and continues as an RM (not as a causal LM)
    assert load_tokenizer(TokenizerConfig(), ModelConfig(path=str(d)))("write").input_ids == tok("write").input_ids
    assert isinstance(load_reward_model(ModelConfig(path=str(d)), tok), RewardModel)
    with pytest.raises(ConfigError, match="is a reward model, not a causal LM"):
        load_policy(ModelConfig(path=str(d)), tok)


def test_reward_model_from_a_causal_lm_keeps_its_body(tok, tmp_path):
    lm = load_policy(ModelConfig(**TINY), tok)
    lm.save_pretrained(tmp_path)
    rm = load_reward_model(ModelConfig(path=str(tmp_path)), tok)
    body = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).base_model
    for (name, a), b in zip(rm.backbone.state_dict().items(), body.state_dict().values()):
        assert torch.equal(a, b), name
