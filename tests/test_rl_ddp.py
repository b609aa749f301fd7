"""Two CPU processes (gloo) train on different prompt shards and end with identical parameters."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from numerics import ALGOS, tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from rlhf_fast.train.rl.trainer import RLTrainer

        trainer = RLTrainer(tiny(out_dir, **{**ALGOS["ppo"], "train.steps": 2, "model.path": None}))
        prompts = trainer.prompt_stream.next()
        trainer.prompt_stream.offset = 0  # put the first batch back
        trainer.train()
        torch.save(
            {"policy": trainer.policy.state_dict(), "critic": trainer.critic.state_dict(), "prompts": prompts},
            os.path.join(results, f"rank{rank}.pt"),
        )
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_parameters(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "run"), str(results)), nprocs=2, join=True)
    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["prompts"] != r1["prompts"]  # each process sampled its own shard
    for key in ("policy", "critic"):
        for name, value in r0[key].items():
            torch.testing.assert_close(value, r1[key][name], atol=0, rtol=0, msg=f"{key}.{name} differs between ranks")
    # only rank 0 wrote the run's files
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "model").is_dir()
