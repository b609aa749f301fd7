"""Shared test helpers: backends to test, norm-wise relative error, low-precision error budgets."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.backends.registry import BACKENDS, can_serve


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params():
    """(backend, device) pairs; those that cannot run here are skipped with the backend's reason."""
    params = []
    for device in devices():
        for name in BACKENDS:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


def require(backend: str, device: str, dtype: torch.dtype) -> None:
    support = can_serve(backend, torch.device(device), dtype)
    if not support:
        pytest.skip(f"{backend} on {device}/{dtype}: {support.reason}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, 0.01 sqrt(n)), in float64.

    The floor compares tensors whose entries are all below 0.01 (the entropy of a near one-hot
    distribution, say) absolutely rather than relatively to a norm that is almost zero.
    """
    actual, expected = actual.double().cpu(), expected.double().cpu()
    floor = 0.01 * max(expected.numel(), 1) ** 0.5
    return (actual - expected).norm().item() / max(expected.norm().item(), floor)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed against the float64 reference evaluated on the same input values."""
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]
