"""verl entry point: rlhf_fast's objectives, advantage estimators and log-prob kernels in verl's
registries, called by verl's own trainer and actor.

    import rlhf_fast.integrations.verl as rf_verl
    rf_verl.register()     # in the process that builds the actor (before its engine), and in the driver

then, in the verl config, prefix the loss mode or the estimator with ``rlhf_fast_``::

    actor_rollout_ref.actor.policy_loss.loss_mode=rlhf_fast_vanilla      # or rlhf_fast_gspo, ...
    algorithm.adv_estimator=rlhf_fast_grpo                               # or rlhf_fast_rloo, ...

``register()`` adds, under names of their own, one policy loss per verl loss mode that rlhf_fast
has an objective for (``POLICY_LOSSES``: vanilla -> ppo, gspo -> gspo_token, geo_mean -> gmpo,
cispo, sapo, gpg, clip_cov, kl_cov; plus ``rlhf_fast_gspo_sequence``, GSPO's sequence-level
form, which verl lacks), and one advantage estimator per verl estimator it has
(``ADVANTAGE_ESTIMATORS``). Each takes verl's arguments and config (clip_ratio, clip_ratio_low /
high, clip_ratio_c, loss_agg_mode with the global batch info, tau_pos / tau_neg, the Cov options,
norm_adv_by_std_in_grpo, gamma, lam, the rollout IS weights) and returns what verl's built-in
returns, metrics included. It also puts ``rlhf_fast.token_logprobs`` in place of verl's
per-token log-prob and entropy functions (``verl.utils.torch_functional.logprobs_from_logits``,
``entropy_from_logits``, ``entropy_from_logits_with_chunking``, in every verl module that
imported them) and ``rlhf_fast.linear_token_logprobs`` in place of the lm_head-fused path that
``actor_rollout_ref.model.use_fused_kernels=True`` takes (``FusedLinearForPPO`` for
``fused_kernel_options.impl_backend=torch``, ``linear_cross_entropy`` for ``triton``).

verl's trainer calls GAE only under the name "gae" (only then does it build a critic and pass
the values), so ``rlhf_fast_gae`` serves callers of the registry; ``register(replace_gae=True)``
also puts it in place of verl's ``compute_gae_advantage_return``, which the trainer calls for
``algorithm.adv_estimator=gae``.

What differs from verl's built-ins, on purpose:
- log-probs and entropies come back in float32 whatever the logits' dtype.
- rlhf_fast_clip_cov detaches the selected tokens' terms (rlhf_fast.objectives.clip_cov): the
  gradient is verl's, the loss value keeps those tokens' terms where verl's zeroes them.
- advantages and returns are 0 at masked positions (verl's GAE, ReMax and GRPO-pass@k leave
  values there that no loss reads).
- vanilla does not clamp the log-ratio to [-20, 20] before exp(), nor gspo the sequence's
  log-ratio at 10: the results agree below those bounds, and the gradient stays finite beyond
  them (rlhf_fast.objectives.ppo). sapo clamps, as verl's does; cispo's clipped weight is the same either way.
- verl's rloo_vectorized gives a lone response of its uid 0, its rloo the score: rlhf_fast_rloo is rloo.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import _validate as check
from ..choices import AGG_MODES
from ..ops.advantages import gae, group_advantages, whiten
from ..ops.linear_logprobs import linear_token_logprobs
from ..ops.policy_loss import policy_loss_with_options, validate_inputs
from ..ops.token_logprobs import token_logprobs
from ..options import PolicyLossOptions
from ..rollout_correction import Correction
from . import check_version

TESTED = "0.9.1"
SUPPORTED = ("0.9", "0.10")  # [lo, hi): the releases whose core_algos / torch_functional this mirrors
PREFIX = "rlhf_fast_"


def check_verl_version() -> str:
    """The installed verl version; warns ``UntestedVersionWarning`` outside SUPPORTED. ImportError if absent."""
    return check_version("verl", TESTED, *SUPPORTED)


# ---------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossMode:
    """How one verl loss mode maps onto an rlhf_fast objective, and which metrics verl's own
    function reports (verl name -> where the value comes from: a stat of ours, "zero", or the
    mean old-vs-new log-ratio "k1" / "k1_clamped" (clamped to [-20, 20] first, as verl does) /
    "abs_log_ratio")."""

    objective: str
    metrics: dict[str, str]
    clip: bool = True  # reads clip_ratio / clip_ratio_low / clip_ratio_high
    agg: str | None = None  # the mode verl forces whatever loss_agg_mode says (None: loss_agg_mode)


_CLIP_METRICS = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "k1_clamped", "actor/pg_clipfrac_lower": "zero"}
POLICY_LOSSES: dict[str, LossMode] = {
    "vanilla": LossMode("ppo", _CLIP_METRICS | {"actor/pg_clipfrac_lower": "dual_clipfrac"}),
    "gspo": LossMode("gspo_token", _CLIP_METRICS | {"actor/ppo_kl": "k1"}),
    "gspo_sequence": LossMode("gspo", _CLIP_METRICS | {"actor/ppo_kl": "k1"}),
    "cispo": LossMode("cispo", _CLIP_METRICS),
    "sapo": LossMode("sapo", _CLIP_METRICS | {"actor/pg_clipfrac": "zero"}, clip=False, agg="seq-mean-token-mean"),
    "gpg": LossMode("gpg", {}, clip=False),
    "clip_cov": LossMode("clip_cov", {"actor/pg_clipfrac": "cov_selected_frac", "actor/ppo_kl": "k1"}),
    "kl_cov": LossMode("kl_cov", {"actor/ppo_kl": "abs_log_ratio"}, clip=False),
    "geo_mean": LossMode("gmpo", _CLIP_METRICS | {"actor/ppo_kl": "k1", "actor/pg_clipfrac_lower": "clipfrac_lower"},
                         agg="seq-mean-token-mean"),
}  # fmt: skip


def _field(config, name, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def options_from_config(mode: str, config, loss_agg_mode: str) -> PolicyLossOptions:
    """The ``PolicyLossOptions`` of verl loss mode ``mode`` under verl's actor ``config``
    (``ActorConfig`` or its DictConfig). An invalid value raises ValueError naming verl's option."""
    spec = POLICY_LOSSES[mode]
    if config is None:
        raise ValueError(f"{PREFIX}{mode}: needs verl's actor config (config=None)")
    if type(config).__name__ == "AlgoConfig":
        raise TypeError(f"{PREFIX}{mode}: got the algorithm config; pass the actor config, as verl's actor does")
    agg = spec.agg or loss_agg_mode
    if agg not in AGG_MODES:
        raise ValueError(f"{PREFIX}{mode}: loss_agg_mode={loss_agg_mode!r} is not one of {', '.join(AGG_MODES)}")
    given = {"objective": spec.objective, "agg": agg}  # ours -> value
    names = {}  # ours -> verl's option name
    if spec.clip:
        clip_ratio = _field(config, "clip_ratio", 0.2)
        given["clip_eps"] = _field(config, "clip_ratio_low", clip_ratio)
        given["clip_eps_high"] = _field(config, "clip_ratio_high", clip_ratio)
        names |= {"clip_eps": "clip_ratio_low (or clip_ratio)", "clip_eps_high": "clip_ratio_high (or clip_ratio)"}
    if mode == "vanilla":
        given["dual_clip"] = _field(config, "clip_ratio_c", 3.0)
        names["dual_clip"] = "clip_ratio_c"
    policy_loss = _field(config, "policy_loss", {})
    if mode == "sapo":
        given |= {"sapo_tau_pos": _field(config, "tau_pos", 1.0), "sapo_tau_neg": _field(config, "tau_neg", 1.05)}
        names |= {"sapo_tau_pos": "tau_pos", "sapo_tau_neg": "tau_neg"}
    elif mode == "clip_cov":
        given |= {"cov_ratio": _field(policy_loss, "clip_cov_ratio", 2e-4),
                  "clip_cov_lb": _field(policy_loss, "clip_cov_lb", 1.0), "clip_cov_ub": _field(policy_loss, "clip_cov_ub", 5.0)}
        names |= {"cov_ratio": "policy_loss.clip_cov_ratio", "clip_cov_lb": "policy_loss.clip_cov_lb",
                  "clip_cov_ub": "policy_loss.clip_cov_ub"}  # fmt: skip
    elif mode == "kl_cov":
        given |= {"cov_ratio": _field(policy_loss, "kl_cov_ratio", 2e-4), "kl_cov_coef": _field(policy_loss, "ppo_kl_coef", 1.0)}
        names |= {"cov_ratio": "policy_loss.kl_cov_ratio", "kl_cov_coef": "policy_loss.ppo_kl_coef"}
    try:
        return PolicyLossOptions(**given)
    except (TypeError, ValueError) as error:
        named = [f"{verl}={given[ours]!r}" for ours, verl in names.items() if ours in str(error)]
        raise ValueError(f"{PREFIX}{mode}: verl option {', '.join(named) or '(see below)'} is not supported: {error}") from None


