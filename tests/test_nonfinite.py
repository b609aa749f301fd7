"""NaN and inf: the trainers never apply a non-finite update (a skipped step, a warning, the
skipped_updates metric; train.max_nonfinite_skips in a row stop the run naming the step and the
likely source), and NaN/inf rewards stop an RL run naming the row."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from numerics import tiny as tiny_rl

import rlhf_fast

from rlhf_fast.train.config import SFTConfig, load_config
from rlhf_fast.train.loop import Hooks, NonFiniteError
from rlhf_fast.train.rl.trainer import RLTrainer
from rlhf_fast.train.sft import SFTTrainer, sft_loss_step

MODEL = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64}


def sft_config(out_dir, **overrides) -> SFTConfig:
    options = {"out_dir": str(out_dir), **MODEL, "task.sft_train": 32, "task.sft_eval": 8, "train.batch_size": 8,
               "train.steps": 5, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0,
               "train.progress": False, "train.device": "cpu", **overrides}  # fmt: skip
    return load_config(SFTConfig, None, options)


def nan_at(calls: set[int], value: float = math.nan):
    """An SFT loss step that returns ``value`` times the loss on its calls numbered in ``calls`` (1-based)."""
    count = [0]

    def loss_fn(model, batch):
        count[0] += 1
        loss, stats = sft_loss_step(model, batch)
        return (loss * value if count[0] in calls else loss), stats

    return loss_fn


class Weights:
    """The model's weights after each step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, run, metrics):
        self.after[run.step] = {k: v.detach().clone() for k, v in run.module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_sft_skips_one_nonfinite_step_and_goes_on(tmp_path, value):
    weights = Weights()
    trainer = SFTTrainer(sft_config(tmp_path / "run"), loss_fn=nan_at({3}, value), hooks=Hooks(on_step=[weights]))
    with pytest.warns(RuntimeWarning, match=r"non-finite update at step 3 \(loss (nan|inf), gradient norm (nan|inf)\): skipped it"):
        trainer.train()
    assert trainer.loop.step == 5
    assert same(weights.after[2], weights.after[3])  # step 3 changed nothing
    assert not same(weights.after[3], weights.after[4])  # and training went on
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    train = [r for r in records(tmp_path / "run") if r["split"] == "train"]
    assert [r["skipped_updates"] for r in train] == [0.0, 0.0, 1.0, 0.0, 0.0]
    # AdamW took four steps; the LR schedule advanced at all five (the learning rate follows the step count).
    assert trainer.loop.optimizer.state[next(trainer.model.parameters())]["step"] == 4
    assert trainer.loop.scheduler.last_epoch == 5


def test_sft_skips_counted_per_log_window(tmp_path):
    trainer = SFTTrainer(sft_config(tmp_path / "run", **{"train.log_every": 5}), loss_fn=nan_at({2, 4}))
    with pytest.warns(RuntimeWarning):
        trainer.train()
    (train,) = [r for r in records(tmp_path / "run") if r["split"] == "train"]
    assert train["skipped_updates"] == 2.0  # a count over the window, not a mean


def test_sft_consecutive_skips_stop_the_run(tmp_path):
    weights = Weights()
    trainer = SFTTrainer(sft_config(tmp_path / "run", **{"train.max_nonfinite_skips": 2}), loss_fn=nan_at({2, 3, 4}),
                         hooks=Hooks(on_step=[weights]))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="step 2"), pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("non-finite update at step 3 (loss nan, gradient norm nan): 2 optimizer updates in a row skipped")
    assert "train.max_nonfinite_skips=2" in message and "likely source: the loss itself is NaN/inf with finite weights" in message
    assert same(weights.after[1], weights.after[2])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert not (tmp_path / "run" / "model").exists()


def test_sft_inf_weight_is_named_as_the_source(tmp_path):
    trainer = SFTTrainer(sft_config(tmp_path / "run"))
    with torch.no_grad():
        trainer.model.get_parameter("model.layers.0.mlp.down_proj.weight")[3, 5] = math.inf
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "at step 3" in message and "3 optimizer updates in a row" in message
    assert "the model's weights hold 1 NaN/inf value(s) (first in model.layers.0.mlp.down_proj.weight)" in message
    assert not (tmp_path / "run" / "model").exists()


