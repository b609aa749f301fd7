"""The named steps of one RL step, each a plain function a user can replace (no subclassing):

    rollout_step(trainer, prompts)            -> Rollout                 sample responses
    score_step(trainer, rollout)              -> (scores [B], stats)     reward model and/or reward_fn
    sample_step(trainer)                      -> (rollout, scores, stats) the two above with DAPO's shaping
    make_experience(trainer, rollout, scores) -> Experience              old/ref log-probs, values
    advantage_fn(trainer, exp)                -> (advantages, returns)   ADVANTAGE_ESTIMATORS[algo.advantage]
    loss_fn(trainer, micro, normalizer)       -> (loss, stats)           policy (+ value) loss of one micro-batch
    update_step(trainer, exp)                 -> stats                   epochs x minibatches x micro-batches

``trainer`` is the ``RLTrainer`` (config, models, tokenizer, kl controller); shapes as in ``rollout``
(B sequences, R response columns).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

import rlhf_fast
from rlhf_fast.hf import is_dtensor
from rlhf_fast.ops.aggregate import global_loss_normalizer
from rlhf_fast.options import PolicyLossOptions

from .. import dist
from ..fsdp import gathered
from ..loop import NonFiniteError, all_finite, any_process, dist_device, guarded_step
from .rollout import Rollout, cat_rollouts, generate, has_linear_head, response_hidden, response_logits, sequence_logprobs


@dataclass
class Experience:
    """One rollout with everything the update needs; per-row tensors first dim B."""

    rollout: Rollout
    scores: torch.Tensor  # [B] float32 total sequence score
    old_logp: torch.Tensor  # [B, R] policy log-probs at rollout time (recomputed, fused)
    ref_logp: torch.Tensor  # [B, R] reference policy log-probs
    values: torch.Tensor | None = None  # [B, R] critic values at rollout time (ppo)
    advantages: torch.Tensor | None = None  # [B, R] or [B]
    returns: torch.Tensor | None = None  # [B, R] value targets (ppo)

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def __len__(self) -> int:
        return len(self.rollout)

    def select(self, rows: torch.Tensor) -> Experience:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.select(rows) if isinstance(value, Rollout) else (value[rows] if value is not None else None)
        return Experience(**out)


# --------------------------------------------------------------------------------------- rollout
def rollout_step(trainer, prompts: list[str]) -> Rollout:
    """Sample with the policy (the unwrapped module), KV cache on; sharded with FSDP2, with its whole
    parameters gathered for the rollout only (``fsdp.gathered``: no collective per generated token,
    and each process stops at its own EOS)."""
    with gathered(trainer.policy):
        return generate(trainer.policy, trainer.tokenizer, prompts, trainer.config.rollout)


# --------------------------------------------------------------------------------------- score
def _retokenize(tokenizer, rollout: Rollout, device):
    """The rollout's prompt + response texts in another tokenizer's ids, right-padded (with EOS)."""
    prompt_ids = tokenizer(rollout.prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(rollout.responses, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = []
    for p, r, n in zip(prompt_ids, response_ids, rollout.lengths.tolist()):
        ends_with_eos = eos is not None and n > 0  # keep the policy's ending: EOS when it emitted one
        rows.append(list(p) + list(r) + ([eos] if ends_with_eos else []))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def reward_model_scores(trainer, rollout: Rollout) -> torch.Tensor:
    """[B] reward-model scores of prompt + response (read at the last real token, EOS when emitted)."""
    rm = trainer.reward_model
    if trainer.reward_tokenizer is not None:
        ids, mask = _retokenize(trainer.reward_tokenizer, rollout, rollout.input_ids.device)
    else:
        ids, mask = rollout.input_ids, rollout.attention_mask
    return rm.score(ids, mask).float()


def response_scores(trainer, rollout: Rollout) -> dict[str, torch.Tensor]:
    """[B] per response: ``score`` = model_coef * reward model + fn_coef * reward_fn(prompts, responses),
    clipped to reward.clip, and its parts ``rm_score`` and ``fn_score`` (those configured)."""
    cfg = trainer.config.reward
    device = rollout.input_ids.device
    total = torch.zeros(len(rollout), dtype=torch.float32, device=device)
    parts: dict[str, torch.Tensor] = {}
    if trainer.reward_model is not None:
        parts["rm_score"] = reward_model_scores(trainer, rollout)
        total = total + cfg.model_coef * parts["rm_score"]
    if trainer.reward_fn is not None:
        # trainer.reward_fn is checked_reward_fn's wrapper: one float32 number per response.
        parts["fn_score"] = trainer.reward_fn(rollout.prompts, rollout.responses).to(device)
        total = total + cfg.fn_coef * parts["fn_score"]
    if cfg.clip is not None:
        total = total.clamp(-cfg.clip, cfg.clip)
    return {"score": total, **parts}


def score_step(trainer, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``response_scores``: the scores, and the means of their parts as stats. A NaN or inf score
    raises NonFiniteError (``checked_scores``)."""
    parts = response_scores(trainer, rollout)
    checked_scores(trainer, rollout, parts)
    total = parts.pop("score")
    return total, {key: value.mean() for key, value in parts.items()}


