"""The data loader's report of each file's quality: the share of unknown tokens (text the tokenizer does
not cover) and of truncated examples, with a warning above data.max_unknown_fraction."""

from __future__ import annotations

import warnings

import pytest

from rlhf_fast.train.config import DataConfig
from rlhf_fast.train.data import TruncationWarning, UnknownTokenWarning, build_preferences, build_sft, in_memory
from rlhf_fast.train.task import SyntheticTask, build_tokenizer

PROMPT = "write 3 words about sea :"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_own_text_through_the_demo_tokenizer_warns_with_the_share(tok):
    records = in_memory([{"prompt": PROMPT, "response": "wave fish boat"}, {"prompt": "tell me a story", "response": "once upon a time"}], "mine")
    with pytest.warns(UnknownTokenWarning, match=r"mine: 38\.1% of its 21 tokens are the tokenizer's unknown token .*first at <mine>:2") as caught:
        build_sft(records, tok, DataConfig(), "mine")
    assert "use the model's own tokenizer" in str(caught[0].message)
    pairs = in_memory([{"prompt": PROMPT, "chosen": "hello there", "rejected": "wave"}], "pairs")
    with pytest.warns(UnknownTokenWarning, match=r"pairs: .* of its \d+ tokens"):
        build_preferences(pairs, tok, DataConfig(), "pairs")


def test_covered_text_and_a_raised_threshold_do_not_warn(tok):
    records = in_memory(SyntheticTask().sft_records(64, seed=0), "task")
    few_unknown = in_memory([{"prompt": PROMPT, "response": "wave fish boat salt wave fish boat salt zebra"}], "one")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownTokenWarning)
        build_sft(records, tok, DataConfig(), "task")
        build_sft(few_unknown, tok, DataConfig(max_unknown_fraction=0.2), "one")  # 1 of 17 tokens


def test_truncation_warning_gives_the_share(tok):
    long = {"prompt": PROMPT + " " + " ".join(["the"] * 30), "response": "wave"}
    records = in_memory([long, {"prompt": PROMPT, "response": "wave"}, {"prompt": PROMPT, "response": "fish"}, {"prompt": PROMPT, "response": "boat"}], "t")
    with pytest.warns(TruncationWarning, match=r"t: 1 of 4 examples \(25\.0%\) are longer than data.max_length=16"):
        build_sft(records, tok, DataConfig(max_length=16), "t")


def test_max_unknown_fraction_is_validated():
    from rlhf_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="max_unknown_fraction"):
        DataConfig(max_unknown_fraction=1.5)