def test_rm_skips_a_nonfinite_step(tmp_path):
    from rlhf_fast.train.config import RMConfig
    from rlhf_fast.train.rm import RMTrainer, rm_loss_step

    calls = [0]

    def nan_once(model, batch):
        calls[0] += 1
        loss, stats = rm_loss_step(model, batch, center_coef=0.0)
        return (loss * math.nan if calls[0] == 2 else loss), stats

    options = {"out_dir": str(tmp_path / "run"), **MODEL, "task.pref_train": 32, "task.pref_eval": 8, "train.batch_size": 8,
               "train.steps": 3, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0, "train.progress": False,
               "train.device": "cpu"}  # fmt: skip
    weights = Weights()
    trainer = RMTrainer(load_config(RMConfig, None, options), loss_fn=nan_once, hooks=Hooks(on_step=[weights]))
    with pytest.warns(RuntimeWarning, match="non-finite update at step 2"):
        trainer.train()
    assert same(weights.after[1], weights.after[2]) and not same(weights.after[2], weights.after[3])
    assert [r["skipped_updates"] for r in records(tmp_path / "run") if r["split"] == "train"] == [0.0, 1.0, 0.0]


def test_gradient_overflow_with_finite_loss_is_told_apart(tmp_path):
    def overflowing_gradient(model, batch):  # a finite loss whose gradient is inf / NaN
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits.register_hook(lambda grad: grad * math.inf)
        return rlhf_fast.sft_loss(logits, batch.labels), {}

    trainer = SFTTrainer(sft_config(tmp_path / "run", **{"train.max_nonfinite_skips": 1}), loss_fn=overflowing_gradient)
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("non-finite update at step 1 (loss ") and "gradient norm nan" in message
    assert "likely source: the gradient overflows (norm nan) with a finite loss" in message


def test_rl_nan_reward_names_the_row(tmp_path):
    def reward(prompts, responses):
        return [math.nan if i == 5 else 1.0 for i in range(len(responses))]

    trainer = RLTrainer(tiny_rl(tmp_path / "run", **{"reward.gold": False}), reward_fn=reward)
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("step 1: reward_fn ") and "returned nan for row 5 of 8 (1 row(s) NaN/inf; prompt " in message
    assert message.endswith("a reward must be a finite number")


def test_rl_inf_reward_model_names_the_row(tmp_path):
    class InfAtRow2:  # stands in for a RewardModel: only its score() is called during the step
        def score(self, ids, mask):
            return torch.zeros(ids.shape[0]).index_fill(0, torch.tensor([2]), -math.inf)

    trainer = RLTrainer(tiny_rl(tmp_path / "run", **{"reward.gold": False}), reward_fn=lambda p, r: [0.0] * len(r))
    trainer.reward_model = InfAtRow2()
    with pytest.raises(NonFiniteError, match=r"^step 1: the reward model returned -inf for row 2 of 8 \(1 row\(s\) NaN/inf"):
        trainer.train()


def test_rl_skips_a_nonfinite_update(tmp_path):
    from rlhf_fast.train.rl.steps import loss_step

    calls = [0]

    def nan_once(trainer, micro, normalizer):
        calls[0] += 1
        loss, stats = loss_step(trainer, micro, normalizer)
        return (loss * math.nan if calls[0] == 1 else loss), stats

    weights = Weights()
    config = tiny_rl(tmp_path / "run", **{"algo.name": "grpo", "rollout.group_size": 2, "train.steps": 2})
    trainer = RLTrainer(config, loss_fn=nan_once, hooks=Hooks(on_step=[weights]))
    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"non-finite update at step 1, update 1 of \d+"):
        trainer.train()
    train = [r for r in records(tmp_path / "run") if r["split"] == "train"]
    assert [r["skipped_updates"] for r in train] == [1.0, 0.0]
    assert not same(before, weights.after[1])  # the other updates of step 1 were applied
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_rl_consecutive_skips_stop_the_run(tmp_path):
    from rlhf_fast.train.rl.steps import loss_step

    def always_nan(trainer, micro, normalizer):
        loss, stats = loss_step(trainer, micro, normalizer)
        return loss * math.nan, stats

    config = tiny_rl(tmp_path / "run", **{"algo.name": "grpo", "rollout.group_size": 2, "train.max_nonfinite_skips": 2})
    trainer = RLTrainer(config, loss_fn=always_nan)
    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteError, match=r"at step 1, update 2 of \d+ \(loss nan"):
        trainer.train()
    assert same(before, trainer.policy.state_dict())


