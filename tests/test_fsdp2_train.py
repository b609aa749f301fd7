"""``--dist.strategy fsdp2`` in the trainers, on two CPU processes (gloo) against one process.

Each trainer runs a few steps on the tiny built-in models: sharded over two processes (every
process a half of each global batch), and whole in one process on the same global batches. The loss
curves agree within float tolerance, the processes end with identical gathered parameters, equal to
the single process's, and the consolidated model directory holds them. A run stopped after some
steps (``train.stop_after``, its sharded checkpoint) and resumed ends exactly where the uninterrupted
two-process run does, and so does a torchrun run killed outright (SIGKILL) mid-run, then resumed. RL's
dynamic sampling runs its rounds in lockstep when one process needs more of them than the other.

One spawn runs every case of a test in each worker (starting the processes and importing
transformers is most of the time); each worker writes what it found to files the test reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

WORLD = 2
# AdamW's eps at 1e-3, not 1e-8: Adam's first steps are about lr * sign(g) where |g| < eps, which
# turns the 1e-8 by which the sharded and the whole gradients differ (the order of the reduce-scatter's
# sums) into up to lr of parameter; with eps 1e-3 that is lr * 1e-5 (see tests/test_fsdp2.py).
COMMON = {"train.log_every": 1, "train.progress": False, "train.eval_every": 0, "train.save_every": 0,
          "optim.eps": 1e-3, "optim.warmup_steps": 1}  # fmt: skip
SMALL = {"model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.intermediate_size": 64}
ATOL, RTOL = 2e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_config(out_dir, world: int, **overrides):
    from rlhf_fast.train.config import SFTConfig, load_config

    options = {**COMMON, **SMALL, "out_dir": str(out_dir), "task.sft_train": 64, "task.sft_eval": 9,
               "train.batch_size": 8 // world, "train.grad_accum": 2, "train.steps": 4, "train.eval_batch_size": 4,
               "optim.lr": 3e-3, "dist.strategy": "fsdp2"}  # fmt: skip
    return load_config(SFTConfig, None, {**options, **overrides})


def rm_config(out_dir, world: int, **overrides):
    from rlhf_fast.train.config import RMConfig, load_config

    options = {**COMMON, **SMALL, "out_dir": str(out_dir), "task.pref_train": 64, "task.pref_eval": 9,
               "train.batch_size": 8 // world, "train.grad_accum": 2, "train.steps": 4, "train.eval_batch_size": 4,
               "optim.lr": 3e-3, "dist.strategy": "fsdp2"}  # fmt: skip
    return load_config(RMConfig, None, {**options, **overrides})


def run_sft(out_dir, world: int, **overrides):
    from rlhf_fast.train.sft import SFTTrainer

    trainer = SFTTrainer(sft_config(out_dir, world, **overrides))
    trainer.train()
    return trainer.loop.module


def run_rm(out_dir, world: int, **overrides):
    from rlhf_fast.train.rm import RMTrainer

    trainer = RMTrainer(rm_config(out_dir, world, **overrides))
    trainer.train()
    return trainer.loop.module


def rl_config(out_dir, world: int, **overrides):
    """PPO with a reward model and a critic: one minibatch per epoch (its composition does not depend on
    how the rows are split over processes), no whitening (it would be per process)."""
    from rlhf_fast.train.config import load_config
    from rlhf_fast.train.rl.config import RLConfig

    options = {**COMMON, **SMALL, "out_dir": str(out_dir), "algo.name": "ppo", "algo.epochs": 2, "algo.whiten": False,
               "rollout.batch_size": 8 // world, "algo.mini_batch_size": 8 // world, "algo.micro_batch_size": 2,
               "rollout.max_new_tokens": 5, "reward.gold": True, "data.train_prompts": 32, "train.steps": 2,
               "train.eval_prompts": 5, "train.eval_batch_size": 2, "train.device": "cpu", "optim.lr": 1e-3,
               "dist.strategy": "fsdp2"}  # fmt: skip
    return load_config(RLConfig, None, {**options, **overrides})


def greedy_rollout(trainer, prompts):
    """Greedy responses: the same whatever the split of the prompts over processes (sampling draws
    from each process's own generator), so that the runs can be compared."""
    from rlhf_fast.train.fsdp import gathered
    from rlhf_fast.train.rl.rollout import generate

    with gathered(trainer.policy):
        return generate(trainer.policy, trainer.tokenizer, prompts, trainer.config.rollout, greedy=True)


def run_rl(out_dir, world: int, **overrides):
    from rlhf_fast.train.models import arch_config
    from rlhf_fast.train.reward_model import RewardModel
    from rlhf_fast.train.rl.trainer import RLTrainer
    from rlhf_fast.train.task import build_tokenizer

    config = rl_config(out_dir, world, **overrides)
    tokenizer = build_tokenizer()
    torch.manual_seed(1234)  # the same reward model in every process and run
    reward_model = RewardModel.from_backbone_config(arch_config(config.model, tokenizer))
    trainer = RLTrainer(config, tokenizer=tokenizer, reward_model=reward_model, rollout_fn=greedy_rollout)
    trainer.train()
    if world > 1:  # no model is left gathered after the rollouts, evaluations and log-probs
        for model in (trainer.policy, trainer.ref_policy, trainer.reward_model, trainer.critic):
            whole = [n for n, p in model.named_parameters() if type(p).__name__ != "DTensor"]
            assert not whole, f"{type(model).__name__} left gathered: {whole[:3]}"
    return torch.nn.ModuleDict({"policy": trainer.policy, "critic": trainer.critic})


def whole_params(model) -> dict[str, torch.Tensor]:
    """Every parameter, gathered whole on this process (the sharded model's DTensors made full)."""
    return {name: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone()
            for name, p in model.named_parameters()}  # fmt: skip


def train_losses(out_dir, key: str = "loss") -> list[float]:
    from rlhf_fast.train.metrics import read_metrics

    return [r[key] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["split"] == "train"]


def eval_losses(out_dir) -> list[float]:
    from rlhf_fast.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["split"] == "eval"]


