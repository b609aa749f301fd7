"""Process-group helpers: everything works in one process, and uses torch.distributed when it is initialised.

Only rank 0 writes files (checkpoints, metrics, plots, final models) and shows progress; every rank
loads the same checkpoint on resume and reduces its sums with ``all_reduce_sum``.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes, in place (a no-op in one process)."""
    if initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@contextlib.contextmanager
def process_group():
    """Under torchrun (WORLD_SIZE > 1), initialise torch.distributed for the block and tear it down
    after; NCCL on GPUs, gloo on CPU. A no-op in one process or when already initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
        # All ranks leave together: a rank tearing gloo down while another still talks to it aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def resolve_device(spec: str) -> torch.device:
    """``auto``: cuda:LOCAL_RANK when CUDA is available, else cpu; otherwise the device named."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec!r} but CUDA is not available here")
    return device