def test_max_nonfinite_skips_is_validated(tmp_path):
    from rlhf_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.max_nonfinite_skips must be >= 1, got 0"):
        sft_config(tmp_path, **{"train.max_nonfinite_skips": 0})


# ------------------------------------------------------------------------------ two processes (gloo)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, case: str, out_dir: str, results: str) -> None:
    import os

    import torch.distributed as torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from rlhf_fast.train.rl.steps import loss_step

        calls = [0]

        def nan_loss_on_rank_1_once(trainer, micro, normalizer):
            # A NaN in the loss's value only (its gradient stays finite): rank 0 sees nothing wrong,
            # and only the all-reduced flag keeps it from stepping alone.
            loss, stats = loss_step(trainer, micro, normalizer)
            calls[0] += 1
            return (loss + torch.tensor(math.nan) if rank == 1 and calls[0] == 1 else loss), stats

        def nan_reward_on_rank_1(prompts, responses):
            return [math.nan if rank == 1 and i == 4 else 0.5 for i in range(len(responses))]

        scorings = [0]

        def nan_in_rank_1s_second_round(prompts, responses):
            # Dynamic sampling: rank 0's groups all differ (one round); rank 1's first round has no
            # spread (a second round), whose rewards hold a NaN. The rounds run in lockstep, so rank 0
            # samples and scores that second round along with rank 1: each scored twice.
            scorings[0] += 1
            if rank == 0:
                return [float(i) for i in range(len(responses))]
            return [math.nan if scorings[0] == 2 and i == 4 else 0.5 for i in range(len(responses))]

        options = {"algo.name": "grpo", "rollout.group_size": 2, "train.steps": 2, "model.path": None, "reward.gold": False}
        if case == "loss":
            trainer = RLTrainer(tiny_rl(out_dir, **options), loss_fn=nan_loss_on_rank_1_once, reward_fn=lambda p, r: [float(len(x)) for x in r])
        elif case == "reward":
            trainer = RLTrainer(tiny_rl(out_dir, **options), reward_fn=nan_reward_on_rank_1)
        else:
            trainer = RLTrainer(tiny_rl(out_dir, **options, **{"rollout.dynamic_sampling": True}),
                                reward_fn=nan_in_rank_1s_second_round)  # fmt: skip
        try:
            trainer.train()
            outcome = "finished"
        except NonFiniteError as exc:
            outcome = str(exc)
        torch.save({"policy": trainer.policy.state_dict(), "outcome": outcome, "step": trainer.step,
                    "scorings": scorings[0]}, os.path.join(results, f"rank{rank}.pt"))  # fmt: skip
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["loss", "reward", "dynamic sampling"])
def test_two_processes_take_the_same_decision(tmp_path, case):
    import warnings

    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_ddp_worker, args=(2, _free_port(), case, str(tmp_path / "run"), str(results)), nprocs=2, join=True)
    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    if case == "loss":
        assert r0["outcome"] == r1["outcome"] == "finished" and r0["step"] == r1["step"] == 2
        skipped = [r["skipped_updates"] for r in records(tmp_path / "run") if r["split"] == "train"]
        assert skipped == [1.0, 0.0]  # rank 1's NaN skipped the update on both processes
        for name, value in r0["policy"].items():
            torch.testing.assert_close(value, r1["policy"][name], atol=0, rtol=0, msg=f"policy.{name} differs between ranks")
    else:  # both stop at step 1, neither left waiting; rank 1 names its row, rank 0 points at it
        assert r1["outcome"].startswith("step 1: reward_fn ") and "returned nan for row 4 on rank 1 of 8" in r1["outcome"]
        assert r0["outcome"] == "step 1: another process's rewards are NaN/inf (see its message)"
        if case == "dynamic sampling":
            assert (r0["scorings"], r1["scorings"]) == (2, 2)


# ------------------------------------------------------------------ what the ops do with NaN and inf
# The behaviour README's "Non-finite values" documents, measured on every CPU backend.
from rlhf_fast import _validate  # noqa: E402

