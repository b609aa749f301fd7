"""rlhf_fast: fused RLHF loss kernels (Triton, CUDA C++, host C++) with a PyTorch reference.

Importing the package has no side effects beyond registering the ``rlhf_fast::`` torch.library ops;
the compiled extension and Triton are loaded on first use.
"""

from . import hf, nn, reference
from ._validate import checking
from .backends import BackendUnavailable, explain, use_backend
from .ops import (
    LinearOptions,
    PolicyLossOptions,
    PPOAdvantages,
    fused_linear_policy_loss,
    fused_policy_loss,
    gae,
    global_loss_normalizer,
    group_advantages,
    kl_penalized_rewards,
    kl_penalty,
    linear_sft_loss,
    linear_token_logprobs,
    loss_normalizer,
    pairwise_reward_loss,
    policy_loss,
    ppo_advantages,
    sft_loss,
    token_logprobs,
    value_loss,
    whiten,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "LinearOptions",
    "PPOAdvantages",
    "PolicyLossOptions",
    "checking",
    "explain",
    "fused_linear_policy_loss",
    "fused_policy_loss",
    "gae",
    "global_loss_normalizer",
    "group_advantages",
    "hf",
    "kl_penalized_rewards",
    "kl_penalty",
    "linear_sft_loss",
    "linear_token_logprobs",
    "loss_normalizer",
    "nn",
    "pairwise_reward_loss",
    "policy_loss",
    "ppo_advantages",
    "reference",
    "sft_loss",
    "token_logprobs",
    "use_backend",
    "value_loss",
    "whiten",
]
