"""The path from a public op to the provider: few Python frames of ours, the provider resolved
once per call and cached, validation once (a fused op does not re-validate through token_logprobs)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import rlhf_fast
from rlhf_fast.backends import registry
from rlhf_fast.backends.torch_ref import TorchProvider

PACKAGE = Path(rlhf_fast.__file__).resolve().parent
MAX_FRAMES = 4


def our_frames_to_provider(calls: list, method: str):
    """Our frames (files under rlhf_fast/) on the stack when the provider's ``method`` runs,
    innermost first, excluding the provider method itself."""
    frames = [f for f in inspect.stack()[1:] if Path(f.filename).resolve().is_relative_to(PACKAGE)]
    calls.append((method, [f"{Path(f.filename).name}:{f.function}" for f in frames]))


@pytest.fixture
def spied(monkeypatch):
    calls = []
    for method in ("token_logprobs_forward", "token_logprobs_backward"):
        original = getattr(TorchProvider, method)

        def spy(self, *args, _original=original, _method=method):
            our_frames_to_provider(calls, _method)
            return _original(self, *args)

        monkeypatch.setattr(TorchProvider, method, spy)
    return calls


@pytest.mark.parametrize("op", ["token_logprobs", "fused_policy_loss"])
def test_few_frames_from_public_op_to_provider(spied, op):
    B, T, V = 2, 3, 11
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    if op == "token_logprobs":
        out = rlhf_fast.token_logprobs(logits, labels, backend="torch").sum()
    else:
        mask = torch.ones(B, T, dtype=torch.bool)
        out, _ = rlhf_fast.fused_policy_loss(logits, labels, torch.randn(B, T), torch.randn(B), mask, backend="torch")
    out.backward()
    assert [method for method, _ in spied] == ["token_logprobs_forward", "token_logprobs_backward"]
    for method, frames in spied:
        assert len(frames) <= MAX_FRAMES, f"{method}: {frames}"
    if op == "fused_policy_loss":  # validated once, in fused_policy_loss: not again in token_logprobs
        assert "token_logprobs.py:token_logprobs" not in spied[0][1], spied[0][1]


def test_resolution_is_cached_per_setting(monkeypatch):
    asked = []
    original = registry.can_serve

    def counting(*args, **kwargs):
        asked.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(registry, "can_serve", counting)
    registry._resolve.cache_clear()
    logits = torch.randn(4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (4,))
    for _ in range(3):
        rlhf_fast.token_logprobs(logits, labels, backend="torch").sum().backward()
    assert len(asked) == 1  # one question for (torch, cpu, float32, token_logprobs), then the cache