B, T, V, H = 2, 3, 11, 5


def bad_rows(grad: torch.Tensor) -> list[int]:
    """Rows (of the flattened leading dims) whose gradient holds a NaN or inf."""
    return (~torch.isfinite(grad.reshape(-1, grad.shape[-1]))).any(-1).nonzero().flatten().tolist()


@pytest.mark.parametrize("backend", ["host", "torch"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_logit_poisons_its_row_only(backend, value):
    if not rlhf_fast.backends.registry.can_serve(backend, torch.device("cpu"), torch.float32).ok:
        pytest.skip(f"{backend} unavailable")
    labels = torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V)
    logits[0, 1, (labels[0, 1] + 1) % V] = value  # a non-label entry of a valid row
    logits.requires_grad_()
    logp, entropy = rlhf_fast.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert (~torch.isfinite(logp)).nonzero().tolist() == [[0, 1]] and bool(entropy[0, 1].isnan())
    assert bad_rows(logits.grad) == [1]


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_minus_inf_logits_mask_tokens_out(backend):
    if not rlhf_fast.backends.registry.can_serve(backend, torch.device("cpu"), torch.float32).ok:
        pytest.skip(f"{backend} unavailable")
    labels = torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V)
    logits[0, 1, (labels[0, 1] + 1) % V] = -math.inf  # another token: p = 0, everything finite
    logits[1, 2, labels[1, 2]] = -math.inf  # the label itself: logp -inf, gradient finite
    logits.requires_grad_()
    logp = rlhf_fast.token_logprobs(logits, labels, backend=backend)
    logp.masked_fill(torch.isinf(logp), 0).sum().backward()
    assert float(logp[1, 2].detach()) == -math.inf and int(torch.isfinite(logp).sum()) == B * T - 1
    assert bad_rows(logits.grad) == []


def test_plus_inf_logit_on_the_torch_backend_can_give_a_finite_policy_loss():
    """The torch backend's logp is -inf there: the PPO ratio is 0 and clipped, so the loss stays
    finite while that row's gradient is NaN (the trainers' gradient-norm check catches it)."""
    labels = torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V)
    logits[0, 1, (labels[0, 1] + 1) % V] = math.inf
    logits.requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, _ = rlhf_fast.fused_policy_loss(logits, labels, -torch.rand(B, T) - 1, torch.randn(B, T), mask, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and bad_rows(logits.grad) == [1]


def test_nan_advantage_gives_a_nan_loss_and_one_nan_gradient_row():
    labels = torch.randint(0, V, (B, T))
    advantages = torch.randn(B, T)
    advantages[0, 2] = math.nan
    logits = torch.randn(B, T, V, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, stats = rlhf_fast.fused_policy_loss(logits, labels, torch.randn(B, T) - 2, advantages, mask)
    loss.backward()
    assert loss.isnan() and all(torch.isfinite(v) for v in stats.values())
    assert bad_rows(logits.grad) == [2]


def test_ratio_overflow_without_dual_clip_is_inf():
    logp = torch.zeros(B, T, requires_grad=True)
    old, advantages, mask = torch.full((B, T), -100.0), -torch.ones(B, T), torch.ones(B, T, dtype=torch.bool)
    loss, _ = rlhf_fast.policy_loss(logp, old, advantages, mask)
    loss.backward()
    assert float(loss.detach()) == math.inf and not torch.isfinite(logp.grad).any()
    logp.grad = None
    loss, _ = rlhf_fast.policy_loss(logp, old, advantages, mask, dual_clip=3.0)
    loss.backward()
    assert float(loss.detach()) == 3.0 and torch.isfinite(logp.grad).all()


def test_zero_normalizer_is_not_finite_and_negative_flips_the_sign():
    logp, old = torch.randn(B, T) - 1, torch.randn(B, T) - 1
    advantages, mask = torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    assert not torch.isfinite(rlhf_fast.policy_loss(logp, old, advantages, mask, normalizer=torch.tensor(0.0))[0])
    plus = rlhf_fast.policy_loss(logp, old, advantages, mask, normalizer=torch.tensor(2.0))[0]
    minus = rlhf_fast.policy_loss(logp, old, advantages, mask, normalizer=torch.tensor(-2.0))[0]
    assert float(minus) == -float(plus)


def test_nan_hidden_row_poisons_the_whole_weight_gradient():
    labels = torch.randint(0, V, (B, T))
    hidden = torch.randn(B, T, H)
    hidden[0, 1, 2] = math.nan
    hidden.requires_grad_()
    weight = torch.randn(V, H, requires_grad=True)
    logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels)
    logp.sum().backward()
    assert (~torch.isfinite(logp)).nonzero().tolist() == [[0, 1]]
    assert bad_rows(hidden.grad) == [1] and bad_rows(weight.grad) == list(range(V))


# ------------------------------------------------------------------------------ check mode
def test_check_mode_is_off_by_default_and_read_from_the_environment():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RLHF_FAST_CHECK"}
    code = "import rlhf_fast._validate as v; print(v.CHECK)"
    read = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,  # noqa: E731
                                        text=True, check=True).stdout.strip()  # fmt: skip
    assert read({}) == "False" and read({"RLHF_FAST_CHECK": "0"}) == "False"
    assert read({"RLHF_FAST_CHECK": "1"}) == "True"


