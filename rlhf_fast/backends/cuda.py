"""The "cuda" backend: the CUDA C++ kernels of rlhf_fast._C on CUDA tensors (float32, bfloat16, float16).

Kernels are enqueued on PyTorch's current stream of the tensors' device (passed as an integer
``cudaStream_t``), so they order with the surrounding PyTorch work and never synchronise. The
extension links the CUDA runtime statically; it shares the driver's primary context with PyTorch.
"""

from __future__ import annotations

import functools
import re

import torch

from .base import YES, Support
from .extension import ExtensionProvider, extension, extension_support

CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _runs_on(archs: list[str], major: int, minor: int) -> bool:
    """Whether code built for ``archs`` (["sm_80", "sm_90", "compute_90"]) runs on compute capability major.minor.

    A cubin runs on its own major version at an equal or higher minor ("a"/"f" cubins only on
    their exact version); PTX is compiled by the driver for any equal or newer GPU.
    """
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)([af]?)", arch)
        if m is None:
            continue
        kind, a_major, a_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
        if kind == "sm" and a_major == major and (a_minor == minor if suffix else a_minor <= minor):
            return True
    return False


@functools.cache
def _device_support(index: int) -> Support:
    archs = extension().build_info()["cuda_archs"]
    major, minor = torch.cuda.get_device_capability(index)
    if not _runs_on(archs, major, minor):
        return Support(False, f"rlhf_fast._C was built for {archs}, which cannot run on "
                       f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}); rebuild with "
                       f"RLHF_FAST_CUDA_ARCHS={major}{minor}")
    return YES


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaProvider(ExtensionProvider):
    name = "cuda"

    def available(self) -> Support:
        ext = extension_support()
        if not ext:
            return ext
        info = extension().build_info()
        if not info["cuda_built"]:
            return Support(False, f"rlhf_fast._C was built without CUDA: {info['reason_no_cuda']}")
        if not torch.cuda.is_available():
            return Support(False, "no CUDA device (torch.cuda.is_available() is False)")
        return YES

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        if device.type != "cuda":
            return Support(False, f"the cuda backend runs on CUDA tensors; got a {device.type} tensor")
        if dtype not in CUDA_DTYPES:
            return Support(False, f"the cuda backend supports logits of dtype {CUDA_DTYPES}; got {dtype}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_support(index)

    def _kernels(self):
        return extension().cuda

    def _launch(self, kernel, device, p):
        with torch.cuda.device(device):
            kernel(p, _stream(device))

    def _whiten_workspace(self, mask, needed):
        """[B, 3] float32 per-row moments, allocated on the current stream (no host synchronisation)."""
        return torch.empty(mask.shape[0], 3, dtype=torch.float32, device=mask.device) if needed else None