def case_trainer(rank: int, tmp: Path, name: str, resume: bool) -> None:
    """Uninterrupted, then (``resume``) stopped after 2 of 4 steps and resumed: each rank saves its
    gathered parameters of both runs, rank 0 checks the sharded checkpoints' layout."""
    run = {"sft": run_sft, "rm": run_rm, "rl": run_rl}[name]
    model = run(tmp / f"{name}_fsdp2", WORLD, **({} if name == "rl" else {"train.eval_every": 2}))
    torch.save(whole_params(model), tmp / f"{name}_fsdp2_rank{rank}.pt")
    if not resume:
        return
    half = 1 if name == "rl" else 2
    run(tmp / f"{name}_resumed", WORLD, **{"train.stop_after": half, "train.keep_checkpoints": 1})
    checkpoints = tmp / f"{name}_resumed" / "checkpoints"
    if rank == 0:
        assert sorted(p.name for p in checkpoints.iterdir()) == [f"step_{half:08d}"], list(checkpoints.iterdir())
        files = sorted(p.name for p in (checkpoints / f"step_{half:08d}").iterdir())
        assert "rank_00000.pt" in files and "rank_00001.pt" in files and ".metadata" in files, files
        # What a job killed while saving the next step leaves: shards without the rename. Never loaded.
        killed = checkpoints / f".step_{half + 1:08d}.tmp"
        killed.mkdir()
        (killed / "__0_0.distcp").write_bytes(b"half")
    torch_dist.barrier()
    model = run(tmp / f"{name}_resumed", WORLD, resume=True)
    assert not (checkpoints / f".step_{half + 1:08d}.tmp").exists()
    torch.save(whole_params(model), tmp / f"{name}_resumed_rank{rank}.pt")