def all_ops_with_nan():
    """Each public op, called on inputs with a NaN at a valid position."""
    labels = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    logits = torch.randn(B, T, V)
    logits[1, 0, 3] = math.nan
    hidden = torch.randn(B, T, H)
    hidden[1, 0, 3] = math.nan
    weight, old, adv = torch.randn(V, H), -torch.rand(B, T) - 1, torch.randn(B, T)
    return {
        "token_logprobs": lambda: rlhf_fast.token_logprobs(logits, labels),
        "sft_loss": lambda: rlhf_fast.sft_loss(logits, labels),
        "fused_policy_loss": lambda: rlhf_fast.fused_policy_loss(logits, labels, old, adv, mask),
        "linear_token_logprobs": lambda: rlhf_fast.linear_token_logprobs(hidden, weight, labels),
        "linear_sft_loss": lambda: rlhf_fast.linear_sft_loss(hidden, weight, labels),
        "fused_linear_policy_loss": lambda: rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask),
        "policy_loss": lambda: rlhf_fast.policy_loss(old.masked_fill(mask & (torch.arange(T) == 0), math.nan), old, adv, mask),
    }


OP_NAMES = list(all_ops_with_nan())


@pytest.mark.parametrize("op", OP_NAMES)
def test_check_mode_names_the_argument_and_the_first_bad_index(op):
    name = {"token_logprobs": "logits", "sft_loss": "logits", "fused_policy_loss": "logits",
            "policy_loss": "logp"}.get(op, "hidden")  # fmt: skip
    index = "(0, 0)" if op == "policy_loss" else "(1, 0, 3)" if name == "logits" else "(3, 3)"
    with _validate.checking(), pytest.raises(ValueError, match=rf"^RLHF_FAST_CHECK: {name} holds nan at index {re.escape(index)}"):
        all_ops_with_nan()[op]()


@pytest.mark.parametrize("op", OP_NAMES)
def test_off_by_default_nothing_is_checked(op, monkeypatch):
    def called(*args, **kwargs):
        raise AssertionError("a value check ran with check mode off")

    for name in ("finite_values", "logits_values", "log_prob_values", "policy_values", "normalizer_value", "linear_values"):
        monkeypatch.setattr(_validate, name, called)
    monkeypatch.setattr(_validate, "CHECK", False)
    out = all_ops_with_nan()[op]()
    loss = out[0] if isinstance(out, tuple) else out
    assert not torch.isfinite(loss).all()  # the NaN went through, unreported


CHECKS = {
    "advantages": (lambda d: d["adv"].__setitem__((0, 2), math.inf), r"advantages holds inf at index \(0, 2\), a valid token"),
    "advantages [B]": (lambda d: d.__setitem__("adv", torch.tensor([0.5, math.nan])),
                       r"advantages holds nan at index \(1,\), a sequence with valid tokens"),
    "old_logp": (lambda d: d["old"].__setitem__((1, 1), math.nan), r"old_logp holds nan at index \(1, 1\), a valid token"),
    "old_logp > 0": (lambda d: d["old"].__setitem__((1, 1), 0.5), r"old_logp holds 0.5 at index \(1, 1\), a valid token; "
                     r"log-probabilities are <= 0"),
    "ref_logp": (lambda d: d.__setitem__("ref", torch.full((B, T), -math.inf)), r"ref_logp holds -inf at index \(0, 0\)"),
    "normalizer": (lambda d: d.__setitem__("normalizer", torch.tensor(0.0)), r"normalizer must be finite and > 0, got 0.0"),
    "label logit -inf": (lambda d: d["logits"].__setitem__((1, 2, int(d["labels"][1, 2])), -math.inf),
                         r"logits holds -inf at the label of valid row \(1, 2\)"),
    "logit +inf": (lambda d: d["logits"].__setitem__((0, 1, 0), math.inf), r"logits holds inf at index \(0, 1, 0\), a valid row"),
}


