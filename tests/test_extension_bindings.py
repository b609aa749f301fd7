"""rlhf_fast._C's bindings match the kernels' params structs and the providers' calls, checked without a GPU.

A kernel's arguments are spelled in three places: its params struct (csrc/include/rlhf_fast/<op>.h),
the struct's binding (csrc/bindings.cpp) and the provider method that fills it
(rlhf_fast/backends/extension.py). Building a struct checks the names against the binding at run
time; here the binding is checked against the headers, and the CUDA provider's calls, which only
run on a GPU machine, are recorded on CPU tensors and checked against the kernels bindings.cpp
declares.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import pytest
import torch

from rlhf_fast.backends import cuda
from rlhf_fast.backends.extension import extension, extension_support
from rlhf_fast.options import PolicyLossOptions

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = ROOT / "csrc" / "bindings.cpp"
HEADERS = sorted((ROOT / "csrc" / "include" / "rlhf_fast").glob("*.h"))

pytestmark = pytest.mark.skipif(not extension_support(), reason="rlhf_fast._C is not built")


def header_structs() -> dict[str, list[str]]:
    """{struct: field names in order} for every `struct ...Params` in the kernel headers."""
    structs = {}
    for header in HEADERS:
        for name, body in re.findall(r"^struct (\w+Params) \{\n(.*?)^\};", header.read_text(), re.M | re.S):
            structs[name] = re.findall(r"^\s+(?:const\s+)?[\w:]+(?:\s*\*)?\s+(\w+);", body, re.M)
    return structs


def declared_kernels() -> set[str]:
    """Kernel names bound (under _C.host, and _C.cuda with CUDA) by RLHF_FAST_KERNEL in bindings.cpp."""
    return set(re.findall(r"^\s*RLHF_FAST_KERNEL\((\w+)\);", BINDINGS.read_text(), re.M))


def test_every_params_struct_is_bound_field_by_field():
    structs = header_structs()
    assert len(structs) == 9
    for name, fields in structs.items():
        bound = getattr(extension(), name)
        assert list(bound.fields) == fields, f"{name}: bindings.cpp binds {bound.fields}, the header has {fields}"


def test_params_are_built_from_every_field_by_name():
    fields = dict(logits=2**48 + 8, labels=16, logp=24, entropy=0, lse=32, n_rows=3, vocab=5, logits_row_stride=5,
                  dtype=0, labels_dtype=5, temperature=0.7, ignore_index=-100, vocab_offset=2**33)
    p = extension().TokenLogprobsForwardParams(**fields)
    assert {name: getattr(p, name) for name in fields} == fields
    with pytest.raises(TypeError, match="missing fields lse"):
        extension().TokenLogprobsForwardParams(**{k: v for k, v in fields.items() if k != "lse"})
    with pytest.raises(TypeError, match="has no field logit"):
        extension().TokenLogprobsForwardParams(**fields, logit=1)  # a misspelt field cannot pass silently
    with pytest.raises(TypeError, match="n_rows: cannot convert 3.5"):
        extension().TokenLogprobsForwardParams(**{**fields, "n_rows": 3.5})


class Recorder:
    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        def record(p, stream):
            self.calls[name] = (p, stream)

        return record


@pytest.fixture
def recorded(monkeypatch):
    recorder = Recorder()
    real = extension()

    class Extension:
        def __getattr__(self, name):
            return recorder if name == "cuda" else getattr(real, name)

    monkeypatch.setattr(cuda, "extension", Extension)
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
    log_mass = rows()
    prov.token_logprobs_backward(logits, labels, rows(), rows(), rows(), rows(), torch.empty(N, V), 1.0, -100,
                                 vocab_offset=2 * V, log_mass=log_mass)  # fmt: skip
    prov.kl_rewards_forward(bt(), bt(), torch.randn(B), mask, bt(), 0.1, "k3", 10.0)
    prov.gae_forward(bt(), bt(), mask, bt(), bt(), 1.0, 0.95)
    prov.gae_backward(bt(), bt(), mask, bt(), bt(), 1.0, 0.95)
    prov.whiten_forward(bt(), mask, bt(), True, False)
    prov.ppo_advantages_forward(bt(), bt(), torch.randn(B), bt(), mask, bt(), bt(), bt(), 0.1, "k1", 1.0, 0.95, True)
    prov.group_advantages_forward(torch.randn(4), torch.empty(4), 2, "grpo", 1e-6)
    options = PolicyLossOptions(objective="sapo", kl_coef=0.1, kl_estimator="k3+", kl_clamp=5.0)
    prov.policy_epilogue_forward(logits, labels, *(rows() for _ in range(4)), None, *(rows() for _ in range(5)),
                                 torch.empty(N, V), 1.0, -100, options, 0.01)  # fmt: skip

    assert len(recorded.calls) == 9 and set(recorded.calls) == declared_kernels()
    for name, (p, stream) in recorded.calls.items():
        # Both sides are bound from one list: the host twin's signature names the struct the kernel takes.
        signature = getattr(extension().host, name).__doc__
        assert f"params: rlhf_fast._C.{type(p).__name__}," in signature, f"{name} takes {signature}"
        assert isinstance(stream, int)
    whiten, ppo = recorded.calls["whiten_forward"][0], recorded.calls["ppo_advantages_forward"][0]
    assert whiten.moments != 0 and ppo.moments != 0  # CUDA whitening gets its workspace
    # The options reach the struct: a clamp, or +inf for none; the whitening's variance.
    assert recorded.calls["kl_rewards_forward"][0].kl_clamp == 10.0 and ppo.kl_clamp == math.inf
    assert not whiten.unbiased and ppo.whiten_unbiased
    # A vocabulary shard's offset and log_mass; the forward's offset defaults to the whole vocabulary's 0.
    backward = recorded.calls["token_logprobs_backward"][0]
    assert backward.vocab_offset == 2 * V and backward.log_mass == log_mass.data_ptr()
    assert recorded.calls["token_logprobs_forward"][0].vocab_offset == 0
    # No ref_logp: no KL term (-1), whatever the options say; sapo's tau as float32 values.
    epilogue = recorded.calls["policy_epilogue_forward"][0]
    assert epilogue.kl_estimator == -1 and epilogue.ref_logp == 0 and not epilogue.straight_through
    assert epilogue.objective == extension().POLICY_OBJECTIVE_CODES["sapo"] and epilogue.entropy_coef == 0.01
    assert epilogue.tau_neg == torch.tensor(options.sapo_tau_neg, dtype=torch.float32).item()
