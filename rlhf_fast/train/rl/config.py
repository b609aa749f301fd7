"""Configuration of the RL stage (`rlhf-fast rl`): nested dataclasses, one docstring per field.

Built on the sections of ``config`` (same coercion, validation and ``ConfigError`` messages), so
``load_config(RLConfig, path, overrides)`` and the CLI's ``--section.field`` options work as for SFT.
Batch arithmetic, per process and per step::

    rollout.batch_size sequences = (rollout.batch_size / rollout.group_size) prompts x group_size samples
    the update splits them into minibatches of algo.mini_batch_size sequences (one optimizer step each),
    each into micro-batches of algo.micro_batch_size (gradient accumulation), for algo.epochs passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...choices import ADVANTAGE_ESTIMATORS, AGG_MODES, GROUP_MODES, KL_ESTIMATORS, KL_LOSS_ESTIMATORS, ROLLOUT_IS_LEVELS, ROLLOUT_IS_MODES
from ..._validate import MIN_TEMPERATURE
from ...objectives import OBJECTIVES
from ..config import ConfigError, DistConfig, ModelConfig, OptimConfig, RunConfig, Section, TaskConfig, TokenizerConfig, require_schedule

ALGOS = ("ppo", "grpo", "reinforce")
BASELINES = ("none", "mean", "rloo")
ROLLOUT_CORRECTION_MODES = tuple(f"{level}_{mode}" for level in ROLLOUT_IS_LEVELS for mode in ROLLOUT_IS_MODES)
KL_PLACES = ("reward", "loss", "none")


@dataclass
class RolloutConfig(Section):
    """Sampling of responses with Hugging Face ``generate`` (KV cache on)."""

    SECTION: ClassVar[str] = "rollout"

    batch_size: int = 64
    """Sequences sampled per step on each process (prompts x group_size)."""
    group_size: int = 1
    """Samples per prompt (G); must divide batch_size. grpo and the rloo baseline need >= 2."""
    max_new_tokens: int = 16
    """Most tokens generated per response (a response without EOS is cut here and scored as is)."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs of training use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off). Below 1 the sampler and the trained policy differ: see logp_mismatch."""
    max_prompt_length: int = 32
    """Prompts longer than this many tokens keep their end (and BOS)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (verl's filter_groups): drop the groups whose scores are all equal (no gradient under a group baseline) and sample more prompts until batch_size sequences are kept; needs group_size >= 2. Over several processes (ddp or fsdp2) all sample the same number of rounds, until none is short: a process already full samples and scores the extra rounds too (generation and a sharded reward model's forward are collectives) and drops their groups."""
    max_sampling_rounds: int = 4
    """Dynamic sampling: most rounds of sampling per step; a batch still short after them is filled with dropped groups (whose group-baseline advantages are 0)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: responses cut at max_new_tokens without an EOS take no part in the loss (they are still scored)."""
    overlong_buffer_len: int = 0
    """DAPO's soft overlong punishment: a response longer than max_new_tokens - overlong_buffer_len loses overlong_penalty_factor times its excess over the buffer's length from its score (verl's overlong_buffer.len); 0: off."""
    overlong_penalty_factor: float = 1.0
    """Soft overlong punishment: the penalty at max_new_tokens (verl's overlong_buffer.penalty_factor)."""

    def validate(self) -> None:
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.group_size >= 1, "group_size", "must be >= 1")
        if self.batch_size % self.group_size:
            raise ConfigError(
                f"rollout.group_size={self.group_size} must divide rollout.batch_size={self.batch_size} "
                f"(sequences per step = prompts x group_size; {self.batch_size} % {self.group_size} = "
                f"{self.batch_size % self.group_size})"
            )
        self.require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self.require(self.temperature >= MIN_TEMPERATURE, "temperature", f"must be >= {MIN_TEMPERATURE:g} (the ops' bound)")
        self.require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.require(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        self.require(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        if self.dynamic_sampling:
            self.require(self.group_size >= 2, "dynamic_sampling", "filters groups: it needs rollout.group_size >= 2")
        self.require(0 <= self.overlong_buffer_len < self.max_new_tokens, "overlong_buffer_len",
                     f"must be in [0, max_new_tokens={self.max_new_tokens})")
        self.require(self.overlong_penalty_factor >= 0, "overlong_penalty_factor", "must be >= 0")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


@dataclass
class RewardSourceConfig(Section):
    """Where the sequence score comes from: a reward model, a Python reward_fn, or both."""

    SECTION: ClassVar[str] = "reward"

    model_path: str | None = None
    """Directory of a reward model written by `rlhf-fast rm` (reward_model/). Unset: reward_fn only."""
    model_coef: float = 1.0
    """Weight of the reward model's score in the total score."""
    fn_coef: float = 1.0
    """Weight of reward_fn(prompts, responses) in the total score (when a reward_fn is passed)."""
    fn: str | None = None
    """A reward_fn(prompts, responses) -> scores as "module:function" (importable from the working
    directory or PYTHONPATH), e.g. a verifiable reward; the CLI's way to pass one."""
    gold: bool = False
    """Use the built-in task's hidden gold score as a verifiable reward_fn (CLI convenience)."""
    retokenize: bool = False
    """Decode responses and re-tokenize them with the reward model's own tokenizer when it differs from
    the policy's (without this, a different tokenizer is an error)."""
    clip: float | None = None
    """Clip scores to [-clip, clip] (unset: no clipping)."""

    def validate(self) -> None:
        if self.clip is not None:
            self.require(self.clip > 0, "clip", "must be > 0")
        if self.fn is not None:
            module, _, name = self.fn.partition(":")
            self.require(bool(module and name), "fn", f'must be "module:function", got {self.fn!r}')
            self.require(not self.gold, "fn", "and reward.gold both name a reward_fn: set one")


@dataclass
class AlgoConfig(Section):
    """The algorithm: advantages, the KL to the reference policy and the losses."""

    SECTION: ClassVar[str] = "algo"

    name: str = "ppo"
    """ppo (critic, GAE, clipped ratio), grpo (group advantages) or reinforce (Monte Carlo policy gradient)."""
    epochs: int = 1
    """Passes over each rollout batch (PPO-style reuse; reinforce forces 1)."""
    mini_batch_size: int = 64
    """Sequences per optimizer step on each process; must divide rollout.batch_size."""
    micro_batch_size: int = 32
    """Sequences per forward/backward (gradient accumulation); must divide mini_batch_size."""
    advantage: str | None = None
    """Advantage estimator, independent of the algorithm (verl's adv_estimator names): gae (needs ppo's critic), grpo, drgrpo, rloo (group baselines), reinforce (the return minus `baseline`), reinforce_plus_plus (per-token discounted returns of the KL-penalised rewards, whitened over the batch), reinforce_plus_plus_baseline (score minus group mean, whitened over the batch's tokens), grpo_passk (only each group's best response learns, by its margin over the second), opo (length-weighted group baseline), gpg (group-centred, scaled by B / responses with a nonzero score), remax (per-token returns minus the score of the policy's greedy response to the same prompt, which the trainer generates); unset: the algorithm's own (ppo: gae, grpo: group_mode, reinforce: reinforce, or rloo with baseline=rloo)."""
    objective: str = "ppo"
    """Policy objective (rlhf_fast.objectives): ppo (clipped ratio per token; reinforce runs it unclipped), gspo, gspo_token, cispo, sapo, gmpo, gpg, clip_cov, kl_cov."""
    clip_eps: float = 0.2
    """Clip range of the policy ratio (ppo, grpo)."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO clip-higher); unset: clip_eps."""
    agg: str = "token-mean"
    """How per-token losses become a scalar: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-sum; the normaliser is the whole batch's over micro-batches and ranks."""
    max_response_length: int | None = None
    """seq-mean-token-sum-norm divides by B times this constant (Dr. GRPO; TRL's max_completion_length, verl's loss_scale_factor); unset: the padded response length."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    kl_coef: float = 0.05
    """Beta: weight of the KL to the reference policy (initial value with the adaptive controller)."""
    kl_place: str = "reward"
    """Where the KL goes: reward (per-token penalty in the reward, InstructGPT), loss (a loss term, GRPO) or none."""
    kl_estimator: str = "k1"
    """KL estimator: k1, k2, k3 or abs (k3 is GRPO's choice for the loss); with kl_place=loss also k1+, k3+, abs+ (that value, k2's gradient: verl's straight-through estimators)."""
    kl_clamp: float | None = None
    """Clamp the per-token KL to [-kl_clamp, kl_clamp] in the reward or the loss (verl's low_var_kl and OpenRLHF: 10); unset: no clamp."""
    kl_is_correction: bool = False
    """kl_place=loss: multiply the per-token KL by pi / pi_old (TRL's use_bias_correction_kl)."""
    kl_target: float | None = None
    """Target KL (per sequence, nats) of the adaptive controller; unset: fixed kl_coef."""
    kl_horizon: int = 10000
    """Horizon (sequences) of the adaptive KL controller."""
    gamma: float = 1.0
    """Discount of GAE (ppo)."""
    lam: float = 0.95
    """Lambda of GAE (ppo)."""
    whiten: bool = True
    """Whiten advantages over the batch (ppo)."""
    whiten_unbiased: bool = True
    """Whitening divides by the unbiased variance (n - 1, verl and TRL); false: by n (OpenRLHF)."""
    top_entropy_quantile: float = 1.0
    """Keep the policy-gradient term of only this top fraction of tokens by entropy (TRL's top_entropy_quantile); 1: all."""
    vf_coef: float = 0.5
    """Weight of the value loss (ppo)."""
    value_clip: float | None = 0.2
    """Clip range of the value loss around the rollout values (ppo); unset: unclipped."""
    group_mode: str = "grpo"
    """Group advantages (grpo): grpo (std-normalised), drgrpo (mean-centred) or rloo (leave one out)."""
    baseline: str = "mean"
    """Baseline of reinforce: none, mean (batch mean) or rloo (leave one out within groups)."""

    @property
    def estimator(self) -> str:
        """The advantage estimator that runs: ``advantage``, else the algorithm's own."""
        if self.advantage is not None:
            return self.advantage
        if self.name == "ppo":
            return "gae"
        if self.name == "grpo":
            return self.group_mode
        return "rloo" if self.baseline == "rloo" else "reinforce"

    def validate(self) -> None:
        self.require_choice("name", ALGOS)
        self.require_choice("objective", tuple(OBJECTIVES))
        if self.advantage is not None:
            self.require_choice("advantage", ADVANTAGE_ESTIMATORS)
        if self.name == "ppo" and self.estimator != "gae":
            raise ConfigError(f"algo.name=ppo trains its critic on the returns of algo.advantage=gae; "
                              f"{self.estimator} gives none (use algo.name=grpo or reinforce with it)")
        if self.estimator == "gae" and self.name != "ppo":
            raise ConfigError(f"algo.advantage=gae needs the critic of algo.name=ppo, got algo.name={self.name}")
        self.require_choice("agg", AGG_MODES)
        self.require_choice("kl_place", KL_PLACES)
        self.require_choice("kl_estimator", KL_LOSS_ESTIMATORS if self.kl_place == "loss" else KL_ESTIMATORS)
        if self.kl_clamp is not None:
            self.require(self.kl_clamp > 0, "kl_clamp", "must be > 0")
        self.require(0 < self.top_entropy_quantile <= 1, "top_entropy_quantile", "must be in (0, 1]")
        if self.max_response_length is not None:
            self.require(self.max_response_length >= 1, "max_response_length", "must be >= 1")
            self.require(self.agg == "seq-mean-token-sum-norm", "max_response_length",
                         f"applies to agg=seq-mean-token-sum-norm only (agg is {self.agg})")
        self.require_choice("group_mode", GROUP_MODES)
        self.require_choice("baseline", BASELINES)
        for name in ("epochs", "mini_batch_size", "micro_batch_size", "kl_horizon"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(self.clip_eps > 0, "clip_eps", "must be > 0")
        if self.clip_eps_high is not None:
            self.require(self.clip_eps_high > 0, "clip_eps_high", "must be > 0")
        self.require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        if self.kl_target is not None:
            self.require(self.kl_target > 0, "kl_target", "must be > 0")
        self.require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        self.require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        self.require(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        if self.value_clip is not None:
            self.require(self.value_clip > 0, "value_clip", "must be > 0")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"algo.micro_batch_size={self.micro_batch_size} must divide algo.mini_batch_size="
                f"{self.mini_batch_size} ({self.mini_batch_size} % {self.micro_batch_size} = "
                f"{self.mini_batch_size % self.micro_batch_size})"
            )


@dataclass
class RolloutCorrectionConfig(Section):
    """Importance correction between the sampler's log-probs and the trainer's recomputed old ones
    (rlhf_fast.rollout_correction: TIS / MIS, verl's rollout correction)."""

    SECTION: ClassVar[str] = "rollout_correction"

    mode: str | None = None
    """Unset (none), or LEVEL_MODE with LEVEL token, sequence or geometric and MODE truncate (TIS), mask (MIS) or
    masked_weight (TRL's *_mask: w inside the thresholds, 0 outside, the normaliser kept): e.g. token_truncate."""
    threshold: float = 2.0
    """Upper threshold of the weight pi_old / pi_rollout (> 1)."""
    threshold_low: float | None = None
    """Lower threshold, in [0, 1): the mask modes' lower bound (unset: 1 / threshold; 0: none), truncate's lower
    clamp of the weight (unset or 0: none)."""

    def validate(self) -> None:
        if self.mode is not None:
            self.require_choice("mode", ROLLOUT_CORRECTION_MODES)
        self.require(self.threshold > 1, "threshold", "must be > 1")
        if self.threshold_low is not None:
            self.require(0 <= self.threshold_low < 1, "threshold_low", "must be in [0, 1)")

    def options(self) -> dict:
        """The PolicyLossOptions fields of this correction."""
        if self.mode is None:
            return {}
        level, mode = self.mode.split("_", 1)
        return {"rollout_is": level, "rollout_is_mode": mode, "rollout_is_threshold": self.threshold,
                "rollout_is_threshold_low": self.threshold_low}  # fmt: skip


@dataclass
class RLLoopConfig(Section):
    """The RL loop: steps, evaluation, logging, checkpoints, precision."""

    SECTION: ClassVar[str] = "train"

    steps: int = 60
    """RL steps (each: rollout, score, advantages, update); the LR schedule spans them."""
    stop_after: int | None = None
    """Stop once this many steps are done (a checkpoint is written); continue with --resume."""
    eval_every: int = 0
    """Evaluate on the held-out prompts every this many steps, and at the end (0: only at the end)."""
    eval_prompts: int = 256
    """Held-out prompts of the evaluation (the built-in task's, or data.eval_path)."""
    eval_batch_size: int = 128
    """Prompts per generation batch during evaluation."""
    log_every: int = 1
    """Write training metrics to metrics.jsonl every this many steps."""
    save_every: int = 20
    """Write a checkpoint every this many steps, and at the end (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    seed: int = 0
    """Seed of sampling, prompt order and minibatch shuffling."""
    precision: str = "auto"
    """fp32, bf16 (autocast on CUDA) or auto (bf16 on CUDA GPUs that support it)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    backend: str = "auto"
    """Backend of the fused ops: auto, triton, cuda, host or torch (pure PyTorch reference)."""
    max_nonfinite_skips: int = 3
    """An optimizer update (one minibatch) whose loss or gradient norm is NaN or inf is skipped (weights
    and AdamW's state unchanged, the LR schedule advances) with a warning and the skipped_updates
    metric; this many skipped in a row stop the run with an error naming the step and the likely
    source. NaN or inf rewards stop the run at once, naming the row."""

    def validate(self) -> None:
        require_schedule(self)
        self.require(self.eval_prompts >= 1, "eval_prompts", "must be >= 1")
        self.require_choice("backend", ("auto", "triton", "cuda", "host", "torch"))


@dataclass
class PromptDataConfig(Section):
    """Where the prompts come from."""

    SECTION: ClassVar[str] = "data"

    train_path: str | None = None
    """JSONL of {"prompt": str} (other fields ignored). Unset: prompts of the built-in synthetic task."""
    eval_path: str | None = None
    """JSONL of held-out prompts. Unset: the built-in task's held-out prompts (train_path unset), else none."""
    train_prompts: int = 4096
    """Built-in task prompts to train on."""


@dataclass
class RLConfig(RunConfig):
    """`rlhf-fast rl`: RL finetuning of a policy against a frozen reference (the policy at the start)."""

    out_dir: str = "runs/rl"
    """Output directory: checkpoints/, metrics.jsonl, metrics.png, config.yaml, summary.json and the final model/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0))
    train: RLLoopConfig = field(default_factory=RLLoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> None:
        super().validate()
        rollout, algo = self.rollout, self.algo
        if rollout.batch_size % algo.mini_batch_size:
            raise ConfigError(
                f"algo.mini_batch_size={algo.mini_batch_size} must divide rollout.batch_size={rollout.batch_size} "
                f"({rollout.batch_size} % {algo.mini_batch_size} = {rollout.batch_size % algo.mini_batch_size})"
            )
        if algo.name == "grpo" and rollout.group_size < 2:
            raise ConfigError(f"algo.name=grpo needs rollout.group_size >= 2, got {rollout.group_size}")
        if algo.estimator in ("grpo", "rloo", "grpo_passk") and rollout.group_size < 2:
            if algo.advantage is not None:
                chosen = f"algo.advantage={algo.advantage}"
            else:
                chosen = f"algo.group_mode={algo.group_mode}" if algo.name == "grpo" else f"algo.baseline={algo.baseline}"
            raise ConfigError(f"{chosen} needs rollout.group_size >= 2, got {rollout.group_size}")
