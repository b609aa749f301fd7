"""The RL trainer's Python API contracts: chat-message prompts, held-out scoring of the configured
reward, advantage_fn's result checked before the update, and no transformers bars in API runs."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_fast.train.data import DataError
from rlhf_fast.train.models import load_policy
from rlhf_fast.train.quiet import quiet_transformers
from rlhf_fast.train.rl.trainer import RLTrainer
from rlhf_fast.train.run import save_policy

from numerics import tiny

CHATS = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"count to {n}"}] for n in range(8)]


def rendered(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tokenizer.bos_token)  # the rollout's encoding adds the BOS itself


def test_chat_message_prompts_from_the_api_and_from_jsonl(tmp_path):
    trainer = RLTrainer(tiny(tmp_path / "api", **{"reward.gold": False}), reward_fn=lambda p, r: [1.0] * len(r),
                        prompts=CHATS, eval_prompts=CHATS[:2] + ["a plain prompt"])  # fmt: skip
    tok = trainer.tokenizer
    assert trainer.train_prompts == [rendered(tok, m) for m in CHATS]
    assert trainer.eval_prompts[-1] == "a plain prompt"
    ids = tok(trainer.train_prompts[0], add_special_tokens=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    cfg = tiny(tmp_path / "file", **{"reward.gold": False, "data.train_path": str(path)})
    assert RLTrainer(cfg, reward_fn=lambda p, r: [1.0] * len(r)).train_prompts == trainer.train_prompts

    path.write_text(json.dumps({"messages": [*CHATS[0], {"role": "assistant", "content": "1"}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:1: field 'messages' of a prompt must not end with an 'assistant'"):
        RLTrainer(cfg, reward_fn=lambda p, r: [1.0] * len(r))
    with pytest.raises(DataError, match=r"prompts\[1\] must be a string or a list of chat messages, got int"):
        RLTrainer(tiny(tmp_path / "bad"), prompts=["ok", 3] * 8)


def test_held_out_evaluation_scores_the_configured_reward(tmp_path):
    def length_reward(prompts, responses):
        return [float(len(r)) for r in responses]

    cfg = tiny(tmp_path, **{"reward.gold": False, "reward.fn_coef": 0.5})
    metrics = RLTrainer(cfg, reward_fn=length_reward).evaluate()
    assert {"score", "score_se", "fn_score", "fn_score_se", "kl", "length"} <= set(metrics)
    assert "rm_score" not in metrics
    assert metrics["fn_score"] > 0 and metrics["score"] == pytest.approx(0.5 * metrics["fn_score"])


def test_ppo_advantage_fn_must_return_value_targets(tmp_path):
    def no_returns(trainer, exp):
        return torch.randn(exp.mask.shape), None

    trainer = RLTrainer(tiny(tmp_path, **{"algo.name": "ppo", "train.steps": 1}), advantage_fn=no_returns)
    with pytest.raises(ValueError, match=r"returns=None; the critic \(PPO\) needs value targets of shape \[B, R\]"):
        trainer.train_step()
    trainer.advantage_fn = lambda trainer, exp: (torch.randn(3), None)
    with pytest.raises(ValueError, match=r"advantages of shape \(3,\); expected \[B\] = \(8,\)"):
        trainer.train_step()


def test_api_loads_and_saves_without_transformers_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()  # an in-process CLI test may have turned bars off
    hf_logging.enable_progress_bar()
    trainer = RLTrainer(tiny(tmp_path))
    capfd.readouterr()
    save_policy(trainer.policy, trainer.tokenizer, tmp_path / "model")
    from rlhf_fast.train.config import ModelConfig

    load_policy(ModelConfig(path=str(tmp_path / "model")), trainer.tokenizer)
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out and "Writing model shards" not in err + out
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is restored after
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    if not was_enabled:
        hf_logging.disable_progress_bar()