def loss_normalizer(mask: torch.Tensor, agg: str, global_batch_info: dict):
    """What verl's ``agg_loss`` divides by, under its global batch info (dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor): the micro-batch losses of all ranks then add up as verl's."""
    info = global_batch_info or {}
    dp_size = info.get("dp_size") or 1
    if agg == "token-sum":
        return 1.0 / dp_size
    if agg == "token-mean":
        count = info.get("batch_num_tokens")
        if count is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            count = mask.sum().clamp(min=1)
        return count / dp_size
    rows = info.get("global_batch_size")
    if rows is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        rows = mask.any(dim=-1).sum().clamp(min=1)  # verl counts the rows with a valid token
    normalizer = rows / dp_size
    if agg == "seq-mean-token-sum-norm":
        factor = info.get("loss_scale_factor")
        normalizer = normalizer * (mask.shape[-1] if factor is None else factor)
    return normalizer


def _metric(source: str, stats: dict, log_ratio: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum().clamp(min=1)
    if source == "zero":
        return 0.0
    if source == "k1":
        return (torch.where(mask, -log_ratio, 0.0).sum() / count).item()
    if source == "k1_clamped":
        return (torch.where(mask, -log_ratio.clamp(-20.0, 20.0), 0.0).sum() / count).item()
    if source == "abs_log_ratio":
        return (torch.where(mask, log_ratio.abs(), 0.0).sum() / count).item()
    return stats[source].item()


def _make_policy_loss(mode: str) -> Callable:
    spec = POLICY_LOSSES[mode]

    def policy_loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        options = options_from_config(mode, config, loss_agg_mode)
        mask = validate_inputs(log_prob, old_log_prob, advantages, response_mask, None, logp_name="log_prob").mask
        weights = None
        if rollout_is_weights is not None:
            check.tensor("rollout_is_weights", rollout_is_weights, dtypes=check.FLOAT_DTYPES, shape=mask.shape,
                         like=("log_prob", log_prob))  # fmt: skip
            weights = torch.where(mask, rollout_is_weights.detach().float(), 0.0)
            if spec.objective == "gmpo":
                # verl's geo_mean weighs a response by the geometric mean of its tokens' weights.
                count = mask.sum(-1, keepdim=True)
                log_w = torch.where(mask, torch.log(weights + 1e-10), 0.0).sum(-1, keepdim=True) / (count + 1e-8)
                weights = torch.where(mask, torch.exp(log_w), 0.0)
        if spec.objective == "gmpo":
            normalizer = max(mask.shape[0], 1)  # verl's geo_mean: the mean over all rows, global info unused
        else:
            normalizer = loss_normalizer(mask, options.agg, getattr(config, "global_batch_info", None))
        loss, stats = policy_loss_with_options(log_prob, old_log_prob, advantages, Correction(mask, weights, {}), None,
                                               options, normalizer)  # fmt: skip
        with torch.no_grad():
            log_ratio = torch.where(mask, log_prob.detach().float() - old_log_prob.float(), 0.0)
            metrics = {name: _metric(source, stats, log_ratio, mask) for name, source in spec.metrics.items()}
        return loss, metrics

    policy_loss_fn.__name__ = f"{PREFIX}{mode}"
    policy_loss_fn.__qualname__ = policy_loss_fn.__name__
    policy_loss_fn.__doc__ = (f"verl's {mode!r} policy loss (verl's PolicyLossFn signature) by rlhf_fast.policy_loss, "
                              f"objective={spec.objective!r}.")  # fmt: skip
    return policy_loss_fn


POLICY_LOSS_FNS: dict[str, Callable] = {PREFIX + mode: _make_policy_loss(mode) for mode in POLICY_LOSSES}


# ---------------------------------------------------------------------------------------------
# Advantage estimators: verl's signatures ([B, T] token_level_rewards, response_mask, a [B] uid
# index), rlhf_fast's ops; (advantages, returns), both [B, T]
# ---------------------------------------------------------------------------------------------


def _group_ids(index, device) -> torch.Tensor:
    """verl's uid index (a numpy array of any values, often strings, or a tensor) -> [B] int64 ids."""
    if isinstance(index, torch.Tensor):
        return index.to(device=device, dtype=torch.int64)
    return torch.as_tensor(np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1), device=device)


