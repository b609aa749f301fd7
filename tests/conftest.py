"""Test setup: Triton is interpreted on CPU-only machines; `gpu` tests run only where CUDA is."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is decorated (import of rlhf_fast.kernels.*).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, but a failure prints the seed that reproduces it."""
    seed = int.from_bytes(os.urandom(4), "little") if "RLHF_FAST_SEED" not in os.environ else int(os.environ["RLHF_FAST_SEED"])
    torch.manual_seed(seed)
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"seed: RLHF_FAST_SEED={seed}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
