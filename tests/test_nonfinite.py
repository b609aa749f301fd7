"""NaN and inf: the trainers never apply a non-finite update (a skipped step, a warning, the
skipped_updates metric; train.max_nonfinite_skips in a row stop the run naming the step and the
likely source), and NaN/inf rewards stop an RL run naming the row."""

from __future__ import annotations

import json
import math

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

        options = {"algo.name": "grpo", "rollout.group_size": 2, "train.steps": 2, "model.path": None, "reward.gold": False}
        if case == "loss":
            trainer = RLTrainer(tiny_rl(out_dir, **options), loss_fn=nan_loss_on_rank_1_once, reward_fn=lambda p, r: [float(len(x)) for x in r])
        else:
            trainer = RLTrainer(tiny_rl(out_dir, **options), reward_fn=nan_reward_on_rank_1)
        try:
            trainer.train()
            outcome = "finished"
        except NonFiniteError as exc:
            outcome = str(exc)
        torch.save({"policy": trainer.policy.state_dict(), "outcome": outcome, "step": trainer.step,
                    "streak": trainer.nonfinite_streak}, os.path.join(results, f"rank{rank}.pt"))  # fmt: skip
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["loss", "reward"])
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
    else:  # both stop at step 1; rank 1 names its row, rank 0 points at it
        assert r1["outcome"].startswith("step 1: reward_fn ") and "returned nan for row 4 on rank 1 of 8" in r1["outcome"]
        assert r0["outcome"] == "step 1: another process's rewards are NaN/inf (see its message)"
