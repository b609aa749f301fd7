"""No leak: many forward + backward calls of each op on the host backend keep the process's resident
memory flat (issue 14, item 6: linear_token_logprobs was seen to grow by 30-40 MiB every 250 calls).

RSS is read from /proc/self/statm after glibc's malloc_trim(0), which hands freed heap pages back
to the system: without it, fragmentation of the allocator's arenas reads as growth. The first calls
(warm-up) fill caches that are meant to stay (the provider resolution, the thread pool, torch's
allocator); the bound is on the growth between call WARMUP and call WARMUP + CALLS."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import pytest
import torch

import rlhf_fast
from rlhf_fast.backends import registry

WARMUP, CALLS = 200, 1000
MAX_GROWTH = 2 * 2**20  # bytes; measured here: <= 0.11 MiB. A leak of 2 KiB per call crosses it (of a [V, H] float32 gradient: 125 MiB)
B, T, V, H = 4, 32, 512, 64  # N = 128 rows

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs /proc/self/statm (Linux)"),
    pytest.mark.slow,  # about 10 s for the six ops on a 2-core machine
]


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, ...): no malloc_trim
        return None


MALLOC_TRIM = _malloc_trim()


def resident_bytes() -> int:
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def make_call(op: str):
    """One forward + backward of ``op`` on the host backend, on inputs made once."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :4] = -100
    mask = labels != -100
    old_logp = torch.randn(B, T, generator=g) - 3
    advantages = torch.randn(B, T, generator=g)
    if op in ("token_logprobs", "sft_loss", "fused_policy_loss"):
        leaves = [torch.randn(B, T, V, generator=g).requires_grad_()]
    else:
        leaves = [torch.randn(B, T, H, generator=g).requires_grad_(), (torch.randn(V, H, generator=g) / 8).requires_grad_()]

    def loss():
        if op == "token_logprobs":
            logp, entropy = rlhf_fast.token_logprobs(leaves[0], labels, return_entropy=True, backend="host")
            return logp.sum() + entropy.sum()
        if op == "sft_loss":
            return rlhf_fast.sft_loss(leaves[0], labels, backend="host")
        if op == "fused_policy_loss":
            return rlhf_fast.fused_policy_loss(leaves[0], labels, old_logp, advantages, mask, backend="host")[0]
        if op == "linear_token_logprobs":
            logp, entropy = rlhf_fast.linear_token_logprobs(*leaves, labels, return_entropy=True, backend="host")
            return logp.sum() + entropy.sum()
        if op == "linear_sft_loss":
            return rlhf_fast.linear_sft_loss(*leaves, labels, backend="host")
        return rlhf_fast.fused_linear_policy_loss(*leaves, labels, old_logp, advantages, mask, backend="host")[0]

    def call():
        for leaf in leaves:
            leaf.grad = None
        loss().backward()

    return call


OPS = ["token_logprobs", "sft_loss", "fused_policy_loss", "linear_token_logprobs", "linear_sft_loss", "fused_linear_policy_loss"]


@pytest.mark.parametrize("op", OPS)
def test_forward_backward_keeps_memory_flat(op):
    if not registry.can_serve("host", torch.device("cpu"), torch.float32).ok:
        pytest.skip("the host backend is not built here")
    call = make_call(op)
    for _ in range(WARMUP):
        call()
    before = resident_bytes()
    for _ in range(CALLS):
        call()
    growth = resident_bytes() - before
    assert growth < MAX_GROWTH, f"{op}: RSS grew by {growth / 2**20:.2f} MiB over {CALLS} forward + backward calls"
