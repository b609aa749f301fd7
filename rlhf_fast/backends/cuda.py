"""The "cuda" backend: the CUDA C++ kernels of rlhf_fast._C on CUDA tensors (float32, bfloat16, float16).

Kernels are enqueued on PyTorch's current stream of the tensors' device (passed as an integer
``cudaStream_t``), so they order with the surrounding PyTorch work and never synchronise. The
extension links the CUDA runtime statically; it shares the driver's primary context with PyTorch.
"""

from __future__ import annotations

import functools
import re

import torch

from .. import reference
from .base import BT_OPS, TOKEN_OPS, YES, Provider, Support
from .host import (
    _ptr,
    check_bt_layout,
    check_group_layout,
    check_rows_layout,
    dtype_code,
    extension,
    extension_support,
    group_mode_code,
    kl_estimator_code,
)

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


class CudaProvider(Provider):
    name = "cuda"
    ops = TOKEN_OPS | BT_OPS

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

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index):
        check_rows_layout(logits, labels, logp=logp, entropy=entropy, lse=lse)
        if logits.shape[0] == 0:
            return
        with torch.cuda.device(logits.device):
            extension().cuda_token_logprobs_forward(
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
                stream=_stream(logits.device),
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
        with torch.cuda.device(logits.device):
            extension().cuda_token_logprobs_backward(
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
                stream=_stream(logits.device),
            )

    # [B, T] ops (csrc/cuda/{kl_rewards,gae,whiten,group_advantages}.cu): a block per row, enqueued
    # on the current stream. Whitening takes a [B, 3] float32 workspace of per-row moments, allocated
    # here on the same stream (no host synchronisation).

    def kl_rewards_forward(self, logp, ref_logp, scores, mask, rewards, beta, estimator):
        check_bt_layout(mask, scores, logp=logp, ref_logp=ref_logp, rewards=rewards)
        if mask.numel() == 0:
            return
        with torch.cuda.device(mask.device):
            extension().cuda_kl_rewards_forward(
                logp=logp.data_ptr(), ref_logp=ref_logp.data_ptr(), scores=scores.data_ptr(), mask=mask.data_ptr(),
                rewards=rewards.data_ptr(), rows=mask.shape[0], tokens=mask.shape[1], beta=float(beta),
                estimator=kl_estimator_code(estimator), stream=_stream(mask.device),
            )  # fmt: skip

    def gae_forward(self, rewards, values, mask, advantages, returns, gamma, lam):
        check_bt_layout(mask, rewards=rewards, values=values, advantages=advantages, returns=returns)
        if mask.numel() == 0:
            return
        with torch.cuda.device(mask.device):
            extension().cuda_gae_forward(
                rewards=rewards.data_ptr(), values=values.data_ptr(), mask=mask.data_ptr(),
                advantages=advantages.data_ptr(), returns=returns.data_ptr(), rows=mask.shape[0],
                tokens=mask.shape[1], gamma=float(gamma), lam=float(lam), stream=_stream(mask.device),
            )  # fmt: skip

    def gae_backward(self, grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam):
        check_bt_layout(mask, grad_advantages=grad_advantages, grad_returns=grad_returns, grad_rewards=grad_rewards,
                        grad_values=grad_values)
        if mask.numel() == 0:
            return
        with torch.cuda.device(mask.device):
            extension().cuda_gae_backward(
                grad_advantages=grad_advantages.data_ptr(), grad_returns=grad_returns.data_ptr(),
                mask=mask.data_ptr(), grad_rewards=grad_rewards.data_ptr(), grad_values=grad_values.data_ptr(),
                rows=mask.shape[0], tokens=mask.shape[1], gamma=float(gamma), lam=float(lam),
                stream=_stream(mask.device),
            )  # fmt: skip

    def whiten_forward(self, x, mask, out, shift_mean):
        check_bt_layout(mask, x=x, out=out)
        if mask.numel() == 0:
            return
        with torch.cuda.device(mask.device):
            moments = torch.empty(mask.shape[0], 3, dtype=torch.float32, device=mask.device)
            extension().cuda_whiten_forward(
                x=x.data_ptr(), mask=mask.data_ptr(), out=out.data_ptr(), moments=moments.data_ptr(),
                rows=mask.shape[0], tokens=mask.shape[1], shift_mean=bool(shift_mean), eps=reference.WHITEN_EPS,
                stream=_stream(mask.device),
            )  # fmt: skip

    def ppo_advantages_forward(
        self, logp, ref_logp, scores, values, mask, rewards, advantages, returns, beta, estimator, gamma, lam, whiten
    ):
        check_bt_layout(mask, scores, logp=logp, ref_logp=ref_logp, values=values, rewards=rewards,
                        advantages=advantages, returns=returns)
        if mask.numel() == 0:
            return
        with torch.cuda.device(mask.device):
            moments = torch.empty(mask.shape[0], 3, dtype=torch.float32, device=mask.device) if whiten else None
            extension().cuda_ppo_advantages_forward(
                logp=logp.data_ptr(), ref_logp=ref_logp.data_ptr(), scores=scores.data_ptr(),
                values=values.data_ptr(), mask=mask.data_ptr(), rewards=rewards.data_ptr(),
                advantages=advantages.data_ptr(), returns=returns.data_ptr(), moments=_ptr(moments),
                rows=mask.shape[0], tokens=mask.shape[1], beta=float(beta), estimator=kl_estimator_code(estimator),
                gamma=float(gamma), lam=float(lam), whiten=bool(whiten), whiten_eps=reference.WHITEN_EPS,
                stream=_stream(mask.device),
            )  # fmt: skip

    def group_advantages_forward(self, scores, out, group_size, mode, eps):
        check_group_layout(scores, out, group_size)
        if scores.numel() == 0:
            return
        with torch.cuda.device(scores.device):
            extension().cuda_group_advantages_forward(
                scores=scores.data_ptr(), out=out.data_ptr(), groups=scores.shape[0] // group_size,
                group_size=int(group_size), mode=group_mode_code(mode), eps=float(eps),
                stream=_stream(scores.device),
            )  # fmt: skip