def case_nonfinite(rank: int, tmp: Path) -> None:
    """A NaN loss on rank 1 only, in step 2's second micro-batch: the sharded gradient and the norm
    are NaN on both ranks (FSDP2's reduce-scatter spreads it), so both skip that update."""
    import warnings

    from rlhf_fast.train.sft import SFTTrainer, sft_loss_step

    calls = [0]

    def nan_on_rank_1(model, batch):
        calls[0] += 1
        loss, stats = sft_loss_step(model, batch)
        return (loss * math.nan if rank == 1 and calls[0] == 4 else loss), stats

    trainer = SFTTrainer(sft_config(tmp / "sft_nan", WORLD), loss_fn=nan_on_rank_1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    params = whole_params(trainer.loop.module)
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    torch.save(params, tmp / f"sft_nan_rank{rank}.pt")


DYNAMIC = {"algo.name": "grpo", "rollout.group_size": 2, "rollout.dynamic_sampling": True,
           "rollout.max_sampling_rounds": 3, "algo.epochs": 1}  # fmt: skip


def case_dynamic_sampling(rank: int, tmp: Path) -> None:
    """GRPO with dynamic sampling over two sharded processes: in step 1 rank 1's first round has no
    group with a spread of scores (it needs a second round) while rank 0's first round fills its batch,
    so rank 0 samples and scores the second round along (generation on the gathered policy and the
    sharded reward model's forward are collectives); step 2 takes one round on both. Each rank saves
    its count of scorings and its gathered policy."""
    from rlhf_fast.train.models import arch_config
    from rlhf_fast.train.reward_model import RewardModel
    from rlhf_fast.train.rl.steps import score_step
    from rlhf_fast.train.rl.trainer import RLTrainer
    from rlhf_fast.train.task import build_tokenizer

    scorings = [0]

    def score_fn(trainer, rollout):
        scorings[0] += 1
        scores, stats = score_step(trainer, rollout)  # the sharded reward model's forward
        if rank == 1 and scorings[0] == 1:
            return torch.full_like(scores, 0.5), stats  # no spread in any group: rank 1 is short
        return torch.arange(len(scores), dtype=scores.dtype), stats  # every group has a spread

    config = rl_config(tmp / "rl_dynamic", WORLD, **DYNAMIC)
    tokenizer = build_tokenizer()
    torch.manual_seed(1234)  # the same reward model in every process
    reward_model = RewardModel.from_backbone_config(arch_config(config.model, tokenizer))
    trainer = RLTrainer(config, tokenizer=tokenizer, reward_model=reward_model, score_fn=score_fn)
    trainer.train()
    for model in (trainer.policy, trainer.ref_policy, trainer.reward_model):
        whole = [n for n, p in model.named_parameters() if type(p).__name__ != "DTensor"]
        assert not whole, f"{type(model).__name__} left gathered: {whole[:3]}"
    torch.save({"scorings": scorings[0], "policy": whole_params(trainer.policy)}, tmp / f"rl_dynamic_rank{rank}.pt")


def _worker(rank: int, port: int, tmp: str, names: list[str], resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    failures = []
    try:
        for name in names:
            try:
                if name == "sft_nan":
                    case_nonfinite(rank, Path(tmp))
                elif name == "rl_dynamic":
                    case_dynamic_sampling(rank, Path(tmp))
                else:
                    case_trainer(rank, Path(tmp), name, resume)
            except Exception:
                failures.append(f"{name} on rank {rank}:\n{traceback.format_exc()}")
                raise  # the other rank may be waiting in a collective: stop both
    finally:
        with open(os.path.join(tmp, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures) if failures else "ok")
        torch_dist.destroy_process_group()


def spawn(tmp_path: Path, names: list[str], resume: bool = True) -> None:
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path), names, resume), nprocs=WORLD, join=True)
    finally:
        reports = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else "no report"
                   for r in range(WORLD)]  # fmt: skip
    assert reports == ["ok"] * WORLD, "\n\n".join(reports)