def _config_value(config, name: str, default):
    return default if config is None else _field(config, name, default)


def _outcome(per_row: torch.Tensor, response_mask: torch.Tensor):
    advantages = per_row.unsqueeze(-1) * response_mask
    return advantages, advantages


@torch.no_grad()
def grpo_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                   norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs):  # fmt: skip
    """verl's grpo (and grpo_vectorized): (s - mean) / (std + eps) over the responses sharing a
    uid, or s - mean with norm_adv_by_std_in_grpo=False (Dr. GRPO); a lone response: s / (1 + eps)."""
    scores = token_level_rewards.sum(dim=-1)
    norm = _config_value(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    ids = _group_ids(index, scores.device)
    return _outcome(group_advantages(scores, index=ids, mode="grpo" if norm else "drgrpo", eps=epsilon), response_mask)


@torch.no_grad()
def rloo_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6, config=None, **kwargs):
    """verl's rloo (and rloo_vectorized): s minus the mean of the other responses of its uid."""
    scores = token_level_rewards.sum(dim=-1)
    return _outcome(group_advantages(scores, index=_group_ids(index, scores.device), mode="rloo"), response_mask)


@torch.no_grad()
def opo_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6, config=None, **kwargs):
    """verl's opo: s minus the response-length-weighted mean score of its uid."""
    scores = token_level_rewards.sum(dim=-1)
    lengths = response_mask.sum(dim=-1)
    ids = _group_ids(index, scores.device)
    return _outcome(group_advantages(scores, index=ids, mode="opo", lengths=lengths), response_mask)


