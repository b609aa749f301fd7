"""The "host" backend: the C++ kernels of rlhf_fast._C on CPU tensors (float32, bfloat16, float16, float64).

Kernels run on ``torch.get_num_threads()`` threads (rows split between them) with the GIL released.
The params structs are filled in ``extension.py``, shared with the "cuda" backend.
"""

from __future__ import annotations

import torch

from .base import YES, Support
from .extension import ExtensionProvider, extension, extension_support

HOST_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class HostProvider(ExtensionProvider):
    name = "host"

    def available(self) -> Support:
        return extension_support()

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        if device.type != "cpu":
            return Support(False, f"the host backend runs on CPU tensors; got a {device.type} tensor")
        if dtype not in HOST_DTYPES:
            return Support(False, f"the host backend supports logits of dtype {HOST_DTYPES}; got {dtype}")
        return YES

    def _kernels(self):
        return extension().host

    def _launch(self, kernel, device, p):
        kernel(p, torch.get_num_threads())