@pytest.mark.parametrize("fused", ["fused_policy_loss", "fused_linear_policy_loss"])
@pytest.mark.parametrize("case", list(CHECKS))
def test_each_check_fires(case, fused):
    if case.startswith(("label logit", "logit")) and fused == "fused_linear_policy_loss":
        pytest.skip("no logits")
    labels = torch.randint(0, V, (B, T))
    d = {"logits": torch.randn(B, T, V), "labels": labels, "old": -torch.rand(B, T) - 1, "adv": torch.randn(B, T),
         "ref": -torch.rand(B, T) - 1, "normalizer": None}  # fmt: skip
    setup, message = CHECKS[case]
    setup(d)
    mask = torch.ones(B, T, dtype=torch.bool)
    common = dict(ref_logp=d["ref"], normalizer=d["normalizer"])
    with _validate.checking(), pytest.raises(ValueError, match="^RLHF_FAST_CHECK: " + message):
        if fused == "fused_policy_loss":
            rlhf_fast.fused_policy_loss(d["logits"], labels, d["old"], d["adv"], mask, **common)
        else:
            rlhf_fast.fused_linear_policy_loss(torch.randn(B, T, H), torch.randn(V, H), labels, d["old"], d["adv"], mask, **common)


def test_linear_weight_and_bias_checks():
    labels, hidden = torch.randint(0, V, (B, T)), torch.randn(B, T, H)
    weight = torch.randn(V, H)
    weight[4, 1] = math.inf
    with _validate.checking(), pytest.raises(ValueError, match=r"^RLHF_FAST_CHECK: weight holds inf at index \(4, 1\); it must be finite"):
        rlhf_fast.linear_sft_loss(hidden, weight, labels)
    bias = torch.zeros(V)
    bias[2] = -math.inf  # a token masked out: allowed
    bias_nan = bias.clone()
    bias_nan[7] = math.nan
    with _validate.checking():
        assert torch.isfinite(rlhf_fast.linear_sft_loss(hidden, torch.randn(V, H), labels.clamp(max=1) + 5 * (labels > 1), bias=bias))
        with pytest.raises(ValueError, match=r"^RLHF_FAST_CHECK: bias holds nan at index \(7,\)"):
            rlhf_fast.linear_sft_loss(hidden, torch.randn(V, H), labels, bias=bias_nan)


def test_check_mode_ignores_masked_and_ignored_positions():
    """NaN and inf where the mask is False or the label is ignore_index never reach a result: no error."""
    labels = torch.randint(0, V, (B, T))
    labels[0, 0] = -100
    mask = labels != -100
    logits, hidden = torch.randn(B, T, V), torch.randn(B, T, H)
    logits[0, 0] = math.nan
    hidden[0, 0] = math.inf
    old, adv, ref = -torch.rand(B, T) - 1, torch.randn(B, T), -torch.rand(B, T) - 1
    for t in (old, adv, ref):
        t[0, 0] = math.nan
    logits[1, 1, (labels[1, 1] + 1) % V] = -math.inf  # a masked-out token of a valid row
    weight = torch.randn(V, H)
    with rlhf_fast.checking():  # the public name of _validate.checking
        for out in (rlhf_fast.token_logprobs(logits, labels), rlhf_fast.sft_loss(logits, labels),
                    rlhf_fast.fused_policy_loss(logits, labels, old, adv, mask, ref_logp=ref)[0],
                    rlhf_fast.linear_sft_loss(hidden, weight, labels),
                    rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask, ref_logp=ref)[0]):  # fmt: skip
            assert torch.isfinite(out).all()
