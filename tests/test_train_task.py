"""The built-in synthetic task: tokenizer, gold score, Bradley-Terry pairs and their ceiling."""

from __future__ import annotations

import json
import math
import random

import pytest
from transformers import AutoTokenizer

from rlhf_fast.train.task import GOOD_WORDS, TOPIC_WORDS, SyntheticTask, build_tokenizer, ceiling_accuracy, vocabulary

TASK = SyntheticTask()


def test_tokenizer_round_trips_through_a_directory(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "write 5 words about sea :"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded(text).input_ids[0] == loaded.bos_token_id  # BOS in front, no EOS
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len(loaded) == len(vocabulary())
    ids = tok("wave fish", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert loaded.decode(ids, skip_special_tokens=True) == "wave fish"
    assert loaded.chat_template == tok.chat_template


def test_every_generated_word_is_in_the_vocabulary():
    tok = build_tokenizer()
    records = TASK.sft_records(50, seed=1) + TASK.preference_records(50, seed=2)
    text = " ".join(v for r in records for k, v in r.items() if isinstance(v, str))
    assert tok.unk_token_id not in tok(text, add_special_tokens=False).input_ids


def test_gold_score():
    prompt = "write 4 words about sea :"
    a, w = TASK.topic_weight, TASK.length_weight
    assert sorted(GOOD_WORDS) == ["cow", "drum", "pan", "road", "snow", "star", "tree", "wave"]
    assert TASK.gold_score(prompt, "wave cow star drum") == a == TASK.best_score(prompt)
    assert TASK.gold_score(prompt, "wave fish boat salt") == a / 4  # on topic, but one favourite word
    assert TASK.gold_score(prompt, "wave tree") == a - w * 2
    assert TASK.gold_score(prompt, "wave moss moss moss moss <eos>") == a / 5 - w * 1  # special tokens ignored
    assert TASK.gold_score(prompt, "") == -w * 4
    with pytest.raises(ValueError, match="not a prompt"):
        TASK.gold_score("hello", "wave")


def test_best_response_is_n_on_topic_words():
    """No response of any length or mix beats n on-topic words."""
    prompt = "write 5 words about farm :"
    on, off = "cow", "the"
    scores = {(length, hits): TASK.gold_score(prompt, " ".join([on] * hits + [off] * (length - hits))) for length in range(1, 15) for hits in range(length + 1)}
    best = max(scores, key=scores.get)
    assert best == (5, 5) and scores[best] == TASK.best_score(prompt)


def test_records_are_deterministic_and_splits_differ():
    assert TASK.records("sft_train", 20, seed=3) == TASK.records("sft_train", 20, seed=3)
    assert TASK.records("pref_train", 20, seed=3) != TASK.records("pref_eval", 20, seed=3)


def test_demonstrations_stay_on_topic_and_are_mediocre():
    """SFT data is on topic but sits far below the best response: room for RL."""
    records = TASK.sft_records(2000, seed=0)
    words = [(TASK.parse_prompt(r["prompt"])[1], w) for r in records for w in r["response"].split()]
    on_topic = sum(w in TOPIC_WORDS[topic] for topic, w in words) / len(words)
    assert abs(on_topic - TASK.demo_on_topic) < 0.03
    mean_gold = sum(TASK.gold_score(r["prompt"], r["response"]) for r in records) / len(records)
    assert mean_gold < 0.25 * TASK.topic_weight


def test_bradley_terry_labels_match_the_ceiling():
    """Labels agree with the gold order at the rate the ceiling predicts (within 4 standard errors)."""
    records = TASK.preference_records(4000, seed=5)
    gold = [(r["gold_chosen"], r["gold_rejected"]) for r in records]
    ceiling = ceiling_accuracy(gold)
    agree = sum(1.0 if gc > gr else 0.5 if gc == gr else 0.0 for gc, gr in gold) / len(gold)
    stderr = math.sqrt(ceiling * (1 - ceiling) / len(gold))
    assert abs(agree - ceiling) < 4 * stderr
    assert 0.75 < ceiling < 0.95


def test_ceiling_accuracy_values():
    assert ceiling_accuracy([(1.0, 1.0)]) == 0.5
    assert ceiling_accuracy([(0.0, 2.0), (2.0, 0.0)]) == pytest.approx(1 / (1 + math.exp(-2)))


def test_write_produces_the_files_the_trainers_read(tmp_path):
    paths = TASK.write(tmp_path, seed=0, sft_train=4, sft_eval=2, pref_train=3, pref_eval=1)
    lines = [json.loads(x) for x in paths["pref_train"].read_text().splitlines()]
    assert lines == TASK.records("pref_train", 3, seed=0)
    assert (paths["tokenizer"] / "tokenizer.json").is_file()


def test_prompts_cover_the_task():
    prompts = TASK.prompts(500, seed=0)
    parsed = {TASK.parse_prompt(p) for p in prompts}
    assert {n for n, _ in parsed} == set(range(TASK.min_words, TASK.max_words + 1))
    assert {t for _, t in parsed} == set(TOPIC_WORDS)
    assert TASK.demonstration(prompts[0], random.Random(0))
