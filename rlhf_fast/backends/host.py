"""The "host" backend: the C++ kernels of rlhf_fast._C on CPU tensors (float32, bfloat16, float16, float64).

The extension is imported on first use, never at package import: rlhf_fast works without it, and
``available()`` then says why it is missing. Kernels get raw pointers (``tensor.data_ptr()``),
sizes, strides and dtype codes, and run on ``torch.get_num_threads()`` threads with the GIL
released. The loader below is shared with the "cuda" backend (same module).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from .base import YES, Provider, Support

HOST_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("rlhf_fast._C"), ""
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def extension() -> ModuleType:
    """rlhf_fast._C, or ImportError with the reason it could not be loaded."""
    module, error = _load()
    if module is None:
        raise ImportError(f"rlhf_fast._C is not available ({error}); build it with `pip install -e .`")
    return module


def extension_support() -> Support:
    module, error = _load()
    if module is None:
        return Support(False, f"the rlhf_fast._C extension could not be imported ({error}); build it with "
                       "`pip install -e .`")
    return YES


@functools.cache
def _dtype_codes() -> dict[torch.dtype, int]:
    return {getattr(torch, name): code for name, code in extension().DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    return _dtype_codes()[dtype]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def check_rows_layout(logits: torch.Tensor, labels: torch.Tensor, grad_logits: torch.Tensor | None = None,
                      **rows: torch.Tensor | None) -> None:
    """The kernel-facing layout of base.Provider, checked because the kernels take raw pointers.

    Not user-input validation (rlhf_fast.ops does that): a violation here is a bug upstream.
    """
    n_rows, vocab = logits.shape
    if logits.stride(1) != 1 and vocab > 1:
        raise ValueError(f"logits must have stride(1) == 1; got strides {logits.stride()}")
    if labels.shape != (n_rows,) or not labels.is_contiguous():
        raise ValueError(f"labels must be contiguous [{n_rows}]; got shape {tuple(labels.shape)}, "
                         f"strides {labels.stride()}")
    if grad_logits is not None and (grad_logits.shape != logits.shape or grad_logits.dtype != logits.dtype
                                    or (grad_logits.stride(1) != 1 and vocab > 1)):
        raise ValueError(f"grad_logits must be {tuple(logits.shape)} {logits.dtype} with stride(1) == 1; got "
                         f"{tuple(grad_logits.shape)} {grad_logits.dtype}, strides {grad_logits.stride()}")
    row_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for name, t in rows.items():
        if t is not None and (t.shape != (n_rows,) or t.dtype != row_dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous [{n_rows}] {row_dtype}; got shape {tuple(t.shape)}, "
                             f"{t.dtype}, strides {t.stride()}")


class HostProvider(Provider):
    name = "host"

    def available(self) -> Support:
        return extension_support()

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        if device.type != "cpu":
            return Support(False, f"the host backend runs on CPU tensors; got a {device.type} tensor")
        if dtype not in HOST_DTYPES:
            return Support(False, f"the host backend supports logits of dtype {HOST_DTYPES}; got {dtype}")
        return YES

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index):
        check_rows_layout(logits, labels, logp=logp, entropy=entropy, lse=lse)
        if logits.shape[0] == 0:
            return
        extension().host_token_logprobs_forward(
            logits=logits.data_ptr(),
            labels=labels.data_ptr(),
            logp=logp.data_ptr(),
            entropy=_ptr(entropy),
            lse=lse.data_ptr(),
            n_rows=logits.shape[0],
            vocab=logits.shape[1],
            logits_row_stride=logits.stride(0),
            dtype=dtype_code(logits.dtype),
            labels_dtype=dtype_code(labels.dtype),
            temperature=float(temperature),
            ignore_index=int(ignore_index),
            num_threads=torch.get_num_threads(),
        )

    def token_logprobs_backward(
        self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature, ignore_index
    ):
        if (entropy is None) != (grad_entropy is None):
            raise ValueError("entropy and grad_entropy must be both given or both None")
        check_rows_layout(logits, labels, grad_logits, lse=lse, entropy=entropy, grad_logp=grad_logp,
                          grad_entropy=grad_entropy)
        if logits.shape[0] == 0:
            return
        extension().host_token_logprobs_backward(
            logits=logits.data_ptr(),
            labels=labels.data_ptr(),
            lse=lse.data_ptr(),
            entropy=_ptr(entropy),
            grad_logp=grad_logp.data_ptr(),
            grad_entropy=_ptr(grad_entropy),
            grad_logits=grad_logits.data_ptr(),
            n_rows=logits.shape[0],
            vocab=logits.shape[1],
            logits_row_stride=logits.stride(0),
            grad_row_stride=grad_logits.stride(0),
            dtype=dtype_code(logits.dtype),
            labels_dtype=dtype_code(labels.dtype),
            temperature=float(temperature),
            ignore_index=int(ignore_index),
            num_threads=torch.get_num_threads(),
        )
