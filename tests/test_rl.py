"""RL stage: each named step against the reference ops, replaceable steps, end to end, resume, bad inputs."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.train.config import ConfigError
from rlhf_fast.train.metrics import read_metrics
from rlhf_fast.train.rl.trainer import RLTrainer, task_gold
from rlhf_fast.train.rl.rollout import generate, response_mask_of, sequence_logprobs
from rlhf_fast.train.rl.steps import ADVANTAGE_ESTIMATORS, gae_advantage, loss_step, make_experience, score_step

from numerics import ALGOS, tiny

@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return RLTrainer(tiny(tmp_path_factory.mktemp("rl")))


def test_response_mask_stops_after_the_first_eos():
    responses = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert response_mask_of(responses, 2).tolist() == [
        [True, True, False, False], [True, True, True, True], [True, False, False, False]
    ]  # fmt: skip


def test_recomputed_logprobs_match_the_sampler_and_the_reference(trainer):
    rollout = generate(trainer.policy, trainer.tokenizer, trainer.train_prompts[:8], trainer.config.rollout)
    mask = rollout.response_mask
    assert mask[:, 0].all() and rollout.input_ids.shape[1] == rollout.prompt_len + mask.shape[1]
    with torch.no_grad():
        fused = sequence_logprobs(trainer.policy, rollout)
        logits = trainer.policy(rollout.input_ids, attention_mask=rollout.attention_mask,
                                position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
        ref = reference.token_logprobs(logits[:, rollout.prompt_len - 1 : -1].double(), rollout.labels)
    torch.testing.assert_close(torch.where(mask, fused, 0.0), torch.where(mask, ref.float(), 0.0), atol=1e-5, rtol=0)
    # generate (KV cache, incremental positions) and the one-pass recomputation agree to float noise
    assert float(torch.where(mask, (fused - rollout.sample_logp).abs(), 0.0).max()) < 1e-4


def test_ppo_advantages_step_is_the_reference_pipeline(trainer):
    torch.manual_seed(0)
    rollout = generate(trainer.policy, trainer.tokenizer, trainer.train_prompts[:8], trainer.config.rollout)
    scores, _ = score_step(trainer, rollout)
    exp, stats = make_experience(trainer, rollout, scores)
    adv, returns = gae_advantage(trainer, exp)
    mask = exp.mask
    rewards = reference.kl_penalized_rewards(exp.old_logp, exp.ref_logp, scores, mask, beta=trainer.kl_ctl.value)
    ref_adv, ref_ret = reference.gae(rewards, exp.values, mask, gamma=1.0, lam=trainer.config.algo.lam)
    ref_adv = reference.whiten(ref_adv, mask)
    torch.testing.assert_close(torch.where(mask, adv, 0.0), torch.where(mask, ref_adv, 0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.where(mask, returns, 0.0), torch.where(mask, ref_ret, 0.0), atol=1e-5, rtol=1e-5)
    assert torch.allclose(scores, torch.tensor(task_gold(rollout.prompts, rollout.responses)))
    assert abs(float(stats["kl"])) < 1e-5  # the policy is still the reference


@pytest.mark.parametrize("name, overrides", [
    ("grpo", {"algo.name": "reinforce", "rollout.group_size": 2}),
    ("drgrpo", {"algo.name": "grpo", "rollout.group_size": 2}),
    ("rloo", {"algo.name": "grpo", "rollout.group_size": 2}),
    ("reinforce", {"algo.name": "grpo", "rollout.group_size": 2, "algo.baseline": "mean"}),
])  # fmt: skip
def test_advantage_estimator_is_chosen_apart_from_the_algorithm(tmp_path, name, overrides):
    """algo.advantage picks a table entry whatever the algorithm; each [B] entry is the reference's
    group baseline (or mean baseline) of the scores, with the KL in the reward when it is there."""
    trainer = RLTrainer(tiny(tmp_path, **overrides, **{"algo.advantage": name, "algo.kl_place": "reward"}))
    assert trainer.advantage_fn is ADVANTAGE_ESTIMATORS[name]
    rollout = generate(trainer.policy, trainer.tokenizer, trainer.train_prompts[:4], trainer.config.rollout)
    scores, _ = score_step(trainer, rollout)
    exp, _ = make_experience(trainer, rollout, scores + torch.randn_like(scores))
    adv, returns = trainer.advantage_fn(trainer, exp)
    beta = trainer.kl_ctl.value
    kl = torch.where(exp.mask, reference.kl_penalty(exp.old_logp, exp.ref_logp, estimator="k1"), 0.0).sum(-1)
    seq_returns = exp.scores.double() - beta * kl.double()
    want = (seq_returns - seq_returns.mean() if name == "reinforce"
            else reference.group_advantages(seq_returns, 2, mode=name))  # fmt: skip
    assert returns is None and torch.allclose(adv.double(), want, atol=1e-5)


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline", "grpo_passk", "opo", "gpg",
                                  "remax"])
def test_verl_estimators_are_the_reference_formulas(tmp_path, name):
    """The estimators verl registers beside GRPO/RLOO, each against its formula on the reference ops."""
    overrides = {"algo.name": "grpo", "rollout.group_size": 2, "algo.advantage": name, "algo.kl_place": "reward",
                 "algo.kl_clamp": 0.5, "algo.whiten_unbiased": False}  # fmt: skip
    trainer = RLTrainer(tiny(tmp_path, **overrides))
    rollout = generate(trainer.policy, trainer.tokenizer, trainer.train_prompts[:4], trainer.config.rollout)
    scores, _ = score_step(trainer, rollout)
    scores = scores + torch.randn_like(scores)
    scores[0] = 0.0  # gpg counts the nonzero scores
    exp, _ = make_experience(trainer, rollout, scores)
    exp.ref_logp = exp.ref_logp + 0.3 * torch.randn_like(exp.ref_logp)  # a KL that the 0.5 clamp bites
    adv, _ = trainer.advantage_fn(trainer, exp)
    beta, mask = trainer.kl_ctl.value, exp.mask
    old, ref, s = exp.old_logp.double(), exp.ref_logp.double(), exp.scores.double()
    kl = reference.kl_penalty(old, ref, estimator="k1").clamp(-0.5, 0.5)
    seq_returns = s - beta * torch.where(mask, kl, 0.0).sum(-1)
    index = torch.arange(len(s)) // 2
    if name == "reinforce_plus_plus":
        rewards = torch.where(mask, -beta * kl, 0.0)
        rewards[torch.arange(len(s)), reference.last_valid_index(mask)] += s
        _, returns = reference.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
        want = reference.whiten(returns, mask, unbiased=False)
    elif name == "reinforce_plus_plus_baseline":
        centred = reference.group_advantages(seq_returns, 2, mode="drgrpo")
        want = reference.whiten(centred[:, None].expand(mask.shape), mask, unbiased=False)
    elif name == "remax":
        rewards = torch.where(mask, -beta * kl, 0.0)
        rewards[torch.arange(len(s)), reference.last_valid_index(mask)] += s
        greedy = generate(trainer.policy, trainer.tokenizer, rollout.prompts[::2], trainer.config.rollout, greedy=True)
        baseline = score_step(trainer, greedy)[0].double().repeat_interleave(2)
        want = rewards.flip(-1).cumsum(-1).flip(-1) - baseline[:, None]  # verl compute_remax_outcome_advantage
    elif name == "gpg":
        want = reference.group_advantages(seq_returns, 2, mode="drgrpo") * len(s) / torch.count_nonzero(seq_returns)
    else:
        lengths = mask.sum(-1) if name == "opo" else None
        want = reference.indexed_group_advantages(seq_returns, index, mode=name.removeprefix("grpo_"), lengths=lengths)
    if want.dim() == 2:
        adv, want = torch.where(mask, adv, 0.0), torch.where(mask, want, 0.0)
    torch.testing.assert_close(adv.double(), want, atol=1e-5, rtol=1e-5)


def test_advantage_estimators_cover_the_vocabulary_and_refuse_what_cannot_run(tmp_path):
    from rlhf_fast.choices import ADVANTAGE_ESTIMATORS as NAMES

    assert set(ADVANTAGE_ESTIMATORS) == set(NAMES)
    for overrides, message in [
        ({"algo.name": "ppo", "algo.advantage": "grpo"}, "algo.name=ppo trains its critic on the returns of algo.advantage=gae"),
        ({"algo.name": "grpo", "rollout.group_size": 2, "algo.advantage": "gae"}, "algo.advantage=gae needs the critic"),
        ({"algo.name": "reinforce", "algo.advantage": "rloo"}, "algo.advantage=rloo needs rollout.group_size >= 2"),
        ({"algo.advantage": "vtrace"}, "algo.advantage"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny(tmp_path, **overrides)


def test_loss_step_gradient_is_minus_advantage_times_grad_logp_at_ratio_one(trainer):
    rollout = generate(trainer.policy, trainer.tokenizer, trainer.train_prompts[:4], trainer.config.rollout)
    scores, _ = score_step(trainer, rollout)
    exp, _ = make_experience(trainer, rollout, scores)
    exp.advantages = torch.randn(len(exp))
    exp.returns = torch.zeros_like(exp.old_logp)
    critic, trainer.critic = trainer.critic, None
    try:
        trainer.policy.zero_grad()
        n = exp.mask.sum().float()
        loss, stats = loss_step(trainer, exp, n)
        loss.backward()
        fused = [p.grad.clone() for p in trainer.policy.parameters()]
        trainer.policy.zero_grad()
        logp = sequence_logprobs(trainer.policy, rollout)
        expected = -(torch.where(exp.mask, exp.advantages[:, None] * logp, 0.0)).sum() / n
        expected.backward()
        for a, b in zip(fused, (p.grad for p in trainer.policy.parameters())):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert float(stats["clipfrac"]) == 0.0
    finally:
        trainer.critic = critic
        trainer.policy.zero_grad()


def test_optimizer_groups_and_clipping_are_the_shared_loops(trainer):
    """loop.build_optimizer's two groups (decay on matrices, none on vectors) over policy and critic;
    loop.clip_gradients applied to each model apart, so each ends at the clip norm."""
    groups = trainer.optimizer.param_groups
    params = trainer.trainable_parameters()
    assert [g["weight_decay"] for g in groups] == [trainer.config.optim.weight_decay, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in params if p.dim() >= 2]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in params if p.dim() < 2]
    max_norm = trainer.config.optim.grad_clip
    try:
        for model, size in ((trainer.policy, 3.0), (trainer.critic, 50.0)):
            for p in model.parameters():
                p.grad = torch.full_like(p, size)
        norm = trainer.clip_gradients()
        expected = torch.linalg.vector_norm(torch.stack([torch.full_like(p, 3.0).norm() for p in trainer.policy.parameters()]))
        assert norm == pytest.approx(float(expected))
        for model in (trainer.policy, trainer.critic):
            clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            assert float(clipped) == pytest.approx(max_norm, rel=1e-5)
    finally:
        trainer.policy.zero_grad(set_to_none=True)
        trainer.critic.zero_grad(set_to_none=True)


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_each_algorithm_runs_end_to_end(tmp_path, algo):
    trainer = RLTrainer(tiny(tmp_path, **ALGOS[algo]))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.train()
    assert {"gold", "gold_se", "kl", "length"} <= set(metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    needed = {"score", "gold", "kl", "entropy", "clipfrac", "approx_kl", "logp_mismatch", "response_length",
              "tokens_per_s", "rollout_s", "update_s", "backend_token_logprobs"}  # fmt: skip
    assert needed <= set(records[0])
    if algo == "ppo":
        assert {"value_loss", "explained_variance"} <= set(records[0])
    assert records[0]["logp_mismatch"] < 1e-4
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "metrics.png").is_file()
    assert (tmp_path / "summary.json").is_file()


@pytest.mark.parametrize("objective, correction", [("gspo", "sequence_mask"), ("gspo_token", None), ("cispo", "token_truncate"),
                                                   ("ppo", "sequence_masked_weight")])
def test_objectives_and_rollout_correction_train_through_the_config_and_the_demo_cli(tmp_path, objective, correction):
    """algo.objective and rollout_correction.mode reach the loss: the step's options carry them, a
    GRPO run with them trains (the sampler's log-probs as rollout_logp), and the demo command takes
    --algo.objective."""
    from rlhf_fast.__main__ import build_parser
    from rlhf_fast.train.rl.steps import policy_loss_options

    overrides = {"algo.objective": objective, "algo.agg": "seq-mean-token-mean", "rollout_correction.mode": correction}
    trainer = RLTrainer(tiny(tmp_path, **ALGOS["grpo"], **overrides))
    options = policy_loss_options(trainer)
    assert options.objective == objective and options.rollout_is == (correction and correction.split("_")[0])
    assert correction is None or options.rollout_is_mode == correction.split("_", 1)[1]
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    record = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"][-1]
    assert 0 <= record["clipfrac"] <= 1
    if correction is not None:  # generate and the recomputation agree to float noise: w ~ 1
        assert abs(record["rollout_is_weight_mean"] - 1) < 1e-3 and record["rollout_log_ratio_abs_max"] < 1e-3
    assert build_parser().parse_args(["demo", "--algo", "grpo", "--algo.objective", objective]).objective == objective
    with pytest.raises(ConfigError, match="algo.objective"):
        tiny(tmp_path / "bad", **{"algo.objective": "nope"})
    with pytest.raises(ConfigError, match="rollout_correction.mode"):
        tiny(tmp_path / "bad", **{"rollout_correction.mode": "token"})


def test_peer_parity_options_train_through_the_config(tmp_path):
    """The KL, aggregation and entropy-mask options of the peers reach the loss and a run trains."""
    from rlhf_fast.train.rl.steps import policy_loss_options

    overrides = {**ALGOS["grpo"], "algo.advantage": "reinforce_plus_plus_baseline", "algo.kl_estimator": "k3+",
                 "algo.kl_clamp": 10.0, "algo.kl_is_correction": True, "algo.agg": "seq-mean-token-sum-norm",
                 "algo.max_response_length": 8, "algo.top_entropy_quantile": 0.5, "train.steps": 1}  # fmt: skip
    trainer = RLTrainer(tiny(tmp_path, **overrides))
    options = policy_loss_options(trainer)
    assert (options.kl_estimator, options.kl_clamp, options.kl_is_correction) == ("k3+", 10.0, True)
    assert (options.max_response_length, options.top_entropy_quantile) == (8, 0.5)
    trainer.train()
    record = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"][-1]
    assert 0 < record["entropy_mask_frac"] <= 1
    for bad, message in [({"algo.kl_estimator": "k3+", "algo.kl_place": "reward"}, "algo.kl_estimator"),
                         ({"algo.max_response_length": 8}, "applies to agg=seq-mean-token-sum-norm only"),
                         ({"algo.top_entropy_quantile": 0.0}, "algo.top_entropy_quantile")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            tiny(tmp_path / "bad", **bad)


def test_dapo_sampling_options(tmp_path):
    """Soft overlong punishment shifts the scores by verl's formula; dynamic sampling keeps only
    groups with a spread of scores (more rounds, or the dropped groups to fill the batch); overlong
    filtering masks the truncated responses out of the loss after they are scored."""
    from rlhf_fast.train.rl.steps import sample_step, truncated_responses

    overrides = {**ALGOS["grpo"], "rollout.max_new_tokens": 6, "rollout.dynamic_sampling": True,
                 "rollout.max_sampling_rounds": 3, "rollout.overlong_filter": True}  # fmt: skip
    trainer = RLTrainer(tiny(tmp_path, **overrides))
    calls = []

    def score_fn(trainer, rollout):
        calls.append(len(rollout))
        scores = torch.arange(len(rollout), dtype=torch.float32)
        scores[:4] = 1.0  # the first group of each round has no spread
        return scores, {}

    trainer.score_fn = score_fn
    torch.manual_seed(0)
    rollout, scores, stats = sample_step(trainer)
    assert len(rollout) == len(scores) == 8 and calls == [8, 8]  # one round keeps 4 of 8 rows: a second one
    assert stats["sampling_rounds"] == 2 and stats["kept_groups_frac"] == 0.5
    assert torch.equal(scores.view(-1, 4).std(-1) > 0, torch.tensor([True, True]))
    truncated = rollout.response_mask.sum(-1) == 0
    assert stats["overlong_frac"] == truncated.float().mean()
    assert not truncated_responses(trainer, rollout).any()  # masked now: nothing left to cut

    plain = RLTrainer(tiny(tmp_path / "plain", **{**ALGOS["grpo"], "rollout.overlong_buffer_len": 3,
                                                   "rollout.overlong_penalty_factor": 0.5}))  # fmt: skip
    plain.score_fn = lambda trainer, rollout: (torch.zeros(len(rollout)), {})
    rollout, scores, stats = sample_step(plain)
    length = rollout.response_mask.sum(-1).float()
    want = torch.clamp(-(length - (6 - 3)) / 3 * 0.5, max=0.0)  # verl: min(-exceed / len * factor, 0)
    assert torch.allclose(scores, want) and stats["overlong_penalty"] == want.mean()
    for bad, message in [({"rollout.dynamic_sampling": True}, "needs rollout.group_size >= 2"),
                         ({"rollout.overlong_buffer_len": 6}, "rollout.overlong_buffer_len")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            tiny(tmp_path / "bad", **bad)


def test_reward_fn_and_advantage_fn_replace_the_steps(tmp_path):
    seen = {}

    def reward_fn(prompts, responses):
        seen["n"] = len(responses)
        return [float(len(r.split())) for r in responses]  # longer is better

    def advantage_fn(trainer, exp):
        seen["adv"] = True
        return exp.scores - exp.scores.mean(), None

    cfg = tiny(tmp_path, **{"reward.gold": False, "algo.name": "reinforce", "algo.mini_batch_size": 8, "train.steps": 1})
    trainer = RLTrainer(cfg, reward_fn=reward_fn, advantage_fn=advantage_fn)
    metrics = trainer.train_step()
    assert seen == {"n": 8, "adv": True}
    assert metrics["fn_score"] == pytest.approx(metrics["score"])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    overrides = {**ALGOS["ppo"], "train.steps": 4, "train.save_every": 2}
    full = RLTrainer(tiny(tmp_path / "full", **overrides))
    full.train()
    first = RLTrainer(tiny(tmp_path / "split", **overrides, **{"train.stop_after": 2}))
    first.train()
    second = RLTrainer(tiny(tmp_path / "split", **overrides, resume=True))
    second.train()
    assert second.step == 4
    for a, b in zip(full.policy.state_dict().values(), second.policy.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(full.critic.state_dict().values(), second.critic.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens must be >= 1, got 0"),
        ({"rollout.group_size": 3}, "rollout.group_size=3 must divide rollout.batch_size=8"),
        ({"algo.mini_batch_size": 6}, "algo.mini_batch_size=6 must divide rollout.batch_size=8"),
        ({"algo.micro_batch_size": 3}, "algo.micro_batch_size=3 must divide algo.mini_batch_size=4"),
        ({"algo.name": "grpo"}, "needs rollout.group_size >= 2, got 1"),
    ],
)
def test_bad_batch_settings_print_the_numbers(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        tiny(tmp_path, **overrides)


def test_missing_model_reward_and_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        RLTrainer(tiny(tmp_path, **{"model.path": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match="reward.model_path"):
        RLTrainer(tiny(tmp_path, **{"reward.model_path": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="no reward"):
        RLTrainer(tiny(tmp_path, **{"reward.gold": False}))
    with pytest.raises(FileNotFoundError, match="data.train_path"):
        RLTrainer(tiny(tmp_path, **{"data.train_path": str(tmp_path / "none.jsonl")}))


def test_reward_fn_by_import_path(tmp_path, monkeypatch):
    """reward.fn="module:function" (the CLI's reward_fn): imported from the working directory and
    used as the score; a bad path, a missing colon or reward.gold beside it is a ConfigError."""
    (tmp_path / "my_rewards.py").write_text(
        "def word_count(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    trainer = RLTrainer(tiny(tmp_path / "run", **{"reward.gold": False, "reward.fn": "my_rewards:word_count",
                                                 "algo.name": "reinforce", "algo.mini_batch_size": 8, "train.steps": 1}))
    rollout = trainer.rollout_fn(trainer, trainer.next_prompts())
    scores, _ = trainer.score_fn(trainer, rollout)
    assert scores.tolist() == [float(len(r.split())) for r in rollout.responses]
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        RLTrainer(tiny(tmp_path / "bad", **{"reward.gold": False, "reward.fn": "no_such_module:f"}))
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        RLTrainer(tiny(tmp_path / "bad", **{"reward.gold": False, "reward.fn": "my_rewards:nope"}))
    with pytest.raises(ConfigError, match="module:function"):
        tiny(tmp_path / "bad", **{"reward.gold": False, "reward.fn": "my_rewards"})
    with pytest.raises(ConfigError, match="reward.gold"):
        tiny(tmp_path / "bad", **{"reward.fn": "my_rewards:word_count"})


def test_different_reward_tokenizer_needs_the_bridge(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf_fast.train.reward_model import RewardModel
    from rlhf_fast.train.task import build_tokenizer, vocabulary

    # Same words, other ids: the reward model must not read the policy's ids.
    words = list(reversed(vocabulary()))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    cfg = tiny(tmp_path)
    policy_tok = build_tokenizer()
    from rlhf_fast.train.models import arch_config

    rm = RewardModel.from_backbone_config(arch_config(cfg.model, policy_tok))
    with pytest.raises(ConfigError, match="different tokenizers"):
        RLTrainer(cfg, reward_model=rm, reward_tokenizer=other)
    bridged = RLTrainer(tiny(tmp_path, **{"reward.retokenize": True}), reward_model=rm, reward_tokenizer=other)
    rollout = generate(bridged.policy, bridged.tokenizer, bridged.train_prompts[:4], bridged.config.rollout)
    scores, stats = score_step(bridged, rollout)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and "rm_score" in stats
