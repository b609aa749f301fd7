"""Public functional ops: validate once, dispatch to a backend, autograd."""

from ..options import LinearOptions, PolicyLossOptions
from .advantages import PPOAdvantages, gae, group_advantages, ppo_advantages, whiten
from .aggregate import global_loss_normalizer, loss_normalizer
from .fused_linear_policy_loss import fused_linear_policy_loss
from .fused_policy_loss import fused_policy_loss
from .kl import kl_penalized_rewards, kl_penalty
from .linear_logprobs import linear_token_logprobs
from .linear_sft_loss import linear_sft_loss
from .pairwise_reward_loss import pairwise_reward_loss
from .policy_loss import policy_loss
from .sft_loss import sft_loss
from .token_logprobs import token_logprobs
from .value_loss import value_loss

__all__ = [
    "LinearOptions",
    "PPOAdvantages",
    "PolicyLossOptions",
    "fused_linear_policy_loss",
    "fused_policy_loss",
    "gae",
    "global_loss_normalizer",
    "group_advantages",
    "kl_penalized_rewards",
    "kl_penalty",
    "linear_sft_loss",
    "linear_token_logprobs",
    "loss_normalizer",
    "pairwise_reward_loss",
    "policy_loss",
    "ppo_advantages",
    "sft_loss",
    "token_logprobs",
    "value_loss",
    "whiten",
]
