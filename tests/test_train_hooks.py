"""One hook object observes SFT, reward-model and RL training alike: the same calls, in the same order,
with a run that exposes the same attributes (loop.Hooks, loop.run_steps)."""

from __future__ import annotations

import pytest
import torch
from numerics import tiny as tiny_rl

from rlhf_fast.train.config import RMConfig, SFTConfig, load_config
from rlhf_fast.train.loop import Hooks
from rlhf_fast.train.rm import RMTrainer
from rlhf_fast.train.rl.trainer import RLTrainer
from rlhf_fast.train.sft import SFTTrainer

MODEL = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64}
SCHEDULE = {"train.steps": 3, "train.eval_every": 2, "train.save_every": 2, "train.log_every": 1, "train.progress": False}


class Recorder:
    """Writes down every call, and reads on each run what Hooks documents it may read."""

    def __init__(self):
        self.events: list[tuple] = []

    def hooks(self) -> Hooks:
        return Hooks(on_step=[self.on_step], on_eval=[self.on_eval], on_checkpoint=[self.on_checkpoint], on_end=[self.on_end])

    def look(self, run) -> None:
        assert isinstance(run.module, torch.nn.Module) and run.device.type == "cpu"
        assert run.out_dir.is_dir() and run.metrics.path.parent == run.out_dir
        assert run.scheduler.get_last_lr()[0] == run.optimizer.param_groups[0]["lr"]

    def on_step(self, run, metrics):
        self.look(run)
        assert {"lr", "elapsed_s"} <= set(metrics)
        self.events.append(("step", run.step))

    def on_eval(self, run, metrics):
        self.look(run)
        assert metrics and run.last_eval is metrics
        self.events.append(("eval", run.step))

    def on_checkpoint(self, run, path):
        self.look(run)
        assert path.is_file()
        self.events.append(("checkpoint", run.step))

    def on_end(self, run, metrics):
        self.look(run)
        assert metrics is run.last_eval and metrics
        self.events.append(("end", run.step))


def build(stage: str, out_dir, hooks: Hooks):
    if stage == "sft":
        options = {"out_dir": str(out_dir), **MODEL, **SCHEDULE, "task.sft_train": 32, "task.sft_eval": 8, "train.batch_size": 8}
        return SFTTrainer(load_config(SFTConfig, None, options), hooks=hooks)
    if stage == "rm":
        options = {"out_dir": str(out_dir), **MODEL, **SCHEDULE, "task.pref_train": 32, "task.pref_eval": 8, "train.batch_size": 8}
        return RMTrainer(load_config(RMConfig, None, options), hooks=hooks)
    return RLTrainer(tiny_rl(out_dir, **SCHEDULE), hooks=hooks)


@pytest.mark.parametrize("stage", ["sft", "rm", "rl"])
def test_one_hook_object_sees_every_stage_the_same_way(tmp_path, stage):
    recorder = Recorder()
    build(stage, tmp_path, recorder.hooks()).train()
    assert recorder.events == [
        ("step", 1), ("step", 2), ("eval", 2), ("checkpoint", 2), ("step", 3), ("eval", 3), ("checkpoint", 3), ("end", 3)
    ]  # fmt: skip
