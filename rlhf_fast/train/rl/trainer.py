"""RLTrainer: PPO, GRPO and REINFORCE against a frozen reference policy, with the fused ops.

    trainer = RLTrainer(RLConfig(out_dir="runs/rl", model=ModelConfig(path="runs/sft/model"),
                                 reward=RewardSourceConfig(model_path="runs/rm/reward_model")))
    metrics = trainer.train()   # the policy is saved in runs/rl/model/

One RL step (``train_step``) is the named steps of ``steps``, each replaceable by passing another
function: ``rollout_fn``, ``score_fn``, ``reward_fn`` (a verifiable score of each response, alone
or added to the reward model's), ``advantage_fn``, ``loss_fn``, ``update_fn``; ``hooks`` (``loop.Hooks``)
observe steps, evaluations and checkpoints as they do in SFT and reward-model training.

Words: the *reward model* is the network (``RewardModel``), the *reward function* the Python callable
(``reward_fn``), both named in the ``reward`` config section; each gives a sequence a *score*, and
``score_step`` sums them (weighted, clipped) into the sequence's ``score`` (the metric; ``rm_score`` and
``fn_score`` are the parts). The per-token *rewards* are the
ops' -beta * KL plus that score at the last token (``rlhf_fast.kl_penalized_rewards``), used with
algo.kl_place=reward. The reference policy is a frozen copy of the policy at the start.

Distributed (torchrun): every process samples its own shard of prompts; gradients are summed over
processes after each minibatch (losses are divided by the global normaliser), so all processes take
the same optimizer step and keep identical parameters. Only rank 0 writes files. With
dist.strategy=fsdp2 the policy, critic, reference and reward model are sharded (``_shard_models``),
the rollout generates on the policy gathered for it (``fsdp.gathered``), and checkpoints are sharded
(``fsdp.ShardedCheckpoints``).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_fast.backends import registry

from .. import checkpoint, dist, fsdp, loop
from ..config import ConfigError, to_dict
from ..data import BatchStream, DataError, chat_prompt, read_jsonl
from ..loop import Hooks, autocast_for, build_optimizer, build_scheduler, run_steps
from ..metrics import MetricsLog
from ..models import check_vocab, load_policy, load_tokenizer, tokenizer_vocab_size
from ..reward_model import RewardModel
from .config import RLConfig
from .rollout import generate, sequence_logprobs
from .steps import (ADVANTAGE_ESTIMATORS, checked_advantages, explained_variance, loss_step, make_experience, response_scores,
                    rollout_step, sample_step, score_step, update_step)
from ..run import plot_run, save_policy, save_summary, seed_everything, start_run
from ..task import SyntheticTask

RewardFn = Callable[[list[str], list[str]], "torch.Tensor | list[float]"]

TRAIN_PROMPT_SEED, EVAL_PROMPT_SEED = 7001, 7002


class KLController:
    """Beta of the KL penalty: fixed, or adaptive towards a target KL (Ziegler et al. 2019):
    beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon) after each batch of n sequences."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = float(value), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon


def same_tokenizer(a, b) -> bool:
    """Same vocabulary and the same special-token ids."""
    specials = ("bos_token_id", "eos_token_id", "pad_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, s) == getattr(b, s) for s in specials)


def load_prompts(path: str, key: str, tokenizer) -> list[str]:
    """Prompts of a JSONL file: the "prompt" string of each line, or a "messages" conversation
    rendered by the tokenizer's chat template (``chat_prompt``)."""
    prompts = []
    for where, record in read_jsonl(path, key):
        if "messages" in record:
            prompts.append(chat_prompt(where, tokenizer, record["messages"]))
            continue
        value = record.get("prompt")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string (or 'messages' a conversation)")
        prompts.append(value)
    return prompts


def as_prompt_texts(prompts: list, tokenizer, name: str) -> list[str]:
    """The ``prompts=`` / ``eval_prompts=`` of the Python API as texts: strings as they are,
    conversations (lists of {"role", "content"}) through the chat template."""
    texts = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
        elif isinstance(prompt, list):
            texts.append(chat_prompt(f"{name}[{i}]", tokenizer, prompt))
        else:
            raise DataError(f"{name}[{i}] must be a string or a list of chat messages, got {type(prompt).__name__}")
    return texts


def task_gold(prompts: list[str], responses: list[str], task: SyntheticTask | None = None) -> list[float]:
    """The built-in task's hidden gold score of each response (a verifiable reward_fn)."""
    task = task or SyntheticTask()
    return [task.gold_score(p, r) for p, r in zip(prompts, responses)]


def import_reward_fn(path: str) -> RewardFn:
    """The callable named by reward.fn, "module:function" (the module imported as Python would)."""
    module_name, _, name = path.partition(":")
    if os.getcwd() not in sys.path:  # the rlhf-fast script's sys.path lacks it, unlike python -m
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward.fn={path!r}: cannot import {module_name!r} ({error})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward.fn={path!r}: {module_name} has no callable {name!r}")
    return fn


class RewardFnError(ConfigError):
    """The reward function (reward.fn, or reward_fn=) raised, or returned something other than one number per response."""


def checked_reward_fn(fn: RewardFn, name: str) -> RewardFn:
    """``fn`` whose failures and results that are not B numbers raise RewardFnError naming ``name``
    (its reward.fn, or the function) and the fix, rather than an error deep in the score step."""

    def call(prompts: list[str], responses: list[str]) -> torch.Tensor:
        B = len(responses)
        try:
            out = fn(prompts, responses)
        except Exception as exc:
            raise RewardFnError(f"{name} raised {type(exc).__name__}: {exc} (called with {B} prompts and responses); fix the function") from exc
        try:
            scores = torch.as_tensor(out, dtype=torch.float32) if not isinstance(out, (str, bytes)) else None
        except (TypeError, ValueError, RuntimeError):
            scores = None
        if scores is None:
            kind = type(out).__name__ if not isinstance(out, (list, tuple)) or not out else f"{type(out).__name__} of {type(out[0]).__name__}"
            raise RewardFnError(f"{name} returned a {kind}; it must return {B} numbers, one per response (a list of floats or a [{B}] tensor)")
        if scores.shape != (B,):
            raise RewardFnError(f"{name} returned {tuple(scores.shape)} scores for {B} responses; it must return one number per response")
        return scores

    call.name = name  # steps.checked_scores names the function in its NaN/inf message
    return call


@torch.no_grad()
def evaluate_policy(policy, ref_policy, tokenizer, prompts: list[str], rollout_cfg, *, score_fn=None, score_keys=(),
                    gold_fn=None, batch_size: int = 128, seed: int = 0, backend: str = "auto") -> dict[str, float]:
    """Held-out metrics of ``policy`` on ``prompts`` (this process's share; sums are all-reduced):
    mean and standard error of the gold score (``gold_fn``), of each ``score_keys`` entry of
    ``score_fn(rollout) -> {key: [B] scores}`` (the configured reward and its parts), KL to
    ``ref_policy`` (k1 per sequence, nats) and response length. Sampling uses its own RNG seeded by
    ``seed`` and leaves the training RNG untouched."""
    mine = prompts[dist.rank() :: dist.world_size()]
    device = next(policy.parameters()).device
    keys = ("gold", *score_keys, "kl", "length")
    sums = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)  # sum, sum of squares
    count = torch.zeros(1, dtype=torch.float64, device=device)
    # Sharded (FSDP2), the reward model's and the log-probs' forwards are collectives: every process
    # runs as many batches as the busiest one, the missing ones on one prompt, their results dropped.
    lockstep = fsdp.is_sharded(policy) or fsdp.is_sharded(ref_policy)
    busiest = -(-len(prompts) // dist.world_size()) if lockstep else len(mine)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 7919 * dist.rank())
        for start in range(0, busiest, batch_size):
            idle = start >= len(mine)
            with fsdp.gathered(policy):
                rollout = generate(policy, tokenizer, prompts[:1] if idle else mine[start : start + batch_size], rollout_cfg)
            values = {"length": rollout.lengths.double()}
            if gold_fn is not None:
                values["gold"] = torch.as_tensor(gold_fn(rollout.prompts, rollout.responses), dtype=torch.float64, device=device)
            if score_fn is not None:
                values.update({key: value.double() for key, value in score_fn(rollout).items()})
            if ref_policy is not None:
                logp = sequence_logprobs(policy, rollout, temperature=rollout_cfg.temperature, backend=backend)
                ref = sequence_logprobs(ref_policy, rollout, temperature=rollout_cfg.temperature, backend=backend)
                values["kl"] = torch.where(rollout.response_mask, logp - ref, 0.0).sum(-1).double()
            if idle:
                continue
            for i, key in enumerate(keys):
                if key in values:
                    sums[i, 0] += values[key].sum()
                    sums[i, 1] += (values[key] ** 2).sum()
            count += len(rollout)
    dist.all_reduce_sum(sums)
    n = float(dist.all_reduce_sum(count).item())
    out = {"prompts": n}
    for i, key in enumerate(keys):
        if (key == "gold" and gold_fn is None) or (key == "kl" and ref_policy is None):
            continue
        mean = float(sums[i, 0]) / max(n, 1)
        var = max(float(sums[i, 1]) / max(n, 1) - mean * mean, 0.0) * n / max(n - 1, 1)
        out[key] = mean
        out[f"{key}_se"] = math.sqrt(var / max(n, 1))
    return out


class RLTrainer(fsdp.ShardedCheckpoints):
    """Builds (or takes) the policy, reference, reward model and critic from ``config`` and runs RL.

    Args:
        config: an ``RLConfig``.
        policy, tokenizer: a causal LM and its tokenizer (default: loaded from config.model / tokenizer).
        reward_model: a ``RewardModel`` (default: loaded from config.reward.model_path, if set).
        reward_tokenizer: the reward model's tokenizer when it differs from the policy's (needs
            config.reward.retokenize); default: read from the reward model directory when it has one.
        reward_fn: ``reward_fn(prompts, responses) -> [B] scores``, added (times reward.fn_coef) to
            the reward model's score; alone when there is no reward model.
        critic: the value model of PPO, a ``RewardModel`` read per token (default: a copy of the
            reward model, else the policy's body with a new head).
        prompts, eval_prompts: lists of prompt strings (default: config.data or the built-in task).
        rollout_fn, score_fn, advantage_fn, loss_fn, update_fn: replacements of the steps in ``steps``.
        hooks: ``loop.Hooks``; on_step(trainer, metrics), on_eval, on_checkpoint(trainer, path), on_end.
    """

    def __init__(
        self,
        config: RLConfig,
        *,
        policy: torch.nn.Module | None = None,
        tokenizer=None,
        reward_model: RewardModel | None = None,
        reward_tokenizer=None,
        reward_fn: RewardFn | None = None,
        critic: RewardModel | None = None,
        prompts: list[str] | None = None,
        eval_prompts: list[str] | None = None,
        rollout_fn: Callable = rollout_step,
        score_fn: Callable = score_step,
        advantage_fn: Callable | None = None,
        loss_fn: Callable = loss_step,
        update_fn: Callable = update_step,
        hooks: Hooks | None = None,
    ):
        self.config = config
        self.out_dir = Path(config.out_dir)
        seed_everything(config.train.seed)
        self.device = dist.resolve_device(config.train.device)
        self.task = SyntheticTask()

        # Models: policy, frozen reference, reward model, critic.
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, config.model)
        self.policy = policy if policy is not None else load_policy(config.model, self.tokenizer)
        check_vocab(self.tokenizer, self.policy.get_input_embeddings().num_embeddings, where="policy")
        self.policy.to(self.device)
        self.ref_policy = copy.deepcopy(self.policy).eval()
        self.ref_policy.requires_grad_(False)

        if reward_fn is None and config.reward.fn is not None:
            reward_fn = import_reward_fn(config.reward.fn)
        if config.reward.gold and reward_fn is None:
            reward_fn = task_gold
        if reward_fn is not None:
            name = f"reward.fn={config.reward.fn!r}" if config.reward.fn else f"reward_fn {getattr(reward_fn, '__qualname__', reward_fn)!r}"
            reward_fn = checked_reward_fn(reward_fn, name)
        self.reward_fn = reward_fn
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        if reward_model is None and config.reward.model_path is not None:
            self.reward_model, found_tokenizer = self._read_reward_model_dir(config.reward.model_path)
            self.reward_tokenizer = self.reward_tokenizer or found_tokenizer
        if self.reward_model is None and self.reward_fn is None:
            raise ConfigError(
                "no reward: set reward.model_path (a reward model directory), reward.fn (module:function), "
                "reward.gold=true, or pass reward_fn="
            )
        if self.reward_model is not None:
            self.reward_model.to(self.device).eval().requires_grad_(False)
            self._check_reward_tokenizer()

        self.critic = None
        if config.algo.name == "ppo":
            if critic is None:
                critic = copy.deepcopy(self.reward_model) if self.reward_model is not None else RewardModel(copy.deepcopy(self.policy.base_model))
            self.critic = critic.to(self.device).float().train().requires_grad_(True)

        # Prompts.
        self.train_prompts, self.eval_prompts = self._prompts(prompts, eval_prompts)
        self.prompt_stream = BatchStream(
            self.train_prompts, config.rollout.prompts_per_step, list,
            seed=config.train.seed, rank=dist.rank(), world_size=dist.world_size(),
        )  # fmt: skip

        # Steps.
        self.rollout_fn, self.score_fn, self.loss_fn, self.update_fn = rollout_fn, score_fn, loss_fn, update_fn
        self.advantage_fn = advantage_fn or ADVANTAGE_ESTIMATORS[config.algo.estimator]
        self.hooks = hooks or Hooks()
        self.kl_ctl = KLController(config.algo.kl_coef, config.algo.kl_target, config.algo.kl_horizon)

        # Optimisation: one AdamW over policy (and critic); the schedule spans every optimizer step.
        self._broadcast_parameters()
        self.sharded = dist.initialized() and config.dist.strategy == "fsdp2"
        if self.sharded:
            self._shard_models()
        self.optimizer = build_optimizer(self.trainable_parameters(), config.optim)
        self.epochs = 1 if config.algo.name == "reinforce" else config.algo.epochs
        self.updates_per_step = self.epochs * (config.rollout.batch_size // config.algo.mini_batch_size)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.train.steps * self.updates_per_step)
        self.autocast = autocast_for(config.train.precision, self.device)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.keep_checkpoints = config.train.keep_checkpoints
        self.backend_names = self.backends()
        self.step = 0
        self.last_eval: dict[str, float] = {}
        self.max_nonfinite_skips = config.train.max_nonfinite_skips
        self.nonfinite_streak = 0  # optimizer updates skipped in a row (loop.guarded_step)
        self.grad_norms: list[float] = []

    # ------------------------------------------------------------------ construction helpers
    def _read_reward_model_dir(self, path: str):
        """A reward model written by `rlhf-fast rm`, and its tokenizer when the directory has one."""
        from ..models import _require_dir, read_tokenizer

        directory = _require_dir(path, "reward.model_path")
        rm = RewardModel.from_pretrained(directory, device=self.device)
        tokenizer = None
        if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
            tokenizer = read_tokenizer(directory)
        return rm, tokenizer

    def _check_reward_tokenizer(self) -> None:
        rm_vocab = self.reward_model.backbone.get_input_embeddings().num_embeddings
        other = self.reward_tokenizer
        if other is not None and not same_tokenizer(other, self.tokenizer):
            if not self.config.reward.retokenize:
                raise ConfigError(
                    f"the policy and the reward model have different tokenizers ({tokenizer_vocab_size(self.tokenizer)} vs "
                    f"{tokenizer_vocab_size(other)} ids, or different special tokens): the reward model would read "
                    "the policy's ids as other words. Set reward.retokenize=true to decode responses and re-tokenize "
                    "them for the reward model, or train the reward model with the policy's tokenizer"
                )
            check_vocab(other, rm_vocab, where="reward model")
        else:
            self.reward_tokenizer = None  # same ids: score the policy's tokens directly
            check_vocab(self.tokenizer, rm_vocab, where="reward model")

    def _prompts(self, prompts, eval_prompts) -> tuple[list[str], list[str]]:
        cfg = self.config
        if prompts is None:
            if cfg.data.train_path is not None:
                prompts = load_prompts(cfg.data.train_path, "data.train_path", self.tokenizer)
            else:
                prompts = self.task.prompts(cfg.data.train_prompts, cfg.task.seed * 100_003 + TRAIN_PROMPT_SEED)
        if eval_prompts is None:
            if cfg.data.eval_path is not None:
                eval_prompts = load_prompts(cfg.data.eval_path, "data.eval_path", self.tokenizer)
            elif cfg.data.train_path is None:
                eval_prompts = self.task.prompts(cfg.train.eval_prompts, cfg.task.seed * 100_003 + EVAL_PROMPT_SEED)
            else:
                eval_prompts = []
        prompts, eval_prompts = as_prompt_texts(prompts, self.tokenizer, "prompts"), as_prompt_texts(eval_prompts, self.tokenizer, "eval_prompts")
        if not prompts:
            raise DataError("no training prompts")
        need = cfg.rollout.prompts_per_step * dist.world_size()
        if len(prompts) < need:
            raise DataError(
                f"{len(prompts)} training prompts are fewer than one step's rollout.batch_size / rollout.group_size = "
                f"{cfg.rollout.batch_size} / {cfg.rollout.group_size} = {cfg.rollout.prompts_per_step} prompts x {dist.world_size()} process(es)"
            )
        return list(prompts), list(eval_prompts[: cfg.train.eval_prompts])

    def _broadcast_parameters(self) -> None:
        """Start every process from rank 0's weights (a model built from a config is random)."""
        if not dist.initialized():
            return
        import torch.distributed

        for p in self.trainable_parameters():
            torch.distributed.broadcast(p.data, src=0)
        self.ref_policy.load_state_dict(self.policy.state_dict())

    def _shard_models(self) -> None:
        """FSDP2 (dist.strategy=fsdp2): the policy and the critic sharded for training, the frozen
        reference and reward model sharded too (``fsdp.shard_reference``; its docstring says why rather
        than kept whole in bf16), all on one mesh. The critic's ``token_values`` and the reward model's
        ``score`` run as their forward, so that FSDP2 gathers their parameters for them."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        mesh = fsdp.default_mesh()
        fsdp.shard_model(self.policy, mesh=mesh)
        fsdp.shard_reference(self.ref_policy, mesh=mesh)
        if self.reward_model is not None:
            fsdp.shard_reference(self.reward_model, mesh=mesh)
            register_fsdp_forward_method(self.reward_model, "score")
        if self.critic is not None:
            fsdp.shard_model(self.critic, mesh=mesh)
            register_fsdp_forward_method(self.critic, "token_values")

    def sharded_modules(self) -> dict[str, torch.nn.Module]:
        """The trained models a sharded checkpoint holds (the reference and the reward model are rebuilt)."""
        return {"model": self.policy, **({"critic": self.critic} if self.critic is not None else {})}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        return params

    def clip_gradients(self) -> float:
        """Clip the policy's and the critic's gradient norms separately to optim.grad_clip; returns the
        policy's norm. Apart, as PPO trainers with an actor and a critic optimizer do: one joint norm
        would let the value loss's gradient (often the larger, early on) shrink the policy's step."""
        max_norm = self.config.optim.grad_clip
        norms = [loop.clip_gradients(m.parameters(), max_norm) for m in (self.policy, self.critic) if m is not None]
        self.grad_norms = norms  # policy's, then critic's: update_step skips the update unless all are finite
        return norms[0]

    def nonfinite_modules(self) -> list[torch.nn.Module]:
        """The models whose weights ``loop.nonfinite_source`` inspects: the policy and the critic."""
        return [self.policy, self.critic]

    # ------------------------------------------------------------------ one RL step
    def next_prompts(self) -> list[str]:
        """This process's prompts of the step, each repeated group_size times (groups are contiguous)."""
        G = self.config.rollout.group_size
        return [p for p in self.prompt_stream.next() for _ in range(G)]

    def train_step(self) -> dict[str, float]:
        """rollout -> score -> experience (log-probs, values) -> advantages -> update; returns the metrics."""
        t0 = time.perf_counter()
        rollout, scores, score_stats = sample_step(self)  # rollout_fn and score_fn, with DAPO's options
        t1 = time.perf_counter()
        exp, exp_stats = make_experience(self, rollout, scores)
        exp.advantages, exp.returns = checked_advantages(self.advantage_fn(self, exp), exp, needs_returns=self.critic is not None)
        t2 = time.perf_counter()
        update_stats = self.update_fn(self, exp)
        t3 = time.perf_counter()
        if "kl" in update_stats:  # the loss's per-token KL during the update; "kl" is the rollout's, per sequence
            update_stats["update_kl_token"] = update_stats.pop("kl")

        stats = {"score": scores.mean(), "response_length": rollout.lengths.float().mean(), **score_stats, **exp_stats, **update_stats}
        if exp.values is not None and exp.returns is not None:
            stats["explained_variance"] = explained_variance(exp.values, exp.returns, exp.mask)
        gold = self._gold(rollout)
        if gold is not None:
            stats["gold"] = gold.mean()
        # One reduction for every number (and one host sync).
        keys = sorted(stats)
        packed = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=self.device).reshape(()) for k in keys])
        packed = (dist.all_reduce_sum(packed) / dist.world_size()).tolist()
        metrics = dict(zip(keys, packed))
        metrics["kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(metrics["kl"], len(rollout) * dist.world_size())
        response_tokens = float(rollout.lengths.sum()) * dist.world_size()
        total_tokens = float(rollout.attention_mask.sum()) * dist.world_size()
        metrics.update(
            rollout_s=t1 - t0, score_s=t2 - t1, update_s=t3 - t2,
            rollout_tokens_per_s=response_tokens / max(t1 - t0, 1e-9),
            update_tokens_per_s=total_tokens * self.epochs / max(t3 - t2, 1e-9),
            tokens_per_s=response_tokens / max(t3 - t0, 1e-9),
            lr=self.scheduler.get_last_lr()[0],
        )  # fmt: skip
        return metrics

    def _gold(self, rollout) -> torch.Tensor | None:
        try:
            return torch.tensor(task_gold(rollout.prompts, rollout.responses, self.task), device=self.device)
        except ValueError:  # prompts that are not the built-in task's: no gold score
            return None

    def backends(self) -> dict[str, str]:
        """Which provider the "auto" (or configured) backend runs for each fused op family here."""
        name = self.config.train.backend
        dtype = torch.bfloat16 if self.device.type == "cuda" and self.config.train.precision != "fp32" else torch.float32
        ops = ("token_logprobs", "ppo_advantages", "group_advantages", "kl_rewards")
        return {f"backend_{op}": registry.resolve(name, self.device, dtype if op == "token_logprobs" else torch.float32, op=op).name for op in ops}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, policy=None) -> dict[str, float]:
        """Held-out metrics of ``policy`` (default: the trained policy) on the evaluation prompts, with a
        fixed sampling seed: the configured reward (``score``, and its parts ``rm_score`` and
        ``fn_score`` as in training), the built-in task's gold score, and KL to the reference."""
        if not self.eval_prompts:
            return {}
        policy = policy if policy is not None else self.policy
        gold_fn = None
        try:
            for p in self.eval_prompts[:1]:
                self.task.parse_prompt(p)
            gold_fn = lambda prompts, responses: task_gold(prompts, responses, self.task)  # noqa: E731
        except ValueError:
            pass
        return evaluate_policy(
            policy, self.ref_policy, self.tokenizer, self.eval_prompts, self.config.rollout, score_fn=lambda rollout: response_scores(self, rollout),
            score_keys=self._eval_score_keys(), gold_fn=gold_fn, batch_size=self.config.train.eval_batch_size,
            seed=self.config.train.seed + 1, backend=self.config.train.backend,
        )  # fmt: skip

    def _eval_score_keys(self) -> tuple[str, ...]:
        parts = ("rm_score",) * (self.reward_model is not None) + ("fn_score",) * (self.reward_fn is not None)
        return ("score", *parts) if parts else ()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint holds; sharded (FSDP2), the models' and optimizer's shards are written
        apart (``fsdp.ShardedCheckpoints``), and this is every process's own rest."""
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "kl_coef": self.kl_ctl.value,
            "rng": checkpoint.rng_state(),
            "data": self.prompt_stream.state_dict(),
            "config": to_dict(self.config),
        }
        if not self.sharded:
            state.update(model=self.policy.state_dict(), critic=self.critic.state_dict() if self.critic is not None else {},
                         optimizer=self.optimizer.state_dict())  # fmt: skip
        return state

    def load_state_dict(self, payload: dict) -> None:
        if not self.sharded:
            self.policy.load_state_dict(payload["model"])
            if self.critic is not None:
                self.critic.load_state_dict(payload["critic"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.kl_ctl.value = float(payload["kl_coef"])
        self.prompt_stream.load_state_dict(payload["data"])
        checkpoint.set_rng_state(payload["rng"])

    # ------------------------------------------------------------------ the run
    @property
    def module(self) -> torch.nn.Module:
        """The model being trained, under the name hooks read on every run (``loop.Hooks``): the policy."""
        return self.policy

    def log(self, metrics: dict[str, float]) -> None:
        """Every log_every steps (and at the last), the step's metrics and the backends that ran."""
        train = self.config.train
        if self.step % train.log_every == 0 or self.step == train.steps:
            self.metrics.write({"step": self.step, "split": "train", **metrics, **self.backend_names})

    def train(self) -> dict[str, float]:
        """Run (or resume) RL (``loop.run_steps``); at the last step save model/ (policy + tokenizer),
        the plot and summary.json."""
        cfg = self.config
        start_run(cfg, self)
        run_steps(self, cfg.train, desc=f"rl:{cfg.algo.name}", shown=("score", "gold", "kl"))
        if self.step == cfg.train.steps:
            self.save_model(self.out_dir / "model")
            self.plot()
            save_summary(self.out_dir, {"step": self.step, "algo": cfg.algo.name, "eval": self.last_eval, **self.backend_names})
        dist.barrier()  # every rank returns once rank 0 has written the run's files
        return self.last_eval

    def save_model(self, directory: Path) -> None:
        """The policy and its tokenizer as a transformers directory (written aside, then renamed)."""
        save_policy(self.policy, self.tokenizer, directory)

    def plot(self) -> Path | None:
        """metrics.png: score, gold, KL, entropy, response length, value loss over the RL steps."""
        panels = ("score", "gold", "kl", "entropy", "response_length", "value_loss")
        return plot_run(self.out_dir, f"RL ({self.config.algo.name})", panels=panels)