def check_trainer(tmp_path: Path, name: str, whole_model, resume: bool = True, keys=("loss",)) -> None:
    """The two-process run against ``whole_model`` (the one-process run in tmp_path / name_one): the
    training metrics ``keys`` of every step, the evaluations' loss (when ``keys`` has it)."""
    one = tmp_path / f"{name}_one"
    sharded, resumed = tmp_path / f"{name}_fsdp2", tmp_path / f"{name}_resumed"
    for key in keys:
        want = train_losses(one, key)
        assert len(want) in (2, 4) and all(math.isfinite(x) for x in want), want
        torch.testing.assert_close(train_losses(sharded, key), want, atol=ATOL, rtol=RTOL, msg=f"{name} {key}")
    if "loss" in keys:
        torch.testing.assert_close(eval_losses(sharded), eval_losses(one), atol=ATOL, rtol=RTOL)
    ranks = [torch.load(tmp_path / f"{name}_fsdp2_rank{r}.pt") for r in range(WORLD)]
    expected = dict(whole_model.named_parameters())
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, atol=0, rtol=0, msg=f"{name}: {key} differs between ranks")
        torch.testing.assert_close(value, expected[key].detach(), atol=ATOL, rtol=RTOL, msg=f"{name}: {key} vs one process")
    assert "strategy: fsdp2" in (sharded / "config.yaml").read_text()
    if not resume:
        return
    # Stopped halfway and resumed: exactly the uninterrupted run.
    for key in keys:
        assert train_losses(resumed, key) == train_losses(sharded, key), key
    for r in range(WORLD):
        again = torch.load(tmp_path / f"{name}_resumed_rank{r}.pt")
        for key, value in ranks[r].items():
            torch.testing.assert_close(again[key], value, atol=0, rtol=0, msg=f"{name} resumed: {key} on rank {r}")


