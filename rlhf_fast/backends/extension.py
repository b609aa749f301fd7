"""What the "host" and "cuda" backends share: loading rlhf_fast._C, layout checks, and the op methods.

The extension is imported on first use, never at package import: rlhf_fast works without it, and
``available()`` then says why it is missing. Kernels get raw pointers (``tensor.data_ptr()``),
sizes, strides and dtype codes with the GIL released. Each kernel takes its params struct
(csrc/include/rlhf_fast/<op>.h, bound as ``_C.<Struct>``), filled once per call in the op method of
``ExtensionProvider``; a subclass only says which side's kernels run and how to launch them:
``_C.host.<kernel>(params, num_threads)`` or ``_C.cuda.<kernel>(params, stream)``.
"""

from __future__ import annotations

import functools
import importlib
import math
import struct
from collections.abc import Callable
from types import ModuleType

import torch

from .. import reference
from .base import BT_OPS, LOSS_OPS, TOKEN_OPS, YES, Provider, Support

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


def check_bt_layout(mask: torch.Tensor, scores: torch.Tensor | None = None, **tensors: torch.Tensor) -> None:
    """The [B, T] kernel contract of base.Provider, checked because the kernels take raw pointers:
    mask [B, T] bool, every other tensor [B, T] float32 (scores [B]), all contiguous on mask's device.

    Not user-input validation (rlhf_fast.ops does that): a violation here is a bug upstream.
    """
    if mask.dtype != torch.bool or mask.dim() != 2 or not mask.is_contiguous():
        raise ValueError(f"mask must be a contiguous [B, T] bool tensor; got shape {tuple(mask.shape)}, "
                         f"{mask.dtype}, strides {mask.stride()}")
    expected = {name: tuple(mask.shape) for name in tensors}
    if scores is not None:
        tensors = {**tensors, "scores": scores}
        expected["scores"] = (mask.shape[0],)
    for name, t in tensors.items():
        if (tuple(t.shape) != expected[name] or t.dtype != torch.float32 or not t.is_contiguous()
                or t.device != mask.device):
            raise ValueError(f"{name} must be contiguous {expected[name]} float32 on {mask.device}; got shape "
                             f"{tuple(t.shape)}, {t.dtype}, strides {t.stride()}, {t.device}")


def check_group_layout(scores: torch.Tensor, out: torch.Tensor, group_size: int) -> None:
    """group_advantages' contract: scores and out [B] float32 contiguous, B a multiple of group_size."""
    for name, t in (("scores", scores), ("out", out)):
        if t.dim() != 1 or t.dtype != torch.float32 or not t.is_contiguous() or t.device != scores.device:
            raise ValueError(f"{name} must be a contiguous [B] float32 tensor on {scores.device}; got shape "
                             f"{tuple(t.shape)}, {t.dtype}, {t.device}")
    if out.shape != scores.shape or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores {tuple(scores.shape)} and out {tuple(out.shape)} must match and hold whole "
                         f"groups of {group_size}")


def kl_estimator_code(estimator: str) -> int:
    return extension().KL_ESTIMATOR_CODES[estimator]


def kl_clamp_value(kl_clamp: float | None) -> float:
    """The params structs' kl_clamp: the clamp, or +inf for none (clamping at inf changes nothing)."""
    return math.inf if kl_clamp is None else float(kl_clamp)


def group_mode_code(mode: str) -> int:
    return extension().GROUP_MODE_CODES[mode]


def _float32(x: float) -> float:
    """x rounded to float32: sapo's tau is a float32 tensor in the spec, whatever the precision."""
    return struct.unpack("f", struct.pack("f", x))[0]


def ratio_bounds(options) -> tuple[float, float]:
    """(low, high) of the ratio for ppo and cispo, infinite where the objective has none: the rule
    of kernels/policy_epilogue.py's _ratio_bounds (not imported: that module imports Triton;
    tests/test_policy_epilogue.py checks the two agree)."""
    eps, eps_high = options.clip_eps, options.clip_eps_high
    if options.objective == "cispo":  # clip_eps None: no lower bound; no upper one when both are None
        high = eps_high if eps_high is not None else eps
        return (-math.inf if eps is None else 1 - eps), (math.inf if high is None else 1 + high)
    if eps is None:  # ppo's REINFORCE
        return -math.inf, math.inf
    return 1 - eps, 1 + (eps if eps_high is None else eps_high)