@torch.no_grad()
def grpo_passk_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                         norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs):  # fmt: skip
    """verl's grpo_passk: each uid's best response gets (max - second max) / (std + eps), the others 0."""
    if not _config_value(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo):
        raise ValueError(f"{PREFIX}grpo_passk: algorithm.norm_adv_by_std_in_grpo=False is not supported "
                         "(rlhf_fast's pass@k advantage divides by the group's std)")  # fmt: skip
    scores = token_level_rewards.sum(dim=-1)
    ids = _group_ids(index, scores.device)
    sizes = torch.bincount(ids)
    if bool((sizes == 1).any()):
        raise ValueError(f"{PREFIX}grpo_passk: Pass@k requires at least 2 samples per group; "
                         f"{int((sizes == 1).sum())} uid(s) have one")  # fmt: skip
    return _outcome(group_advantages(scores, index=ids, mode="passk", eps=epsilon), response_mask)


@torch.no_grad()
def gpg_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6, f_norm: float = 1.0,
                  alpha: float = 1.0, config=None, **kwargs):  # fmt: skip
    """verl's gpg: (s - mean of its uid) * B / (responses with a nonzero score) / f_norm."""
    scores = token_level_rewards.sum(dim=-1)
    centred = group_advantages(scores, index=_group_ids(index, scores.device), mode="drgrpo")
    scale = scores.numel() / torch.count_nonzero(scores).clamp(min=1)
    return _outcome(centred * scale / f_norm, response_mask)


