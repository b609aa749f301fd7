"""Which implementation runs: a registry of providers, resolved lazily, that explains its choices.

Backend names: "triton", "cuda", "host" (CPU C++), "torch" (reference) and "auto". An explicit
backend that cannot serve a call raises ``BackendUnavailable`` with the provider's reason; "auto"
walks a preference order for the device and can tell why it skipped each candidate (``explain``).
The default backend comes from ``RLHF_FAST_BACKEND`` or the ``use_backend`` context manager.
"""

from __future__ import annotations

import contextlib
import os
import threading
from functools import cache

import torch

from ..choices import BACKEND_CHOICES as CHOICES
from ..choices import BACKENDS
from .base import Provider, Support

# "auto" order per device type. On CUDA the measured faster kernel comes first: see
# bench/results/ (token log-probs, bf16 [16384 x 128256], H100).
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("host", "torch"),
}
DEFAULT_AUTO_ORDER = ("torch",)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve the call; the message says why."""


@cache
def provider(name: str) -> Provider:
    """The provider object for one backend name (imported on first use)."""
    if name == "torch":
        from .torch_ref import TorchProvider

        return TorchProvider()
    if name == "host":
        from .host import HostProvider

        return HostProvider()
    if name == "cuda":
        from .cuda import CudaProvider

        return CudaProvider()
    if name == "triton":
        from .triton import TritonProvider

        return TritonProvider()
    raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")


def check_backend_name(name: str, arg: str = "backend") -> str:
    if name not in CHOICES:
        raise ValueError(f"{arg} must be one of {CHOICES}, got {name!r}")
    return name


_local = threading.local()


def default_backend() -> str:
    """The backend used when an op is called with backend="auto": context, then env, then "auto"."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    return check_backend_name(os.environ.get("RLHF_FAST_BACKEND", "auto"), "RLHF_FAST_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this block with ``name`` as the default backend (per thread)."""
    check_backend_name(name)
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def can_serve(name: str, device: torch.device, dtype: torch.dtype, op: str = "token_logprobs") -> Support:
    """Whether backend ``name`` can run op family ``op`` here on tensors of this device and dtype, and why not."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return Support(False, "no CUDA device (torch.cuda.is_available() is False)")
    try:
        prov = provider(name)
        ready = prov.available()
    except Exception as exc:  # an import error of an optional dependency is a reason, not a crash
        return Support(False, f"{type(exc).__name__}: {exc}")
    if not ready:
        return ready
    has_op = prov.supports_op(op)
    if not has_op:
        return has_op
    return prov.supports(device, dtype)


def explain(device: torch.device | str, dtype: torch.dtype, op: str = "token_logprobs") -> dict[str, Support]:
    """For each backend, whether it can serve ``op`` on (device, dtype) and the reason when not."""
    device = torch.device(device)
    return {name: can_serve(name, device, dtype, op) for name in BACKENDS}


def resolve(name: str, device: torch.device, dtype: torch.dtype, op: str = "token_logprobs") -> Provider:
    """The provider that runs a call: the requested one (or an error saying why it cannot), or auto's pick.

    ``op`` names the op family (``base.TOKEN_OPS | base.BT_OPS``): "auto" skips providers without
    a kernel for it, down to the torch reference, which has them all. The answer is cached per
    (backend setting, device type, dtype, op): the ops resolve on every forward and backward.
    """
    if name == "auto":
        name = default_backend()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # changes what Triton can serve on CPU
    return _resolve(name, torch.device(device).type, dtype, op, interpret)


@cache
def _resolve(name: str, device_type: str, dtype: torch.dtype, op: str, interpret: bool) -> Provider:
    device = torch.device(device_type)
    if name != "auto":
        support = can_serve(name, device, dtype, op)
        if not support:
            raise BackendUnavailable(
                f"backend {name!r} cannot run {op} on {device.type} tensors of dtype {dtype}: {support.reason}"
            )
        return provider(name)
    for candidate in AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER):
        if can_serve(candidate, device, dtype, op):
            return provider(candidate)
    return provider("torch")
