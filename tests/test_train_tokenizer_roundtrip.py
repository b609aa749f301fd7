"""A saved model directory reloads with exactly the tokenizer it was trained with (class, vocabulary,
special tokens, chat template, encodings), whatever the architecture's own tokenizer class; and a
tokenizer that does not fit a model is refused naming both sizes and the fix."""

from __future__ import annotations

import pytest

from rlhf_fast.train.config import ConfigError, ModelConfig, TokenizerConfig
from rlhf_fast.train.models import check_vocab, load_policy, load_tokenizer, tokenizer_vocab_size
from rlhf_fast.train.run import save_policy
from rlhf_fast.train.task import build_tokenizer

TEXT = "write 3 words about sea : wave fish zebra"
SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_saved_model_reloads_its_own_tokenizer(tmp_path, arch):
    tok = build_tokenizer()
    policy = load_policy(ModelConfig(arch=arch, **SIZES), tok)
    save_policy(policy, tok, tmp_path / "model")

    back = load_tokenizer(TokenizerConfig(), ModelConfig(path=str(tmp_path / "model")))
    assert type(back) is type(tok), f"{arch}: reloaded as {type(back).__name__}, trained with {type(tok).__name__}"
    assert back.get_vocab() == tok.get_vocab() and len(back) == len(tok) == tokenizer_vocab_size(back)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(back, name) == getattr(tok, name), name
    assert back.chat_template == tok.chat_template
    assert back(TEXT).input_ids == tok(TEXT).input_ids
    load_policy(ModelConfig(path=str(tmp_path / "model")), back)  # and the pair is accepted


def test_mismatch_names_both_sizes_and_the_fix():
    tok = build_tokenizer()
    with pytest.raises(ConfigError) as info:
        check_vocab(tok, len(tok) - 5, where="policy")
    message = str(info.value)
    assert f"{len(tok)} ids against {len(tok) - 5}" in message
    assert "Pass tokenizer.path= the tokenizer the policy was trained with" in message
