"""What is installed and which backends can run here, with the reason when one cannot."""

from __future__ import annotations

import platform

import torch

from .backends.registry import BACKENDS, can_serve


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def _extension_summary() -> str:
    try:
        from . import _C
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    info = _C.build_info()
    if info.get("cuda_built"):
        return f"built with CUDA {info.get('cuda_version')} for {info.get('cuda_archs')}"
    return f"host C++ only ({info.get('reason_no_cuda')})"


def print_info() -> None:
    from . import __version__

    print(f"rlhf_fast {__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton    {_triton_version()}")
    print(f"extension {_extension_summary()}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"GPU       {gpu}")
    print()
    for device in [torch.device("cpu"), torch.device("cuda")]:
        print(f"backends on {device.type} (float32 / bfloat16):")
        for name in BACKENDS:
            f32, bf16 = can_serve(name, device, torch.float32), can_serve(name, device, torch.bfloat16)
            status = "yes" if f32 and bf16 else ("float32 only" if f32 else "no")
            reason = "" if f32 else f"  - {f32.reason}"
            print(f"  {name:<7}{status}{reason}")
