"""What every backend provides: availability with a reason, and the kernels on flattened tensors.

The public ops in ``rlhf_fast.ops`` validate arguments once, flatten [..., V] to [N, V] (last dim
contiguous, any row stride) or convert [B, T] token tensors to float32, and call a provider
through this interface. Providers never validate user input; they only say whether they can
serve a call and why not. ``Provider.ops`` names the op families a provider has kernels for;
the registry skips (on "auto") or refuses (when named) a provider without the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Support:
    """Answer to "can you serve this?": ``ok`` and, when not, a reason a person can act on."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


YES = Support(True)

# Op families a provider may serve; ``Provider.ops`` lists the ones it has kernels for.
TOKEN_OPS = frozenset({"token_logprobs"})
# The [B, T] ops of PPO / GRPO: rewards, advantages, whitening (see the methods below).
BT_OPS = frozenset({"kl_rewards", "gae", "whiten", "ppo_advantages", "group_advantages"})
# fused_policy_loss's whole gradient in one kernel (``policy_epilogue_forward``): Triton, host and
# CUDA; the torch reference keeps the three-step path.
LOSS_OPS = frozenset({"policy_epilogue"})


class Provider:
    """One implementation of the fused ops (torch reference, host C++, CUDA C++ or Triton).

    Kernel-facing contract for token log-probs (all tensors on one device):
      logits   [N, V] float32/bfloat16/float16 (float64 where the provider supports it),
               stride(1) == 1, stride(0) >= V (any row stride)
      labels   [N] int64 or int32, contiguous; values in [0, V) or == ignore_index (checked upstream)
      logp, entropy, lse: [N] float32 contiguous (float64 when logits are float64)
      lse is the log-sum-exp of logits / temperature, saved for the backward; its value on
      ignored rows is unspecified (the backward zeroes those rows without reading it).
    """

    name: str = "?"
    ops: frozenset[str] = TOKEN_OPS

    def available(self) -> Support:
        """Whether this provider can run at all on this machine (import, build, device)."""
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype) -> Support:
        """Whether it serves tensors of this device and dtype (called only when available)."""
        raise NotImplementedError

    def supports_op(self, op: str) -> Support:
        """Whether this provider has a kernel for the op family ``op`` (a name in TOKEN_OPS | BT_OPS | LOSS_OPS)."""
        if op in self.ops:
            return YES
        return Support(False, f"the {self.name} backend has no {op} kernel")

    def token_logprobs_forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logp: torch.Tensor,
        entropy: torch.Tensor | None,
        lse: torch.Tensor,
        temperature: float,
        ignore_index: int,
        vocab_offset: int = 0,
    ) -> None:
        """Write logp, lse and (if given) entropy for every row. Ignored rows: logp = entropy = 0.

        ``vocab_offset``: the logits are the columns [vocab_offset, vocab_offset + V) of a larger
        vocabulary (a vocabulary-parallel shard; 0 for the whole vocabulary) and labels are ids of
        the whole one. lse and entropy are then the shard's own; a kept row whose label lies
        outside the shard gets logp = 0 (the label's owner supplies it; see ops/vocab_parallel.py).
        """
        raise NotImplementedError

    def token_logprobs_backward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor | None,
        grad_logp: torch.Tensor,
        grad_entropy: torch.Tensor | None,
        grad_logits: torch.Tensor,
        temperature: float,
        ignore_index: int,
        vocab_offset: int = 0,
        log_mass: torch.Tensor | None = None,
    ) -> None:
        """Write d(loss)/d(logits) into grad_logits ([N, V], logits' dtype, stride(1) == 1).

        grad_logits may be the logits tensor itself (in-place backward): read each element before
        writing it. With z = logits / T, p = softmax(z), log p = z - lse, H = entropy:
            d/dz_k = g_logp * (1[k == label] - p_k) - g_H * p_k * (log p_k + H)
            d/dlogits = d/dz / T; rows whose label is ignore_index get 0.
        ``entropy`` and ``grad_entropy`` are both given or both None.

        A vocabulary shard (``vocab_offset`` as in the forward): lse is the shard's own, as its
        forward wrote it, and ``log_mass`` [N] (lse's dtype) the log of the probability mass the
        shard holds of the whole vocabulary's softmax (<= 0), so that the whole-vocabulary
        log p_k = z_k - lse + log_mass; entropy is the whole vocabulary's. The one-hot term goes to
        column label - vocab_offset, on the rows whose label the shard owns. None: log_mass = 0.
        """
        raise NotImplementedError

    def policy_epilogue_forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        pg_weight: torch.Tensor,
        weight: torch.Tensor,
        ref_logp: torch.Tensor | None,
        logp: torch.Tensor,
        entropy: torch.Tensor,
        lse: torch.Tensor,
        grad_logp: torch.Tensor,
        grad_entropy: torch.Tensor,
        grad_logits: torch.Tensor,
        temperature: float,
        ignore_index: int,
        options,
        entropy_coef: float,
    ) -> None:
        """fused_policy_loss's forward and its logits' gradient in one kernel (op family
        "policy_epilogue"), for the separable objectives ``rlhf_fast.kernels.policy_epilogue``
        lists: per row, token_logprobs' forward (logp, entropy, lse, written as there), then

            g_logp_t = pg_weight_t * d objective_t / d logp_t
                       + weight_t * kl_coef * d kl_t / d logp_t     (when ref_logp is given and kl_coef != 0)
            g_H_t    = -entropy_coef * weight_t

        written to grad_logp and grad_entropy (0 on ignored rows), then token_logprobs' backward
        with those into grad_logits (which may be the logits themselves: read before write).

        logits, labels, logp, entropy, lse, grad_logits: as in token_logprobs_forward/backward
        (labels int64). old_logp, advantages, ref_logp: [N] float32 contiguous (float64 for
        float64 logits, as logp is), finite on kept rows. weight: [N] in the same dtype,
        d loss / d (per-token loss) of the options' aggregation (normaliser included); pg_weight:
        weight times the rollout correction's weight (or weight itself). On each side the
        per-token math is the same (kernels/policy_epilogue.py, csrc/include/rlhf_fast/policy_epilogue.h).
        ``options``: a PolicyLossOptions whose objective, clip_eps, clip_eps_high, dual_clip,
        sapo_tau_pos/neg, kl_coef, kl_estimator and kl_clamp the kernel reads; the caller sends
        only what the kernel computes exactly (not kl_is_correction, not top_entropy_quantile < 1).
        The formulas are those of rlhf_fast.objectives and rlhf_fast.kl_estimators under autograd.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # [B, T] ops. Kernel-facing contract (validated and converted upstream, in rlhf_fast.ops):
    #   every [B, T] tensor is float32 and contiguous, except mask: [B, T] bool, contiguous,
    #   True on the tokens that count; scores [B] float32. Outputs are preallocated by the caller
    #   and every element must be written (0 at masked positions). Inputs at masked positions may
    #   hold NaN or inf and must not reach any output. estimator is one of "k1", "k2", "k3",
    #   "abs"; the formulas are rlhf_fast.reference.kl_penalty's. Never called with B = 0 or T = 0.
    # ------------------------------------------------------------------------------------------

    def kl_rewards_forward(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        scores: torch.Tensor,
        mask: torch.Tensor,
        rewards: torch.Tensor,
        beta: float,
        estimator: str,
        kl_clamp: float | None = None,
    ) -> None:
        """Write rewards [B, T] = -beta * kl_penalty(logp, ref_logp) on valid tokens, 0 elsewhere,
        plus scores[b] at the last valid token of row b (an empty row stays all zeros). With
        ``kl_clamp`` (a finite float > 0) the KL is clamped to [-kl_clamp, kl_clamp] first
        (reference.kl_penalized_rewards); a NaN KL stays NaN."""
        raise NotImplementedError

    def gae_forward(
        self,
        rewards: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        gamma: float,
        lam: float,
    ) -> None:
        """Write advantages and returns [B, T] of reference.gae: per row, right to left over the
        valid tokens only, delta = r + gamma V_next - V, A = delta + gamma lam A_next, R = A + V,
        with V_next = A_next = 0 after the last valid token. T may be 32768 or more: a scan."""
        raise NotImplementedError

    def gae_backward(
        self,
        grad_advantages: torch.Tensor,
        grad_returns: torch.Tensor,
        mask: torch.Tensor,
        grad_rewards: torch.Tensor,
        grad_values: torch.Tensor,
        gamma: float,
        lam: float,
    ) -> None:
        """Write the gradients of rewards and values given those of advantages and returns: the
        left-to-right adjoint scan of reference.gae_scan_backward. grad_* inputs are [B, T]."""
        raise NotImplementedError

    def whiten_forward(
        self, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, shift_mean: bool, unbiased: bool = True
    ) -> None:
        """Write out [B, T] = reference.whiten(x, mask, shift_mean, unbiased): one mean and variance
        (sum of squares / (n - 1), or / n when not ``unbiased``) over all valid tokens of the
        batch, no host synchronisation. ``out`` may be ``x`` itself."""
        raise NotImplementedError

    def ppo_advantages_forward(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        scores: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        rewards: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        beta: float,
        estimator: str,
        gamma: float,
        lam: float,
        whiten: bool,
        kl_clamp: float | None = None,
        unbiased: bool = True,
    ) -> None:
        """The PPO advantage pipeline, fused where the provider can: write the KL-penalised rewards
        (KL clamped to [-kl_clamp, kl_clamp] when given), the GAE advantages (whitened over the
        batch when ``whiten``, with the unbiased or biased variance) and the returns (computed from
        the advantages before whitening). This default runs the three steps one after the other."""
        self.kl_rewards_forward(logp, ref_logp, scores, mask, rewards, beta, estimator, kl_clamp)
        self.gae_forward(rewards, values, mask, advantages, returns, gamma, lam)
        if whiten:
            self.whiten_forward(advantages, mask, advantages, True, unbiased)

    def group_advantages_forward(
        self, scores: torch.Tensor, out: torch.Tensor, group_size: int, mode: str, eps: float
    ) -> None:
        """Write out [B] = reference.group_advantages(scores [B], group_size, mode, eps), mode one of
        "grpo", "drgrpo", "rloo". A group of identical scores must give exactly 0: centre each
        group on its first member before summing (the mean of identical floats may not round back)."""
        raise NotImplementedError
