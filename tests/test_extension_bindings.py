"""The CUDA provider's calls match csrc/bindings.cpp, checked without a GPU.

The CUDA kernels only run on a GPU machine, but the Python side that marshals their arguments is
shared with the host backend (rlhf_fast/backends/extension.py). Here the extension is replaced by
a recorder, each provider method is called on CPU tensors, and the keywords of every cuda_* call
are compared with the py::arg names that bindings.cpp declares.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

from rlhf_fast.backends import cuda

BINDINGS = Path(__file__).resolve().parents[1] / "csrc" / "bindings.cpp"


def declared_arguments() -> dict[str, list[str]]:
    """{function: sorted py::arg names} for every m.def in bindings.cpp."""
    declared = {}
    for chunk in re.split(r"m\.def\(", BINDINGS.read_text())[1:]:
        name = re.match(r'\s*"(\w+)"', chunk)
        if name:
            declared[name.group(1)] = sorted(re.findall(r'py::arg\("(\w+)"\)', chunk))
    return declared


class Recorder:
    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        def record(**arguments):
            self.calls[name] = sorted(arguments)

        return record


@pytest.fixture
def recorded(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(cuda, "extension", lambda: recorder)
    monkeypatch.setattr(cuda, "_stream", lambda device: 0)
    monkeypatch.setattr(cuda.torch.cuda, "device", lambda device: contextlib.nullcontext())
    return recorder


def test_every_cuda_call_matches_its_binding(recorded):
    prov = cuda.CudaProvider()
    B, T, V, N = 2, 5, 7, 3
    mask = torch.ones(B, T, dtype=torch.bool)

    def bt():
        return torch.randn(B, T)

    def rows():
        return torch.randn(N)

    logits, labels = torch.randn(N, V), torch.randint(0, V, (N,))
    prov.token_logprobs_forward(logits, labels, rows(), rows(), rows(), 1.0, -100)
    prov.token_logprobs_backward(logits, labels, rows(), rows(), rows(), rows(), torch.empty(N, V), 1.0, -100)
    prov.kl_rewards_forward(bt(), bt(), torch.randn(B), mask, bt(), 0.1, "k3")
    prov.gae_forward(bt(), bt(), mask, bt(), bt(), 1.0, 0.95)
    prov.gae_backward(bt(), bt(), mask, bt(), bt(), 1.0, 0.95)
    prov.whiten_forward(bt(), mask, bt(), True)
    prov.ppo_advantages_forward(bt(), bt(), torch.randn(B), bt(), mask, bt(), bt(), bt(), 0.1, "k1", 1.0, 0.95, True)
    prov.group_advantages_forward(torch.randn(4), torch.empty(4), 2, "grpo", 1e-6)

    declared = declared_arguments()
    assert len(recorded.calls) == 8
    for name, arguments in recorded.calls.items():
        assert name in declared, f"{name} is not bound in bindings.cpp"
        assert arguments == declared[name], f"{name}: passes {arguments}, binding declares {declared[name]}"
