"""The Triton provider: kernels/token_logprobs.py on CUDA tensors (or interpreted on CPU).

Triton is imported only when the provider is asked whether it is available or used, so the
package imports on machines without it.
"""

from __future__ import annotations

import os

import torch

from rlhf_fast.backends.base import BT_OPS, LOSS_OPS, TOKEN_OPS, YES, Provider, Support

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels():
    from rlhf_fast.kernels import token_logprobs

    return token_logprobs


class TritonProvider(Provider):
    """Fused Triton kernels: one read of the logits forward, one read and one write backward."""

    name = "triton"
    # [B, T] ops: kernels/rewards.py, gae.py, whiten.py, group_advantages.py. The ops hand them
    # float32 tensors (supports() sees float32), so the dtype rules below are unchanged.
    # policy_epilogue: kernels/policy_epilogue.py, fused_policy_loss's gradient in one kernel.
    ops = TOKEN_OPS | BT_OPS | LOSS_OPS

    def available(self) -> Support:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as error:  # ImportError, or a broken install raising anything else
            return Support(False, f"triton cannot be imported: {type(error).__name__}: {error}")
        return YES

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        device = torch.device(device)
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return Support(
                    False, "Triton runs on CUDA tensors; set TRITON_INTERPRET=1 to interpret it on CPU"
                )
        elif device.type != "cuda":
            return Support(False, f"Triton runs on CUDA tensors, got a tensor on {device}")
        if dtype == torch.float64:
            return Support(
                False,
                "the Triton kernels take float32/bfloat16/float16 logits, not float64; "
                "use the torch or host C++ provider for float64",
            )
        if dtype not in _DTYPES:
            return Support(False, f"the Triton kernels take float32/bfloat16/float16 logits, got {dtype}")
        return YES

    def token_logprobs_forward(self, logits, labels, logp, entropy, lse, temperature, ignore_index, vocab_offset=0):
        _kernels().token_logprobs_forward(logits, labels, logp, entropy, lse, temperature, ignore_index, vocab_offset)

    def token_logprobs_backward(self, logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, temperature,
                                ignore_index, vocab_offset=0, log_mass=None):  # fmt: skip
        _kernels().token_logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits,
                                           temperature, ignore_index, vocab_offset, log_mass)  # fmt: skip

    def policy_epilogue_forward(self, logits, labels, old_logp, advantages, pg_weight, weight, ref_logp, logp, entropy,
                                lse, grad_logp, grad_entropy, grad_logits, temperature, ignore_index, options,
                                entropy_coef):  # fmt: skip
        from rlhf_fast.kernels.policy_epilogue import policy_epilogue_forward

        policy_epilogue_forward(logits, labels, old_logp, advantages, pg_weight, weight, ref_logp, logp, entropy, lse,
                                grad_logp, grad_entropy, grad_logits, temperature, ignore_index, options,
                                entropy_coef)  # fmt: skip

    def kl_rewards_forward(self, logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp=None):
        from rlhf_fast.kernels.rewards import kl_rewards_forward

        kl_rewards_forward(logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp)

    def gae_forward(self, rewards, values, mask, advantages, returns, gamma, lam):
        from rlhf_fast.kernels.gae import gae_forward

        gae_forward(rewards, values, mask, advantages, returns, gamma, lam)

    def gae_backward(self, grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam):
        from rlhf_fast.kernels.gae import gae_backward

        gae_backward(grad_advantages, grad_returns, mask, grad_rewards, grad_values, gamma, lam)

    def whiten_forward(self, x, mask, out, shift_mean, unbiased=True):
        from rlhf_fast.kernels.whiten import whiten_forward

        whiten_forward(x, mask, out, shift_mean, unbiased)

    def ppo_advantages_forward(
        self, logp, ref_logp, scores, values, mask, rewards, advantages, returns, beta, estimator, gamma, lam, whiten,
        kl_clamp=None, unbiased=True,
    ):  # fmt: skip
        from rlhf_fast.kernels.gae import ppo_advantages_forward

        ppo_advantages_forward(
            logp, ref_logp, scores, values, mask, rewards, advantages, returns, beta, estimator, gamma, lam, whiten,
            kl_clamp, unbiased,
        )  # fmt: skip

    def group_advantages_forward(self, scores, out, group_size, mode, eps):
        from rlhf_fast.kernels.group_advantages import group_advantages_forward

        group_advantages_forward(scores, out, group_size, mode, eps)
