"""The static options of the ops, each group one frozen keyword-only dataclass validated on
construction: the reference, the ops, the nn modules and the RL trainer pass these objects along.

An op takes ``options=`` (and ``linear=`` for the lm_head-fused ones) and, as sugar, the same
fields as flat keyword arguments; ``take`` is the one place where those become an object. Adding
a knob touches its dataclass, the math that uses it and its tests, not every signature.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from . import _validate as check
from .choices import AGG_MODES, BACKEND_CHOICES, KL_LOSS_ESTIMATORS, ROLLOUT_IS_LEVELS, ROLLOUT_IS_MODES
from .objectives import OBJECTIVES


@dataclass(frozen=True, kw_only=True)
class PolicyLossOptions:
    """Options of the policy-gradient loss (``policy_loss``, ``fused_policy_loss``,
    ``fused_linear_policy_loss``, ``nn.PolicyLoss`` ...)."""

    objective: str = "ppo"
    """The registered objective (``rlhf_fast.objectives``): "ppo" (the clipped surrogate, with
    clip_eps_high and dual_clip; REINFORCE with clip_eps=None), "gspo", "gspo_token", "cispo",
    "sapo", "gmpo", "gpg", "clip_cov", "kl_cov"."""
    clip_eps: float | None = 0.2
    """PPO clip range: the ratio is clamped to [1 - clip_eps, 1 + clip_eps_high]; None: no clipping (REINFORCE)."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO's clip-higher); None: clip_eps."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: for A < 0 the per-token loss is at most -A c."""
    kl_coef: float = 0.0
    """Weight of the per-token KL to the reference policy (needs ref_logp), >= 0."""
    kl_estimator: str = "k3"
    """"k1", "k2", "k3" or "abs" (see kl_penalty), or "k1+", "k3+", "abs+": that value with k2's
    gradient (verl's straight-through estimators; reference.kl_loss)."""
    kl_clamp: float | None = None
    """Clamp the per-token KL term to [-kl_clamp, kl_clamp] (verl's low_var_kl: 10; OpenRLHF: 10)."""
    kl_is_correction: bool = False
    """Multiply the per-token KL term by the importance ratio pi / pi_old (TRL's
    use_bias_correction_kl, DeepSeek-V3.2): the KL of samples drawn from pi_old, corrected to pi."""
    agg: str = "token-mean"
    """"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm" or
    "token-sum" (``rlhf_fast.ops.aggregate``)."""
    max_response_length: int | None = None
    """seq-mean-token-sum-norm divides by B * max_response_length: Dr. GRPO's constant (TRL's
    max_completion_length, verl's loss_scale_factor); None: the padded length T."""
    sapo_tau_pos: float = 1.0
    """SAPO's gate temperature where A > 0 (the paper's and verl's default)."""
    sapo_tau_neg: float = 1.05
    """SAPO's gate temperature where A <= 0."""
    cov_ratio: float = 2e-4
    """Clip-Cov / KL-Cov: the share of valid tokens selected by covariance (at least one)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: only tokens whose covariance is above this are candidates."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: ... and below this."""
    kl_cov_coef: float = 1.0
    """KL-Cov: weight of |log r| on the selected tokens."""
    top_entropy_quantile: float = 1.0
    """Keep the policy-gradient term of the tokens whose entropy is in this top fraction of the
    batch's valid tokens (TRL's top_entropy_quantile; Wang et al. 2025, arXiv:2506.01939: 0.2);
    1.0 keeps every token. Needs the entropies: the fused ops have them, policy_loss takes entropy=."""
    rollout_is: str | None = None
    """Rollout importance correction (needs rollout_logp): None, "token", "sequence" or "geometric"
    (the level of w = pi_old / pi_rollout; ``rlhf_fast.rollout_correction``)."""
    rollout_is_mode: str = "truncate"
    """"truncate" (TIS: weight the loss by min(w, threshold), clamped below at rollout_is_threshold_low
    when given), "mask" (MIS: drop tokens/responses outside the thresholds, normaliser included) or
    "masked_weight" (weight by w inside the thresholds, 0 outside, the tokens kept in the normaliser
    and the KL term: TRL's token_mask / sequence_mask)."""
    rollout_is_threshold: float = 2.0
    """Upper threshold of w (> 1); math.inf: no upper bound (TRL's vllm_importance_sampling_clip_max=None)."""
    rollout_is_threshold_low: float | None = None
    """Lower threshold of w, in [0, 1]: the mask modes' lower bound (None: 1 / rollout_is_threshold;
    0: none); truncate's lower clamp (None or 0: none)."""

    def __post_init__(self):
        check.choice("objective", self.objective, tuple(OBJECTIVES))
        check.positive_finite("sapo_tau_pos", self.sapo_tau_pos)
        check.positive_finite("sapo_tau_neg", self.sapo_tau_neg)
        check.number("cov_ratio", self.cov_ratio, low=0.0, high=1.0, low_open=True)
        check.number("kl_cov_coef", self.kl_cov_coef, low=0.0)
        check.number("top_entropy_quantile", self.top_entropy_quantile, low=0.0, high=1.0, low_open=True)
        if self.rollout_is is not None:
            check.choice("rollout_is", self.rollout_is, ROLLOUT_IS_LEVELS)
        check.choice("rollout_is_mode", self.rollout_is_mode, ROLLOUT_IS_MODES)
        if self.rollout_is_threshold != math.inf:
            check.number("rollout_is_threshold", self.rollout_is_threshold, low=1.0, low_open=True)
        if self.rollout_is_threshold_low is not None:
            check.number("rollout_is_threshold_low", self.rollout_is_threshold_low, low=0.0, high=1.0)
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be below clip_cov_ub, got {self.clip_cov_lb} and {self.clip_cov_ub}")
        if self.clip_eps is not None:
            check.positive_finite("clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            check.positive_finite("clip_eps_high", self.clip_eps_high)
        if self.dual_clip is not None:
            check.number("dual_clip", self.dual_clip, low=1.0, low_open=True)
            if self.objective != "ppo":
                raise ValueError(f"dual_clip applies to objective='ppo' only; got objective={self.objective!r}")
        check.number("kl_coef", self.kl_coef, low=0.0)
        check.choice("kl_estimator", self.kl_estimator, KL_LOSS_ESTIMATORS)
        if self.kl_clamp is not None:
            check.positive_finite("kl_clamp", self.kl_clamp)
        if not isinstance(self.kl_is_correction, bool):
            raise TypeError(f"kl_is_correction must be a bool, got {self.kl_is_correction!r}")
        check.choice("agg", self.agg, AGG_MODES)
        check.max_response_length(self.max_response_length, self.agg)


@dataclass(frozen=True, kw_only=True)
class LinearOptions:
    """How the lm_head-fused ops (``linear_token_logprobs``, ``linear_sft_loss``,
    ``fused_linear_policy_loss``) run their sweep over chunks of tokens."""

    backend: str = "auto"
    """Provider of the token_logprobs kernels run on each chunk of logits."""
    chunk_size: int | None = None
    """Token rows per chunk; None picks it from the shape (``linear_chunks.chunk_rows``)."""
    accum_dtype: torch.dtype | None = torch.float32
    """What the weight gradient is summed over chunks in: torch.float32, or None for the weight's
    own dtype (half the [V, H] sum's memory for bf16/fp16 weights; Liger's default)."""
    logit_scale: float = 1.0
    """The head's logits are logit_scale * (hidden @ weight.T + bias): Cohere's logit_scale, Granite's
    1 / logits_scaling (``rlhf_fast.hf.head_options`` reads it from a model's config). Applied
    before the soft cap and the temperature."""
    logit_softcap: float | None = None
    """Soft cap c of the scaled logits, c * tanh(logits / c), before the temperature: Gemma 2's
    final_logit_softcapping. None: no cap."""

    def __post_init__(self):
        check.choice("backend", self.backend, BACKEND_CHOICES)
        size = self.chunk_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1 (rows per chunk), got {size!r}")
        check.number("logit_scale", self.logit_scale, low=0.0, low_open=True)
        if self.logit_softcap is not None:
            check.number("logit_softcap", self.logit_softcap, low=0.0, low_open=True)
        # accum_dtype is checked against the weight it sums (ops/linear_logprobs.weight_grad_sum_dtype).


def field_names(cls) -> tuple[str, ...]:
    # Read from a plain attribute: torch.compile traces the ops, and cannot call fields() on a class.
    return cls.FIELD_NAMES


def take(cls, options, flat: dict, arg: str = "options"):
    """``options`` (a ``cls``, or None for the defaults) with the fields of ``cls`` that ``flat``
    names applied; those keys are removed from ``flat``, so that what is left over is unknown."""
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"{arg} must be a {cls.__name__} or None, got {type(options).__name__}")
    given = {name: flat.pop(name) for name in field_names(cls) if name in flat}
    if options is None and all(type(value) in _PLAIN for value in given.values()) and not torch.compiler.is_compiling():
        # An op called with flat keywords would build and validate the same object on every call
        # (torch.compile traces the construction instead: Dynamo bypasses caches).
        return _from_fields(cls, tuple((name, type(value), value, _sign(value)) for name, value in given.items()))
    if options is None:
        options = cls()
    if not given:
        return options
    return cls(**{name: given[name] if name in given else getattr(options, name) for name in field_names(cls)})


_PLAIN = (str, int, float, bool, type(None))


def _sign(value):
    """-0.0 equals 0.0 and hashes alike: the sign keeps them apart in a cache key."""
    return math.copysign(1.0, value) if type(value) is float else None


@functools.lru_cache(maxsize=256)
def _from_fields(cls, items: tuple):
    """``cls`` with the (name, type, value, sign) ``items``, the rest its defaults. Cached: options
    are frozen, so sharing them is safe; a construction that raises is not cached (it raises again)."""
    return cls(**{name: value for name, _, value, _ in items})


def no_leftovers(op: str, flat: dict, *classes) -> None:
    """Raise TypeError naming the keyword arguments of ``op`` that no options class has."""
    if flat:
        known = ", ".join(name for cls in classes for name in field_names(cls))
        raise TypeError(f"{op}() got unexpected keyword argument(s) {', '.join(sorted(flat))}; "
                        f"its option keywords are: {known}")


for _options_class in (PolicyLossOptions, LinearOptions):
    _options_class.FIELD_NAMES = tuple(f.name for f in fields(_options_class))