@torch.no_grad()
def reinforce_plus_plus_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's reinforce_plus_plus: the discounted reward-to-go over the valid tokens (gamma =
    algorithm.gamma), whitened over the batch's tokens; returns the unwhitened reward-to-go."""
    gamma = float(_config_value(config, "gamma", 1.0))
    returns, _ = gae(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask, gamma=gamma, lam=1.0)
    return whiten(returns, response_mask), returns


@torch.no_grad()
def reinforce_plus_plus_baseline_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                           config=None, **kwargs):  # fmt: skip
    """verl's reinforce_plus_plus_baseline: s minus its uid's mean, on every token, whitened over the batch's tokens."""
    scores = token_level_rewards.sum(dim=-1)
    centred = group_advantages(scores, index=_group_ids(index, scores.device), mode="drgrpo")
    advantages = whiten(centred.unsqueeze(-1).expand(response_mask.shape).contiguous(), response_mask)
    return advantages, advantages


@torch.no_grad()
def remax_advantage(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
    """verl's remax: the reward-to-go minus the greedy response's score (reward_baselines, [B])."""
    returns, _ = gae(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask, gamma=1.0, lam=1.0)
    return returns - reward_baselines.unsqueeze(-1) * response_mask, returns


@torch.no_grad()
def gae_advantage(token_level_rewards, values, response_mask, gamma=1.0, lam=1.0, **kwargs):
    """verl's gae (compute_gae_advantage_return): GAE over the valid tokens, whitened over the
    batch's tokens; returns = advantages (before whitening) + values."""
    advantages, returns = gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
    return whiten(advantages, response_mask), returns


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    PREFIX + "gae": gae_advantage,
    PREFIX + "grpo": grpo_advantage,
    PREFIX + "rloo": rloo_advantage,
    PREFIX + "opo": opo_advantage,
    PREFIX + "grpo_passk": grpo_passk_advantage,
    PREFIX + "gpg": gpg_advantage,
    PREFIX + "reinforce_plus_plus": reinforce_plus_plus_advantage,
    PREFIX + "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline_advantage,
    PREFIX + "remax": remax_advantage,
}


# ---------------------------------------------------------------------------------------------
# Log-probs and entropies of the actor
# ---------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """verl's ``logprobs_from_logits`` by ``rlhf_fast.token_logprobs``: [..., V], [...] -> float32 [...].
    ``inplace_backward`` as verl's flash-attn path: the backward may write into the logits' storage."""
    return token_logprobs(logits, labels.long() if labels.dtype not in check.INDEX_DTYPES else labels,
                          inplace_backward=inplace_backward)  # fmt: skip


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits`` by ``rlhf_fast.token_logprobs``: [..., V] -> float32 [...]
    (the kernel computes it next to a log-prob of token 0, which is dropped)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True)[1]


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked entropy: the fused kernel streams the vocabulary, so no chunks are needed."""
    return entropy_from_logits(logits)


