"""Data layer of the trainers: JSONL validation, tokenization, truncation, batching, resumable order."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_fast.reference import IGNORE_INDEX
from rlhf_fast.train.config import DataConfig, TaskConfig
from rlhf_fast.train.data import (
    BatchStream,
    DataError,
    TruncationWarning,
    build_preferences,
    build_sft,
    collate_preferences,
    collate_sft,
    eval_batches,
    in_memory,
    load_records,
    read_jsonl,
)
from rlhf_fast.train.task import SyntheticTask, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


PROMPT = "write 3 words about sea :"


def test_sft_labels_cover_exactly_the_response_and_eos(tok):
    (ex,) = build_sft(in_memory([{"prompt": PROMPT, "response": "wave fish boat"}], "t"), tok, DataConfig(), "t")
    prompt_ids = tok(PROMPT).input_ids
    assert list(ex.ids) == prompt_ids + tok("wave fish boat", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.prompt_len == len(prompt_ids) and prompt_ids[0] == tok.bos_token_id
    batch = collate_sft([ex], pad_id=tok.pad_token_id)
    targets = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert targets == list(ex.ids[ex.prompt_len :])  # response + EOS, nothing of the prompt
    # position t predicts token t + 1
    t = ex.prompt_len - 1
    assert batch.labels[0, t] == ex.ids[t + 1] and batch.weight() == 4


def test_sft_batch_is_right_padded_and_masked(tok):
    records = in_memory([{"prompt": PROMPT, "response": "wave"}, {"prompt": PROMPT, "response": "wave fish boat salt tree"}], "t")
    short, long = build_sft(records, tok, DataConfig(), "t")
    batch = collate_sft([short, long], pad_id=tok.pad_token_id)
    assert batch.input_ids.shape == (2, len(long.ids))
    assert batch.attention_mask[0].sum() == len(short.ids) and batch.attention_mask[1].all()
    assert (batch.input_ids[0, len(short.ids) :] == tok.pad_token_id).all()
    assert (batch.labels[0, len(short.ids) - 1 :] == IGNORE_INDEX).all()


def test_chat_form_gives_the_same_tokens_as_the_plain_form(tok):
    plain = {"prompt": PROMPT, "response": "wave fish boat"}
    chat = {"messages": [{"role": "user", "content": PROMPT[:-2]}, {"role": "assistant", "content": "wave fish boat"}]}
    a, b = build_sft(in_memory([plain, chat], "t"), tok, DataConfig(), "t")
    assert a == b


def test_chat_form_needs_a_chat_template(tok, tmp_path):
    plain_tok = build_tokenizer()
    plain_tok.chat_template = None
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "wave"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages'.*no chat template"):
        build_sft(read_jsonl(path), plain_tok, DataConfig(), str(path))


def test_chat_form_must_end_with_the_assistant(tok):
    bad = {"messages": [{"role": "user", "content": "write 3 words about sea"}]}
    with pytest.raises(DataError, match=r"<t>:1: field 'messages' must end with a 'assistant' message"):
        build_sft(in_memory([bad], "t"), tok, DataConfig(), "t")


def test_missing_file_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.train_path=.*nope.jsonl.*no such file"):
        read_jsonl(tmp_path / "nope.jsonl", "data.train_path")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "", '{"prompt": "a", "response": '])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(path)


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['["prompt", "response"]'])
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": PROMPT}, r"d\.jsonl:2: missing field 'response'"),
        ({"prompt": PROMPT, "response": 3}, r"d\.jsonl:2: field 'response' must be a string, got int"),
        ({"prompt": PROMPT, "response": "  "}, r"d\.jsonl:2: field 'response' is empty"),
        ({"prompt": None, "response": "wave"}, r"d\.jsonl:2: field 'prompt' must be a string, got NoneType"),
    ],
)
def test_bad_sft_field_names_file_line_and_field(tok, tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "response": "wave"}, record])
    with pytest.raises(DataError, match=message):
        build_sft(read_jsonl(path), tok, DataConfig(), str(path))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": PROMPT, "chosen": "wave"}, r"p\.jsonl:1: missing field 'rejected'"),
        ({"prompt": PROMPT, "chosen": "wave", "rejected": ["x"]}, r"p\.jsonl:1: field 'rejected\[0\]' must be an object"),
        ({"chosen": "wave", "rejected": "tree", "gold_chosen": 1.0}, r"p\.jsonl:1: missing field 'gold_rejected'"),
        ({"chosen": "wave", "rejected": "tree", "gold_chosen": "1", "gold_rejected": 0}, r"p\.jsonl:1: field 'gold_chosen' must be a number"),
    ],
)
def test_bad_preference_field_names_file_line_and_field(tok, tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=message):
        build_preferences(read_jsonl(path), tok, DataConfig(), str(path))


def test_margin_is_required_when_asked(tok):
    with pytest.raises(DataError, match=r"<t>:1: missing field 'margin'"):
        build_preferences(in_memory([{"chosen": "wave", "rejected": "tree"}], "t"), tok, DataConfig(), "t", use_margin=True)
    (ex,) = build_preferences(in_memory([{"chosen": "wave", "rejected": "tree", "margin": 2}], "t"), tok, DataConfig(), "t", use_margin=True)
    assert ex.margin == 2.0


def test_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples"):
        read_jsonl(path)


def test_preference_forms_share_the_prompt_and_append_eos(tok):
    with_prompt = {"prompt": PROMPT, "chosen": "wave fish", "rejected": "tree"}
    full_text = {"chosen": PROMPT + " wave fish", "rejected": PROMPT + " tree"}
    a, b = build_preferences(in_memory([with_prompt, full_text], "t"), tok, DataConfig(), "t")
    assert a.chosen == b.chosen and a.rejected == b.rejected
    assert a.chosen[-1] == tok.eos_token_id and a.chosen[0] == tok.bos_token_id
    batch = collate_preferences([a, b], pad_id=tok.pad_token_id)
    assert batch.input_ids.shape[0] == 4 and batch.weight() == 2  # chosen x2 then rejected x2, one forward
    assert batch.input_ids[0].tolist()[: len(a.chosen)] == list(a.chosen)
    assert batch.input_ids[2].tolist()[: len(a.rejected)] == list(a.rejected)
    assert batch.gold is None and batch.margin is None


def test_gold_scores_travel_to_the_batch(tok):
    records = SyntheticTask().preference_records(3, seed=0)
    examples = build_preferences(in_memory(records, "t"), tok, DataConfig(), "t")
    batch = collate_preferences(examples, pad_id=tok.pad_token_id)
    expected = torch.tensor([[r["gold_chosen"], r["gold_rejected"]] for r in records])
    torch.testing.assert_close(batch.gold, expected)


LONG_PROMPT = "write 3 words about sea : " + " ".join(["the"] * 30)


def test_overlong_prompt_is_truncated_from_the_left_with_a_warning(tok):
    cfg = DataConfig(max_length=16, max_prompt_length=6)
    records = in_memory([{"prompt": LONG_PROMPT, "response": "wave fish"}, {"prompt": PROMPT, "response": "wave"}], "t")
    with pytest.warns(TruncationWarning, match=r"1 of 2 examples .*max_length=16 .*truncated.*first at <t>:1"):
        long, short = build_sft(records, tok, cfg, "t")
    assert len(long.ids) <= 16
    assert long.ids[0] == tok.bos_token_id  # BOS survives the left cut
    response = tok("wave fish", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert list(long.ids[long.prompt_len :]) == response  # the response fits whole: the prompt gave way
    assert long.ids[1 : long.prompt_len] == tuple(tok(LONG_PROMPT).input_ids[-(long.prompt_len - 1) :])
    assert short.ids == tuple(tok(PROMPT).input_ids + tok("wave", add_special_tokens=False).input_ids + [tok.eos_token_id])


def test_overlong_response_is_cut_on_the_right_keeping_max_prompt_length(tok):
    cfg = DataConfig(max_length=12, max_prompt_length=8)
    response = " ".join(["wave"] * 20)
    with pytest.warns(TruncationWarning):
        (ex,) = build_sft(in_memory([{"prompt": PROMPT, "response": response}], "t"), tok, cfg, "t")
    assert len(ex.ids) == 12 and ex.prompt_len == 7  # the whole 7-token prompt fits in its budget of 8
    assert ex.ids[-1] != tok.eos_token_id


def test_overlong_can_be_skipped_or_rejected(tok):
    records = in_memory([{"prompt": LONG_PROMPT, "response": "wave"}, {"prompt": PROMPT, "response": "wave"}], "t")
    with pytest.warns(TruncationWarning, match="skipped"):
        assert len(build_sft(records, tok, DataConfig(max_length=16, truncation="skip"), "t")) == 1
    with pytest.raises(DataError, match=r"<t>:1: prompt \+ response is \d+ tokens, more than data.max_length=16"):
        build_sft(records, tok, DataConfig(max_length=16, truncation="error"), "t")
    with pytest.warns(TruncationWarning), pytest.raises(DataError, match="no examples left"):
        build_sft(records[:1], tok, DataConfig(max_length=16, truncation="skip"), "t")


def test_preference_pair_keeps_one_prompt(tok):
    cfg = DataConfig(max_length=14, max_prompt_length=6)
    record = {"prompt": LONG_PROMPT, "chosen": "wave fish", "rejected": "tree tree tree tree"}
    with pytest.warns(TruncationWarning):
        (ex,) = build_preferences(in_memory([record], "t"), tok, cfg, "t")
    assert len(ex.chosen) <= 14 and len(ex.rejected) <= 14
    common = min(len(ex.chosen), len(ex.rejected)) - 3
    assert ex.chosen[:common] == ex.rejected[:common]


def test_holdout_split_and_builtin_sources(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": str(i)} for i in range(20)])
    (train, _), (held, held_name) = load_records(DataConfig(train_path=str(path), eval_fraction=0.1), SyntheticTask(), TaskConfig(), "sft")
    assert len(train) == 18 and [r["response"] for _, r in held] == ["18", "19"] and "last 2 lines" in held_name
    task_cfg = TaskConfig(sft_train=5, sft_eval=3, pref_train=4, pref_eval=2)
    (train, _), (held, _) = load_records(DataConfig(), SyntheticTask(), task_cfg, "pref")
    assert len(train) == 4 and len(held) == 2 and "chosen" in train[0][1]


def _stream(n=10, batch_size=3, **kw):
    return BatchStream(list(range(n)), batch_size, list, seed=7, **kw)


def test_batch_stream_is_a_deterministic_resumable_permutation():
    a = _stream()
    first_epoch = [a.next() for _ in range(3)]  # 9 of 10; the remainder of 1 is dropped
    flat = [i for b in first_epoch for i in b]
    assert len(set(flat)) == 9
    assert a.next() != first_epoch[0] or a.epoch == 1
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = _stream()
    b.load_state_dict(state)
    assert [b.next() for _ in range(5)] == expected


def test_batch_stream_shards_the_global_batch_across_ranks():
    single = _stream(n=12, batch_size=4)
    ranks = [_stream(n=12, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        assert single.next() == ranks[0].next() + ranks[1].next()


def test_batch_stream_refuses_a_dataset_smaller_than_a_batch_and_a_changed_dataset():
    with pytest.raises(DataError, match=r"2 training examples are fewer than one micro-batch of train.batch_size=3"):
        _stream(n=2)
    with pytest.raises(ValueError, match="cannot resume the data position"):
        _stream(n=11).load_state_dict(_stream(n=10).state_dict())


def test_eval_batches_cover_every_example_once_across_ranks():
    seen = [x for r in range(3) for batch in eval_batches(list(range(10)), 2, list, r, 3) for x in batch]
    assert sorted(seen) == list(range(10))


def test_collate_tensors_are_long(tok):
    (ex,) = build_sft(in_memory([{"prompt": PROMPT, "response": "wave"}], "t"), tok, DataConfig(), "t")
    batch = collate_sft([ex], pad_id=0)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long