def checked_scores(trainer, rollout: Rollout, parts: dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteError when a reward (the reward model's, the reward function's, or their sum)
    is NaN or inf here, naming the first such row, its value, its source, prompt and response. No
    collective: the callers (``sample_step``, ``remax_advantage``) make every process agree once
    (``agree_on``), after its last scoring (dynamic sampling may score several rounds)."""
    for key, source in (("rm_score", "the reward model"), ("fn_score", getattr(trainer.reward_fn, "name", "reward_fn")),
                        ("score", "the sum of the rewards")):  # fmt: skip
        if key not in parts:
            continue
        bad = (~torch.isfinite(parts[key])).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            on = f" on rank {dist.rank()}" if dist.world_size() > 1 else ""
            raise NonFiniteError(
                f"step {trainer.step + 1}: {source} returned {float(parts[key][row])} for row {row}{on} of {len(rollout)} "
                f"({len(bad)} row(s) NaN/inf; prompt {rollout.prompts[row][:60]!r}, response {rollout.responses[row][:60]!r}); "
                "a reward must be a finite number"
            )


def agree_on(trainer, error: NonFiniteError | None) -> None:
    """Raise ``error`` (this process's scoring failed) here, and on every other process an error
    pointing at it: one all-reduce, so no process is left waiting in a later collective."""
    if any_process(error is not None):
        raise error or NonFiniteError(f"step {trainer.step + 1}: another process's rewards are NaN/inf (see its message)")


def scored(trainer, rollout: Rollout):
    """``trainer.score_fn(trainer, rollout)``, or (None, the NonFiniteError it raised)."""
    try:
        return trainer.score_fn(trainer, rollout), None
    except NonFiniteError as error:
        return None, error


# --------------------------------------------------------------------------------------- experience
@torch.no_grad()
def token_values(critic, rollout: Rollout) -> torch.Tensor:
    """[B, R] critic values of the states that emit each response token (0 where masked)."""
    values = critic.token_values(rollout.input_ids, rollout.attention_mask, rollout.prompt_len - 1).float()
    return torch.where(rollout.response_mask, values, 0.0)


@torch.no_grad()
def make_experience(trainer, rollout: Rollout, scores: torch.Tensor) -> tuple[Experience, dict[str, torch.Tensor]]:
    """Recompute the policy's and the reference's log-probs (fused ops) and the critic's values."""
    T, backend = trainer.config.rollout.temperature, trainer.config.train.backend
    trainer.policy.eval()
    old_logp = sequence_logprobs(trainer.policy, rollout, temperature=T, backend=backend)
    trainer.policy.train()
    ref_logp = sequence_logprobs(trainer.ref_policy, rollout, temperature=T, backend=backend)
    values = None
    if trainer.critic is not None:
        trainer.critic.eval()
        values = token_values(trainer.critic, rollout)
        trainer.critic.train()
    mask = rollout.response_mask
    n = mask.sum().clamp(min=1)
    gap = torch.where(mask, (old_logp - rollout.sample_logp).abs(), 0.0)
    kl = torch.where(mask, old_logp - ref_logp, 0.0)
    stats = {
        "logp_mismatch": gap.sum() / n,
        "logp_mismatch_max": gap.max(),
        "kl": kl.sum(-1).mean(),  # k1 per sequence, nats
        "kl_token": kl.sum() / n,
    }
    return Experience(rollout, scores, old_logp, ref_logp, values), stats


# ------------------------------------------------------------------------------- DAPO's sampling
def sample_step(trainer) -> tuple[Rollout, torch.Tensor, dict[str, torch.Tensor]]:
    """``rollout_fn`` then ``score_fn`` on the next prompts, with the rollout options of DAPO
    (Yu et al. 2025, arXiv:2503.14476): the soft overlong punishment added to the scores, dynamic
    sampling (groups with a spread of scores only, more rounds until the batch is full) and
    overlong filtering (truncated responses masked out of the loss, after scoring).

    Dynamic sampling's rounds run in lockstep: rollout and scoring may be collectives (FSDP2's
    gathered generation, a sharded reward model's forward, a user's rollout_fn), so after each round
    the processes decide together whether to sample another (``another_round``: one all-reduce of
    "this process still needs sequences" and "its scoring failed"), and every process runs the same
    number of rounds, at most max_sampling_rounds. A process whose batch is already full samples and
    scores the round too; what it keeps there lies beyond its batch_size rows and is dropped, not kept
    for the next step (carried-over groups would be state a checkpoint must save for a resume to stay
    exact, and stale under the next update). Each process's batch is then filled as in one process:
    its kept groups in order, then its dropped ones when the rounds ran out. ``sampling_rounds`` is
    that common count; ``kept_groups_frac`` counts every row sampled, the surplus rounds' included."""
    cfg = trainer.config.rollout
    most_rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
    kept, dropped, stats, rounds, error = [], [], [], 0, None
    while True:
        rounds += 1
        rollout = trainer.rollout_fn(trainer, trainer.next_prompts())
        result, error = scored(trainer, rollout)
        if error is None:
            scores, score_stats = result
            scores, shaped = overlong_punishment(trainer, rollout, scores)
            stats.append(score_stats | shaped)
            if cfg.dynamic_sampling:
                spread = scores.view(-1, cfg.group_size).std(dim=-1) > 0
                rows = spread.repeat_interleave(cfg.group_size)
                kept.append((rollout.select(rows.nonzero().flatten()), scores[rows]))
                dropped.append((rollout.select((~rows).nonzero().flatten()), scores[~rows]))
            else:
                kept.append((rollout, scores))
        if rounds >= most_rounds:
            break
        short = error is None and sum(len(r) for r, _ in kept) < cfg.batch_size
        if not another_round(short, error is not None):
            break
    agree_on(trainer, error)  # once per step on every process, after the same number of rounds
    parts = [(r, s) for r, s in kept + dropped if len(r)]
    pad = trainer.tokenizer.pad_token_id if trainer.tokenizer.pad_token_id is not None else trainer.tokenizer.eos_token_id
    rollout = cat_rollouts([r for r, _ in parts], pad).select(torch.arange(cfg.batch_size))
    scores = torch.cat([s for _, s in parts])[: cfg.batch_size]
    summary = {key: torch.stack([torch.as_tensor(s[key]).float() for s in stats]).mean() for key in stats[0]}
    if cfg.dynamic_sampling:
        summary["sampling_rounds"] = torch.tensor(float(rounds))
        summary["kept_groups_frac"] = torch.tensor(sum(len(r) for r, _ in kept) / (rounds * cfg.batch_size))
    if cfg.overlong_filter:
        truncated = truncated_responses(trainer, rollout)
        rollout.response_mask = rollout.response_mask & ~truncated.unsqueeze(-1)
        summary["overlong_frac"] = truncated.float().mean()
    return rollout, scores, summary


def another_round(short: bool, failed: bool) -> bool:
    """Whether every process samples another round of dynamic sampling: some process is ``short`` of
    sequences and none's scoring ``failed`` (a failure ends the rounds everywhere at once, and
    ``agree_on`` then raises it). One all-reduce of the two flags, called once per round by all."""
    if not dist.initialized():
        return short and not failed
    flags = torch.tensor([float(short), float(failed)], dtype=torch.float64, device=dist_device())
    any_short, any_failed = (float(x) > 0 for x in dist.all_reduce_sum(flags).tolist())
    return any_short and not any_failed


def truncated_responses(trainer, rollout: Rollout) -> torch.Tensor:
    """[B] bool: responses cut at max_new_tokens before their EOS."""
    full = rollout.response_mask.sum(-1) == trainer.config.rollout.max_new_tokens
    # A full-length row has no right padding (R <= max_new_tokens), so its last column is its last token.
    return full & (rollout.input_ids[:, -1] != trainer.tokenizer.eos_token_id)


def overlong_punishment(trainer, rollout: Rollout, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO's soft overlong punishment, as verl's DAPO reward manager adds it: a response longer than
    L - buffer (L = max_new_tokens) loses factor * (length - (L - buffer)) / buffer, EOS counted."""
    cfg = trainer.config.rollout
    if not cfg.overlong_buffer_len:
        return scores, {}
    excess = rollout.response_mask.sum(-1) - (cfg.max_new_tokens - cfg.overlong_buffer_len)
    penalty = (-excess / cfg.overlong_buffer_len * cfg.overlong_penalty_factor).clamp(max=0.0).to(scores.dtype)
    return scores + penalty, {"overlong_penalty": penalty.mean()}


# --------------------------------------------------------------------------------------- advantages
def _kl_in_reward(trainer) -> float:
    return trainer.kl_ctl.value if trainer.config.algo.kl_place == "reward" else 0.0


def _sequence_kl(exp: Experience, estimator: str, clamp: float | None) -> torch.Tensor:
    kl = rlhf_fast.kl_penalty(exp.old_logp, exp.ref_logp, estimator=estimator)
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return torch.where(exp.mask, kl, 0.0).sum(-1)


ADVANTAGE_ESTIMATORS: dict = {}  # name (choices.ADVANTAGE_ESTIMATORS) -> fn(trainer, exp) -> (advantages, returns)


def register_advantage(name: str):
    def register(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def checked_advantages(result, exp: Experience, *, needs_returns: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An advantage_fn's ``(advantages, returns)``, checked before the update reads them: advantages
    [B] (one per sequence) or [B, R] (per token); returns [B, R] value targets, required when a critic
    is trained (PPO), else ignored."""
    B, R = exp.mask.shape
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"advantage_fn must return (advantages, returns), got {type(result).__name__}")
    advantages, returns = result
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in ((B,), (B, R)):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantage_fn returned advantages of shape {got}; expected [B] = ({B},) or [B, R] = ({B}, {R})")
    if needs_returns and (not isinstance(returns, torch.Tensor) or tuple(returns.shape) != (B, R)):
        got = tuple(returns.shape) if isinstance(returns, torch.Tensor) else returns
        raise ValueError(f"advantage_fn returned returns={got}; the critic (PPO) needs value targets of shape [B, R] = ({B}, {R})")
    return advantages, returns


@register_advantage("gae")
def gae_advantage(trainer, exp: Experience):
    """InstructGPT: per-token rewards -beta * KL plus the score at the last token, GAE, whitening (fused)."""
    algo = trainer.config.algo
    out = rlhf_fast.ppo_advantages(
        exp.old_logp, exp.ref_logp, exp.scores, exp.values, exp.mask,
        beta=_kl_in_reward(trainer), estimator=algo.kl_estimator, gamma=algo.gamma, lam=algo.lam,
        whiten=algo.whiten, kl_clamp=algo.kl_clamp, unbiased=algo.whiten_unbiased, backend=trainer.config.train.backend,
    )  # fmt: skip
    return out.advantages, out.returns


def _sequence_returns(trainer, exp: Experience) -> torch.Tensor:
    """Each sequence's score, minus beta * its KL when the KL is in the reward. [B]"""
    beta = _kl_in_reward(trainer)
    if beta:
        algo = trainer.config.algo
        return exp.scores - beta * _sequence_kl(exp, algo.kl_estimator, algo.kl_clamp)
    return exp.scores


def _group_advantage(mode: str):
    def group_advantage(trainer, exp: Experience):
        returns = _sequence_returns(trainer, exp)
        group_size, backend = trainer.config.rollout.group_size, trainer.config.train.backend
        return rlhf_fast.group_advantages(returns, group_size, mode=mode, backend=backend), None

    group_advantage.__doc__ = f"Group advantages of the returns, mode {mode!r} (rlhf_fast.group_advantages). [B]"
    return group_advantage


for _mode in ("grpo", "drgrpo", "rloo"):
    register_advantage(_mode)(_group_advantage(_mode))


@register_advantage("reinforce")
def reinforce_advantage(trainer, exp: Experience):
    """Monte Carlo return of each sequence minus algo.baseline: none, or the batch mean. [B]"""
    returns = _sequence_returns(trainer, exp)
    if trainer.config.algo.baseline == "mean":
        return returns - returns.mean(), None
    return returns, None


@register_advantage("reinforce_plus_plus")
def reinforce_plus_plus_advantage(trainer, exp: Experience):
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): per-token rewards -beta * KL plus the score at the
    last token, their discounted returns G_t (GAE with no critic and lambda 1, one fused scan), whitened
    over the batch's tokens. [B, T]"""
    algo = trainer.config.algo
    out = rlhf_fast.ppo_advantages(
        exp.old_logp, exp.ref_logp, exp.scores, torch.zeros_like(exp.old_logp), exp.mask,
        beta=_kl_in_reward(trainer), estimator=algo.kl_estimator, gamma=algo.gamma, lam=1.0, whiten=True,
        kl_clamp=algo.kl_clamp, unbiased=algo.whiten_unbiased, backend=trainer.config.train.backend,
    )  # fmt: skip
    return out.advantages, None


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantage(trainer, exp: Experience):
    """REINFORCE++-baseline: the return minus its group's mean, broadcast over the response and
    whitened over the batch's tokens (verl's form). [B, T]"""
    algo, backend = trainer.config.algo, trainer.config.train.backend
    centred = rlhf_fast.group_advantages(_sequence_returns(trainer, exp), trainer.config.rollout.group_size,
                                         mode="drgrpo", backend=backend)  # fmt: skip
    per_token = centred.unsqueeze(-1).expand(exp.mask.shape).contiguous()
    return rlhf_fast.whiten(per_token, exp.mask, unbiased=algo.whiten_unbiased, backend=backend), None


@register_advantage("grpo_passk")
def grpo_passk_advantage(trainer, exp: Experience):
    """GRPO pass@k (arXiv:2503.19595): each group's best response gets its margin over the second,
    over the group's std; the others 0 (rlhf_fast.group_advantages mode passk). [B]"""
    returns = _sequence_returns(trainer, exp)
    return rlhf_fast.group_advantages(returns, trainer.config.rollout.group_size, mode="passk"), None


@register_advantage("opo")
def opo_advantage(trainer, exp: Experience):
    """OPO (arXiv:2505.23585): the return minus its group's response-length-weighted mean. [B]"""
    returns = _sequence_returns(trainer, exp)
    return rlhf_fast.group_advantages(returns, trainer.config.rollout.group_size, mode="opo",
                                      lengths=exp.mask.sum(-1)), None  # fmt: skip


@register_advantage("remax")
def remax_advantage(trainer, exp: Experience):
    """ReMax (Li et al. 2023, arXiv:2310.10505), as verl computes it: the per-token returns (the
    reward-to-go of -beta * KL plus the score at the last token) minus the score of the policy's
    greedy response to the same prompt, generated and scored here, once per group. [B, T]"""
    group_size = trainer.config.rollout.group_size
    with gathered(trainer.policy):
        greedy = generate(trainer.policy, trainer.tokenizer, exp.rollout.prompts[::group_size], trainer.config.rollout,
                          greedy=True)  # fmt: skip
    with torch.no_grad():
        result, error = scored(trainer, greedy)
    agree_on(trainer, error)
    baseline, _ = result
    rewards = rlhf_fast.kl_penalized_rewards(exp.old_logp, exp.ref_logp, exp.scores, exp.mask, beta=_kl_in_reward(trainer),
                                             estimator=trainer.config.algo.kl_estimator,
                                             kl_clamp=trainer.config.algo.kl_clamp)  # fmt: skip
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    per_row = baseline.to(returns).repeat_interleave(group_size).unsqueeze(-1)
    return torch.where(exp.mask, returns - per_row, 0.0), None


@register_advantage("gpg")
def gpg_advantage(trainer, exp: Experience):
    """GPG (arXiv:2504.02546): the group-centred return times B / (responses with a nonzero return),
    which restores the gradient's scale when most groups score 0 (verl's compute_gpg_outcome_advantage). [B]"""
    returns = _sequence_returns(trainer, exp)
    centred = rlhf_fast.group_advantages(returns, trainer.config.rollout.group_size, mode="drgrpo",
                                         backend=trainer.config.train.backend)  # fmt: skip
    return centred * (returns.numel() / torch.count_nonzero(returns).clamp(min=1)), None




# --------------------------------------------------------------------------------------- loss
def policy_loss_options(trainer) -> PolicyLossOptions:
    """The loss options of this step: the algo config, with the adaptive KL coefficient's value now."""
    algo = trainer.config.algo
    kl_in_loss = algo.kl_place == "loss"
    return PolicyLossOptions(
        objective=algo.objective,
        clip_eps=None if algo.name == "reinforce" else algo.clip_eps,
        clip_eps_high=None if algo.name == "reinforce" else algo.clip_eps_high,
        kl_coef=trainer.kl_ctl.value if kl_in_loss else 0.0,
        kl_estimator=algo.kl_estimator,
        kl_clamp=algo.kl_clamp,
        kl_is_correction=algo.kl_is_correction,
        agg=algo.agg,
        max_response_length=algo.max_response_length,
        top_entropy_quantile=algo.top_entropy_quantile,
        **trainer.config.rollout_correction.options(),
    )


def loss_step(trainer, micro: Experience, normalizer: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss of one micro-batch (fused_linear_policy_loss, else fused_policy_loss on the logits),
    plus vf_coef * the clipped value loss with a critic. ``normalizer`` is the global one of the minibatch."""
    cfg = trainer.config
    rollout = micro.rollout
    common = dict(
        old_logp=micro.old_logp, advantages=micro.advantages, mask=micro.mask,
        ref_logp=micro.ref_logp, rollout_logp=rollout.sample_logp, temperature=cfg.rollout.temperature, backend=cfg.train.backend,
        normalizer=normalizer, options=policy_loss_options(trainer), entropy_coef=cfg.algo.entropy_coef,
    )  # fmt: skip
    if has_linear_head(trainer.policy):
        hidden, weight, bias = response_hidden(trainer.policy, rollout)
        head = rlhf_fast.hf.head_options(trainer.policy)  # the logit scale / soft cap of Cohere, Gemma 2 ... heads
        loss, stats = rlhf_fast.fused_linear_policy_loss(hidden, weight, rollout.labels, bias=bias, **common, **head)
    else:
        loss, stats = rlhf_fast.fused_policy_loss(response_logits(trainer.policy, rollout), rollout.labels, **common)
    stats = {"pg_loss": loss.detach(), **stats}
    if trainer.critic is not None:
        values = trainer.critic.token_values(rollout.input_ids, rollout.attention_mask, rollout.prompt_len - 1)
        vf = rlhf_fast.value_loss(
            values, micro.values, micro.returns, micro.mask, clip_eps=cfg.algo.value_clip, agg=cfg.algo.agg, normalizer=normalizer
        )
        stats["value_loss"] = vf.detach()
        loss = loss + cfg.algo.vf_coef * vf
    return loss, stats


# --------------------------------------------------------------------------------------- update
def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes. Each process's loss is divided by the *global* normaliser, so the
    sum is the gradient of the global-batch loss (no averaging by world size). Sharded with FSDP2 the
    backward has already reduce-scattered them (``update_step`` scales the loss for FSDP2's mean)."""
    if not dist.initialized() or any(is_dtensor(p) for p in params):
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce_sum(flat)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def update_step(trainer, exp: Experience) -> dict[str, torch.Tensor]:
    """algo.epochs passes over the batch in shuffled minibatches; one optimizer step per minibatch,
    gradient accumulated over its micro-batches with the minibatch's global ``agg`` normaliser. An
    update whose loss or gradient norm is NaN/inf is skipped (``loop.guarded_step``); the stats count
    them in ``skipped_updates``."""
    cfg = trainer.config
    algo = cfg.algo
    epochs = 1 if algo.name == "reinforce" else algo.epochs
    B, mb, micro = len(exp), algo.mini_batch_size, algo.micro_batch_size
    autocast = trainer.autocast
    sums: dict[str, torch.Tensor] = {}
    count = updates = skipped = 0
    for _ in range(epochs):
        order = torch.randperm(B, device="cpu").to(exp.mask.device)
        for start in range(0, B, mb):
            parts = [exp.select(order[start + i : start + i + micro]) for i in range(0, mb, micro)]
            # The whole minibatch's, over micro-batches and ranks (token-sum's is 1, not a sum).
            normalizer = global_loss_normalizer([p.mask for p in parts], algo.agg,
                                                max_response_length=algo.max_response_length)  # fmt: skip
            losses = []
            sharded = [m for m in (trainer.policy, trainer.critic) if getattr(trainer, "sharded", False) and m is not None]
            # FSDP2 averages the gradients over the processes; the losses' global normaliser wants their sum.
            world = dist.world_size() if sharded else 1
            for i, part in enumerate(parts):
                for model in sharded:  # reduce-scatter once, after the minibatch's last backward
                    model.set_requires_gradient_sync(i == len(parts) - 1)
                with autocast():
                    loss, stats = trainer.loss_fn(trainer, part, normalizer)
                (loss * world if sharded else loss).backward()
                losses.append(loss.detach().float())
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                count += 1
            sync_gradients(trainer.trainable_parameters())
            grad_norm = trainer.clip_gradients()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm * len(parts)
            # A NaN/inf loss or gradient norm on any process skips this update on every process.
            loss = float(torch.stack(losses).sum())
            finite = all_finite(loss, *getattr(trainer, "grad_norms", [grad_norm]))
            updates += 1
            where = f"step {trainer.step + 1}, update {updates} of {epochs * -(-B // mb)}"
            if not guarded_step(trainer, finite, loss=loss, grad_norm=grad_norm, where=where):
                skipped += 1
    return {**{k: v / max(count, 1) for k, v in sums.items()}, "skipped_updates": torch.tensor(float(skipped))}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the valid tokens (1: perfect critic, <= 0: useless)."""
    r, v = returns[mask], values[mask]
    var = r.var(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    return torch.where(var > 0, 1 - (r - v).var(unbiased=False) / var.clamp(min=1e-12), torch.zeros_like(var))


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "Experience",
    "explained_variance",
    "checked_advantages",
    "gae_advantage",
    "loss_step",
    "make_experience",
    "register_advantage",
    "reinforce_advantage",
    "response_scores",
    "reward_model_scores",
    "rollout_step",
    "score_step",
    "sync_gradients",
    "update_step",
]