class ExtensionProvider(Provider):
    """The op methods of rlhf_fast._C's kernels, shared by the host and CUDA sides.

    An op method checks the layout and fills its kernel's params struct; a subclass names its
    side's kernels (``_kernels``) and runs one with what the side adds, threads or a stream (``_launch``).
    """

    # policy_epilogue: csrc/{host,cuda}/policy_epilogue, fused_policy_loss's gradient in one kernel.
    ops = TOKEN_OPS | BT_OPS | LOSS_OPS

    def _kernels(self) -> ModuleType:
        """rlhf_fast._C.host or rlhf_fast._C.cuda: a function per kernel, taking its params struct."""
        raise NotImplementedError

    def _launch(self, kernel: Callable, device: torch.device, p: object) -> None:
        raise NotImplementedError

    def _whiten_workspace(self, mask: torch.Tensor, needed: bool) -> torch.Tensor | None:
        """A workspace for the whitening kernels' per-row moments (none on the host)."""
        return None

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index, vocab_offset=0):
        check_rows_layout(logits, labels, logp=logp, entropy=entropy, lse=lse)
        if logits.shape[0] == 0:
            return
        p = extension().TokenLogprobsForwardParams(
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
            vocab_offset=int(vocab_offset),
        )
        self._launch(self._kernels().token_logprobs_forward, logits.device, p)

    def token_logprobs_backward(self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature,
                                ignore_index, vocab_offset=0, log_mass=None):  # fmt: skip
        if (entropy is None) != (grad_entropy is None):
            raise ValueError("entropy and grad_entropy must be both given or both None")
        check_rows_layout(logits, labels, grad_logits, lse=lse, entropy=entropy, grad_logp=grad_logp,
                          grad_entropy=grad_entropy, log_mass=log_mass)
        if logits.shape[0] == 0:
            return
        p = extension().TokenLogprobsBackwardParams(
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
            vocab_offset=int(vocab_offset),
            log_mass=_ptr(log_mass),
        )
        self._launch(self._kernels().token_logprobs_backward, logits.device, p)

    def policy_epilogue_forward(self, logits, labels, old_logp, advantages, pg_weight, weight, ref_logp, logp, entropy,
                                lse, grad_logp, grad_entropy, grad_logits, temperature, ignore_index, options,
                                entropy_coef):  # fmt: skip
        with_kl = ref_logp is not None and options.kl_coef != 0.0
        check_rows_layout(logits, labels, grad_logits, old_logp=old_logp, advantages=advantages, pg_weight=pg_weight,
                          weight=weight, ref_logp=ref_logp if with_kl else None, logp=logp, entropy=entropy, lse=lse,
                          grad_logp=grad_logp, grad_entropy=grad_entropy)  # fmt: skip
        if logits.shape[0] == 0:
            return
        low, high = ratio_bounds(options)
        estimator = options.kl_estimator
        p = extension().PolicyEpilogueParams(
            logits=logits.data_ptr(), labels=labels.data_ptr(), old_logp=old_logp.data_ptr(),
            advantages=advantages.data_ptr(), pg_weight=pg_weight.data_ptr(), weight=weight.data_ptr(),
            ref_logp=_ptr(ref_logp) if with_kl else 0, logp=logp.data_ptr(), entropy=entropy.data_ptr(),
            lse=lse.data_ptr(), grad_logp=grad_logp.data_ptr(), grad_entropy=grad_entropy.data_ptr(),
            grad_logits=grad_logits.data_ptr(), n_rows=logits.shape[0], vocab=logits.shape[1],
            logits_row_stride=logits.stride(0), grad_row_stride=grad_logits.stride(0),
            dtype=dtype_code(logits.dtype), labels_dtype=dtype_code(labels.dtype), temperature=float(temperature),
            ignore_index=int(ignore_index), objective=extension().POLICY_OBJECTIVE_CODES[options.objective],
            kl_estimator=kl_estimator_code(estimator.removesuffix("+")) if with_kl else -1,
            straight_through=with_kl and estimator.endswith("+"), clip_low=low, clip_high=high,
            dual_clip=math.inf if options.dual_clip is None else float(options.dual_clip),
            tau_pos=_float32(options.sapo_tau_pos), tau_neg=_float32(options.sapo_tau_neg),
            kl_coef=float(options.kl_coef), kl_clamp=kl_clamp_value(options.kl_clamp), entropy_coef=float(entropy_coef),
        )  # fmt: skip
        self._launch(self._kernels().policy_epilogue_forward, logits.device, p)

    # [B, T] ops (csrc/{host,cuda}/{kl_rewards,gae,whiten,group_advantages}): a row per thread or block.

    def kl_rewards_forward(self, logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp=None):
        check_bt_layout(mask, scores, logp=logp, ref_logp=ref_logp, rewards=rewards)
        if mask.numel() == 0:
            return
        p = extension().KlRewardsParams(
            logp=logp.data_ptr(), ref_logp=ref_logp.data_ptr(), scores=scores.data_ptr(), mask=mask.data_ptr(),
            rewards=rewards.data_ptr(), rows=mask.shape[0], tokens=mask.shape[1], beta=float(beta),
            estimator=kl_estimator_code(estimator), kl_clamp=kl_clamp_value(kl_clamp),
        )  # fmt: skip
        self._launch(self._kernels().kl_rewards_forward, mask.device, p)

    def gae_forward(self, rewards, values, mask, advantages, returns, gamma, lam):
        check_bt_layout(mask, rewards=rewards, values=values, advantages=advantages, returns=returns)
        if mask.numel() == 0:
            return
        p = extension().GaeForwardParams(
            rewards=rewards.data_ptr(), values=values.data_ptr(), mask=mask.data_ptr(),
            advantages=advantages.data_ptr(), returns=returns.data_ptr(), rows=mask.shape[0], tokens=mask.shape[1],
            gamma=float(gamma), lam=float(lam),
        )  # fmt: skip
        self._launch(self._kernels().gae_forward, mask.device, p)

    def gae_backward(self, grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam):
        check_bt_layout(mask, grad_advantages=grad_advantages, grad_returns=grad_returns, grad_rewards=grad_rewards,
                        grad_values=grad_values)
        if mask.numel() == 0:
            return
        p = extension().GaeBackwardParams(
            grad_advantages=grad_advantages.data_ptr(), grad_returns=grad_returns.data_ptr(), mask=mask.data_ptr(),
            grad_rewards=grad_rewards.data_ptr(), grad_values=grad_values.data_ptr(), rows=mask.shape[0],
            tokens=mask.shape[1], gamma=float(gamma), lam=float(lam),
        )  # fmt: skip
        self._launch(self._kernels().gae_backward, mask.device, p)

    def whiten_forward(self, x, mask, out, shift_mean, unbiased=True):
        check_bt_layout(mask, x=x, out=out)
        if mask.numel() == 0:
            return
        moments = self._whiten_workspace(mask, needed=True)
        p = extension().WhitenParams(
            x=x.data_ptr(), mask=mask.data_ptr(), out=out.data_ptr(), moments=_ptr(moments), rows=mask.shape[0],
            tokens=mask.shape[1], shift_mean=bool(shift_mean), unbiased=bool(unbiased), eps=reference.WHITEN_EPS,
        )  # fmt: skip
        self._launch(self._kernels().whiten_forward, mask.device, p)
        del moments  # alive until the launch is enqueued; the allocator orders its reuse on the stream

    def ppo_advantages_forward(
        self, logp, ref_logp, scores, values, mask, rewards, advantages, returns, beta, estimator, gamma, lam, whiten,
        kl_clamp=None, unbiased=True,
    ):  # fmt: skip
        check_bt_layout(mask, scores, logp=logp, ref_logp=ref_logp, values=values, rewards=rewards,
                        advantages=advantages, returns=returns)
        if mask.numel() == 0:
            return
        moments = self._whiten_workspace(mask, needed=whiten)
        p = extension().PpoAdvantagesParams(
            logp=logp.data_ptr(), ref_logp=ref_logp.data_ptr(), scores=scores.data_ptr(), values=values.data_ptr(),
            mask=mask.data_ptr(), rewards=rewards.data_ptr(), advantages=advantages.data_ptr(),
            returns=returns.data_ptr(), moments=_ptr(moments), rows=mask.shape[0], tokens=mask.shape[1],
            beta=float(beta), estimator=kl_estimator_code(estimator), kl_clamp=kl_clamp_value(kl_clamp),
            gamma=float(gamma), lam=float(lam), whiten=bool(whiten), whiten_unbiased=bool(unbiased),
            whiten_eps=reference.WHITEN_EPS,
        )  # fmt: skip
        self._launch(self._kernels().ppo_advantages_forward, mask.device, p)
        del moments

    def group_advantages_forward(self, scores, out, group_size, mode, eps):
        check_group_layout(scores, out, group_size)
        if scores.numel() == 0:
            return
        p = extension().GroupAdvantagesParams(
            scores=scores.data_ptr(), out=out.data_ptr(), groups=scores.shape[0] // group_size,
            group_size=int(group_size), mode=group_mode_code(mode), eps=float(eps),
        )  # fmt: skip
        self._launch(self._kernels().group_advantages_forward, scores.device, p)