def test_fsdp2_sft_matches_one_process(tmp_path):
    """The fast check: two sharded processes against one, and the consolidated model directory."""
    from transformers import AutoModelForCausalLM

    spawn(tmp_path, ["sft"], resume=False)
    torch.set_num_threads(1)
    whole = run_sft(tmp_path / "sft_one", 1, **{"train.eval_every": 2})
    check_trainer(tmp_path, "sft", whole, resume=False)
    # The consolidated transformers directory rank 0 wrote holds the trained weights.
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft_fsdp2" / "model"), local_files_only=True, dtype=torch.float32)
    gathered = torch.load(tmp_path / "sft_fsdp2_rank0.pt")
    for key, value in saved.named_parameters():
        torch.testing.assert_close(value, gathered[key], atol=0, rtol=0, msg=f"model/ {key}")
    assert json.loads((tmp_path / "sft_fsdp2" / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_fsdp2_sft_resumes_exactly_and_skips_a_nonfinite_update(tmp_path):
    spawn(tmp_path, ["sft", "sft_nan"])
    torch.set_num_threads(1)
    check_trainer(tmp_path, "sft", run_sft(tmp_path / "sft_one", 1, **{"train.eval_every": 2}))
    assert train_losses(tmp_path / "sft_nan", "skipped_updates") == [0.0, 1.0, 0.0, 0.0]
    ranks = [torch.load(tmp_path / f"sft_nan_rank{r}.pt") for r in range(WORLD)]
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, atol=0, rtol=0, msg=f"after a skip: {key} differs between ranks")


@pytest.mark.slow
def test_fsdp2_rm_matches_one_process_and_resumes_exactly(tmp_path):
    from rlhf_fast.train.reward_model import RewardModel

    spawn(tmp_path, ["rm"])
    torch.set_num_threads(1)
    whole = run_rm(tmp_path / "rm_one", 1, **{"train.eval_every": 2})
    check_trainer(tmp_path, "rm", whole)
    saved = RewardModel.from_pretrained(tmp_path / "rm_fsdp2" / "reward_model")
    gathered = torch.load(tmp_path / "rm_fsdp2_rank0.pt")
    for key, value in saved.named_parameters():
        torch.testing.assert_close(value, gathered[key], atol=0, rtol=0, msg=f"reward_model/ {key}")


@pytest.mark.slow
def test_fsdp2_rl_matches_one_process_and_resumes_exactly(tmp_path):
    """PPO with a sharded policy, critic, reference and reward model: generation on the gathered
    policy, the evaluation's batches in lockstep (5 prompts over 2 processes in batches of 2)."""
    spawn(tmp_path, ["rl"])
    torch.set_num_threads(1)
    whole = run_rl(tmp_path / "rl_one", 1)
    check_trainer(tmp_path, "rl", whole, keys=("score", "kl", "grad_norm", "rm_score", "response_length"))
    from rlhf_fast.train.metrics import read_metrics

    evals = [r for r in read_metrics(tmp_path / "rl_fsdp2" / "metrics.jsonl") if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["prompts"] == 5


def test_fsdp2_accepts_dynamic_sampling(tmp_path):
    """The config takes dynamic sampling with fsdp2 (its rounds run in lockstep), once refused."""
    config = rl_config(tmp_path, WORLD, **DYNAMIC)
    assert config.dist.strategy == "fsdp2" and config.rollout.dynamic_sampling


@pytest.mark.slow
def test_fsdp2_rl_dynamic_sampling_runs_the_rounds_in_lockstep(tmp_path):
    """Rank 1 needs two rounds in step 1, rank 0 one: both run two (the common sampling_rounds), the
    step completes on both, and the ranks end with identical parameters."""
    spawn(tmp_path, ["rl_dynamic"])
    run = tmp_path / "rl_dynamic"
    assert train_losses(run, "sampling_rounds") == [2.0, 1.0]
    # Step 1, averaged over the ranks: rank 0 kept all 8 rows it sampled (its batch was full after the
    # first round), rank 1 the 4 of its second round.
    assert train_losses(run, "kept_groups_frac") == [0.75, 1.0]
    ranks = [torch.load(tmp_path / f"rl_dynamic_rank{r}.pt") for r in range(WORLD)]
    assert [r["scorings"] for r in ranks] == [3, 3]
    for key, value in ranks[0]["policy"].items():
        torch.testing.assert_close(ranks[1]["policy"][key], value, atol=0, rtol=0, msg=f"{key} differs between ranks")


def test_resume_refuses_checkpoints_of_the_other_strategy(tmp_path):
    """One process finds only a sharded checkpoint (a two-process fsdp2 run's): refused, not restarted."""
    from rlhf_fast.train.checkpoint import CheckpointError
    from rlhf_fast.train.sft import SFTTrainer

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    trainer = SFTTrainer(sft_config(tmp_path / "run", 1, resume=True, **{"task.sft_train": 16, "train.steps": 2}))
    with pytest.raises(CheckpointError, match="holds sharded checkpoints .dist.strategy=fsdp2"):
        trainer.train()


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@pytest.mark.slow
def test_fsdp2_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    """A real kill: torchrun and its two processes get SIGKILL a few steps in, at a random moment
    (a sharded checkpoint is written every step, so the kill may land in one); ``--resume`` finishes
    the run, and its losses and consolidated model equal those of a run never interrupted."""
    from safetensors.torch import load_file

    from rlhf_fast.train.metrics import read_metrics

    steps = 40  # a step takes tens of ms here: enough of them that the kill lands mid-run
    options = {**COMMON, **SMALL, "task.sft_train": 64, "task.sft_eval": 9, "train.batch_size": 4, "train.steps": steps,
               "train.save_every": 1, "train.eval_batch_size": 4, "optim.lr": 3e-3, "dist.strategy": "fsdp2"}  # fmt: skip

    def command(out, *extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
                str(_free_port()), "-m", "rlhf_fast", "sft", "--out_dir", str(out)]  # fmt: skip
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        return argv + list(extra)

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run, straight = tmp_path / "run", tmp_path / "straight"
    due, delay = int(torch.randint(2, 5, ())), float(torch.rand(())) * 0.3
    process = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while process.poll() is None and (not (run / "metrics.jsonl").exists() or len(losses(run)) < due):
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.01)
    time.sleep(delay)
    for pid in [process.pid, *descendants(process.pid)]:  # torchrun starts its workers in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, (due, delay, err.decode()[-2000:])
    assert len(losses(run)) < steps, "the run ended before the kill: nothing was tested"

    for out, extra in ((run, ["--resume"]), (straight, [])):
        done = subprocess.run(command(out, *extra), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (due, delay, done.stderr[-3000:])
    assert losses(run) == losses(straight), (due, delay)
    resumed, uninterrupted = (load_file(out / "model" / "model.safetensors") for out in (run, straight))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), (name, due, delay)
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "a save cut short was left behind"