def _scalar_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"rlhf_fast's fused verl path takes one temperature; got {check.describe(temperature)}")
        return float(temperature.item())
    return float(temperature)


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` (use_fused_kernels, impl_backend torch) by
    ``rlhf_fast.linear_token_logprobs``: (hidden [..., H], lm_head weight [V, H], labels [...],
    temperature) -> (log_probs, entropy), float32, without [tokens x V] logits."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return linear_token_logprobs(hidden_states, vocab_weights, input_ids.long(),
                                     temperature=_scalar_temperature(temperature), return_entropy=True)  # fmt: skip


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's Triton ``linear_cross_entropy`` (use_fused_kernels, impl_backend triton) by
    ``rlhf_fast.linear_token_logprobs``: per-token (log_probs, entropy)."""
    if reduction != "none":
        raise ValueError(f"rlhf_fast's linear_cross_entropy supports reduction='none' only, got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("rlhf_fast's linear_cross_entropy does not support a vocabulary-parallel "
                         "dist_process_group (tensor-parallel lm_head)")  # fmt: skip
    return linear_token_logprobs(hidden, weight, labels.long(), temperature=_scalar_temperature(temperature),
                                 return_entropy=True)  # fmt: skip


# (module, name) -> ours: where verl 0.9.1 defines the functions its actor calls at run time.
REPLACEMENTS = {
    ("verl.utils.torch_functional", "logprobs_from_logits"): logprobs_from_logits,
    ("verl.utils.torch_functional", "entropy_from_logits"): entropy_from_logits,
    ("verl.utils.torch_functional", "entropy_from_logits_with_chunking"): entropy_from_logits_with_chunking,
    ("verl.utils.experimental.torch_functional", "FusedLinearForPPO"): FusedLinearForPPO,
    ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy"): linear_cross_entropy,
}
GAE_REPLACEMENT = ("verl.trainer.ppo.core_algos", "compute_gae_advantage_return")

_patched: dict[tuple[str, str], object] = {}  # (module, name) -> verl's original
_registered: set[str] = set()


def _verl_modules():
    return [module for name, module in list(sys.modules.items())
            if module is not None and (name == "verl" or name.startswith("verl."))]  # fmt: skip


def _patch(module_name: str, name: str, ours) -> list[str]:
    """Replace ``name`` in its defining module and in every imported verl module that bound verl's
    object under that name (``from verl.utils.torch_functional import logprobs_from_logits``)."""
    module = importlib.import_module(module_name)
    original = _patched.get((module_name, name), getattr(module, name))
    done = []
    for other in _verl_modules():
        if getattr(other, name, None) is original:
            _patched.setdefault((other.__name__, name), original)
            setattr(other, name, ours)
            done.append(f"{other.__name__}.{name}")
    return done


def register(*, logprobs: bool = True, replace_gae: bool = False) -> tuple[str, ...]:
    """Register rlhf_fast's policy losses and advantage estimators in verl's registries (names in
    ``POLICY_LOSS_FNS`` and ``ADVANTAGE_ESTIMATORS``) and, with ``logprobs``, put rlhf_fast's
    log-prob and entropy kernels in place of verl's (``REPLACEMENTS``); ``replace_gae`` also
    swaps verl's GAE for ours under adv_estimator=gae. Call it where the actor is built, before its
    engine, and in the driver (which computes the advantages). Idempotent; ``unregister()``
    undoes it. Returns what it registered and patched.
    """
    check_verl_version()
    from verl.trainer.ppo import core_algos

    done = []
    for name, fn in POLICY_LOSS_FNS.items():
        core_algos.register_policy_loss(name)(fn)
        _registered.add(name)
        done.append(f"policy_loss:{name}")
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(name)(fn)
        _registered.add(name)
        done.append(f"adv_estimator:{name}")
    replacements = dict(REPLACEMENTS) if logprobs else {}
    if replace_gae:
        replacements[GAE_REPLACEMENT] = gae_advantage
    skipped = []
    for (module_name, name), ours in replacements.items():
        try:
            done += _patch(module_name, name, ours)
        except Exception as error:  # noqa: BLE001 - a kernel module that fails to import here cannot run here either
            skipped.append(f"{module_name}.{name} ({type(error).__name__}: {error})")
    if skipped:
        warnings.warn("rlhf_fast.integrations.verl.register(): not patched, cannot be imported here: " + "; ".join(skipped),
                      stacklevel=2)  # fmt: skip
    return tuple(done)


def unregister() -> None:
    """Remove the names ``register()`` added from verl's registries and put verl's functions back,
    also in verl modules imported since (which bound ours)."""
    if "verl.trainer.ppo.core_algos" in sys.modules:
        core_algos = sys.modules["verl.trainer.ppo.core_algos"]
        for name in _registered:
            core_algos.POLICY_LOSS_REGISTRY.pop(name, None)
            core_algos.ADV_ESTIMATOR_REGISTRY.pop(name, None)
    _registered.clear()
    originals = {}
    for (module_name, name), original in _patched.items():
        originals[name] = original
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, name, original)
    ours = dict(REPLACEMENTS) | {GAE_REPLACEMENT: gae_advantage}
    for (_, name), fn in ours.items():
        if name in originals:
            for module in _verl_modules():
                if getattr(module, name, None) is fn:
                    setattr(module, name, originals[name])
    _patched.clear()
