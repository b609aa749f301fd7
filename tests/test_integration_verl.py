"""rlhf_fast.integrations.verl against verl's own code: with ``register()`` active, the policy
losses and advantage estimators registered under rlhf_fast_<name>, called through verl's registry
(``get_policy_loss_fn`` with the keyword arguments verl's actor passes, ``get_adv_estimator_fn``
with those of ``compute_advantage``), give the values, gradients and metrics of verl's built-ins of
the same name on random batches with padding; the replaced log-prob and entropy functions give
verl's values and gradients; ``unregister()`` puts verl's back.

Needs verl's pure-Python part (pip install --no-deps verl==0.9.1 and the few small packages its
core imports; see README); skipped without it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from numerics import random_mask, rel_err, tolerance

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (pip install --no-deps verl==0.9.1, see README)")  # fmt: skip

import verl.utils.torch_functional as verl_F
from verl.trainer.config import AlgoConfig
from verl.workers.config import ActorConfig, PolicyLossConfig

from rlhf_fast.integrations import UntestedVersionWarning
from rlhf_fast.integrations import verl as ours

# Two float32 computations of one formula, each within the float32 budget of the exact value.
BUDGET = 2 * tolerance(torch.float32)
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
MODES = ("vanilla", "gspo", "cispo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean")
VERL_ORIGINALS = {name: getattr(verl_F, name) for name in ("logprobs_from_logits", "entropy_from_logits",
                                                           "entropy_from_logits_with_chunking")}  # fmt: skip


@pytest.fixture
def registered():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntestedVersionWarning)
        ours.register(replace_gae=True)
    yield
    ours.unregister()


def actor_config(mode: str, global_info: bool, mask: torch.Tensor, policy_loss=None, **overrides) -> ActorConfig:
    """verl's actor config with a clip-higher range, dual clip, SAPO temperatures, and Cov ratios and bounds
    large enough to select several tokens; ``global_info`` sets the global batch info verl's actor
    sets for a batch split over 2 data-parallel ranks. ``overrides`` (and ``policy_loss``, a dict)
    replace fields (the config is frozen once built)."""
    policy_loss = {"loss_mode": mode, "clip_cov_ratio": 0.1, "clip_cov_lb": 0.2, "kl_cov_ratio": 0.05, "ppo_kl_coef": 0.1} | (
        policy_loss or {})
    fields = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "tau_pos": 1.0,
              "tau_neg": 1.05} | overrides  # fmt: skip
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                         policy_loss=PolicyLossConfig(**policy_loss), **fields)  # fmt: skip
    if global_info:
        config.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3,
                                        global_batch_size=int(mask.any(-1).sum()) * 2 + 1, loss_scale_factor=30)  # fmt: skip
    return config


def loss_batch(rows=10, tokens=24, per_row_advantage=False):
    """Responses with padding (right, left, holes, an empty row, a full row), log-ratios spread
    over and beyond the clip range, advantages of both signs (per token, or one per response)."""
    mask = random_mask(rows, tokens, "mixed")
    old = -2 * torch.rand(rows, tokens) - 0.05
    log_prob = old + 0.4 * torch.randn(rows, tokens)
    advantages = torch.randn(rows, 1).expand(rows, tokens).clone() if per_row_advantage else torch.randn(rows, tokens)
    weights = torch.exp(0.3 * torch.randn(rows, tokens)).clamp(max=2.0)
    return old, log_prob, advantages, mask, weights


def call(fn, old, log_prob, advantages, mask, agg, config, weights):
    """The call verl's actor makes (verl.workers.utils.losses.ppo_loss), with a gradient to log_prob."""
    log_prob = log_prob.clone().requires_grad_()
    rng = torch.get_rng_state()
    loss, metrics = fn(old_log_prob=old, log_prob=log_prob, advantages=advantages, response_mask=mask,
                       loss_agg_mode=agg, config=config, rollout_is_weights=weights)  # fmt: skip
    torch.set_rng_state(rng)  # clip_cov draws its tokens from torch's generator: the same draw for both
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), metrics, grad


def term_scale(old, log_prob, advantages, mask, agg, config):
    """verl's aggregation (with the config's global batch info) of the terms' sizes |A| ratio, and
    that of token-mean, whichever is larger: the scale of a loss whose terms may cancel."""
    sizes = (advantages.abs() * torch.exp(log_prob - old)).double()
    return max(core_algos.agg_loss(sizes, mask, mode, **config.global_batch_info).item() for mode in (agg, "token-mean"))


def cut_terms(old, log_prob, advantages, mask, grad, config):
    """clip_cov's selected tokens, found from verl's gradient (0 on a token that is valid, unclipped
    and has A != 0 only when it was selected), and their PPO terms -A r (verl zeroes them, rlhf_fast
    detaches them)."""
    ratio = torch.exp(log_prob - old)
    clipped = ((advantages > 0) & (ratio > 1 + config.clip_ratio_high)) | ((advantages < 0) & (ratio < 1 - config.clip_ratio_low))
    cut = mask & ~clipped & (advantages != 0) & (grad == 0)
    return torch.where(cut, -advantages * ratio, 0.0), cut


@pytest.mark.parametrize("global_info", [False, True], ids=["local", "dp2-global"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_matches_verl(registered, mode, agg, global_info):
    old, log_prob, advantages, mask, weights = loss_batch(per_row_advantage=mode == "geo_mean")
    config = actor_config(mode, global_info, mask)
    for rollout_weights in (None, weights):
        args = (old, log_prob, advantages, mask, agg, config, rollout_weights)
        theirs, their_metrics, their_grad = call(core_algos.get_policy_loss_fn(mode), *args)
        mine, my_metrics, my_grad = call(core_algos.get_policy_loss_fn("rlhf_fast_" + mode), *args)
        if mode == "clip_cov":
            terms, cut = cut_terms(old, log_prob, advantages, mask, their_grad, config)
            assert cut.any(), "no token selected: the case tests nothing"
            terms = terms if rollout_weights is None else terms * rollout_weights
            theirs = theirs + core_algos.agg_loss(terms, mask, agg, **config.global_batch_info)
        scale = term_scale(old, log_prob, advantages, mask, agg, config) + 1e-3
        assert abs(mine.item() - theirs.item()) <= BUDGET * scale, (mine.item(), theirs.item(), scale)
        assert rel_err(my_grad, their_grad) <= BUDGET, rel_err(my_grad, their_grad)
        assert my_metrics.keys() == their_metrics.keys()
        for name in my_metrics:
            assert my_metrics[name] == pytest.approx(their_metrics[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("agg", AGGS)
def test_gspo_sequence_is_verl_gspo_with_one_advantage_per_response(registered, agg):
    """GSPO's sequence-level form (which verl lacks) equals verl's gspo when each response has one advantage."""
    old, log_prob, advantages, mask, _ = loss_batch(per_row_advantage=True)
    config = actor_config("gspo", False, mask)
    args = (old, log_prob, advantages, mask, agg, config, None)  # per-token IS weights would tell them apart
    theirs, their_metrics, their_grad = call(core_algos.get_policy_loss_fn("gspo"), *args)
    mine, my_metrics, my_grad = call(core_algos.get_policy_loss_fn("rlhf_fast_gspo_sequence"), *args)
    scale = term_scale(old, log_prob, advantages, mask, agg, config)
    assert abs(mine.item() - theirs.item()) <= BUDGET * scale
    assert rel_err(my_grad, their_grad) <= BUDGET
    assert my_metrics == pytest.approx(their_metrics, rel=1e-5, abs=1e-6)


def test_unsupported_config_is_named(registered):
    old, log_prob, advantages, mask, _ = loss_batch()
    fn = core_algos.get_policy_loss_fn("rlhf_fast_vanilla")
    with pytest.raises(ValueError, match="clip_ratio_c=0.5"):
        fn(old, log_prob, advantages, mask, "token-mean", actor_config("vanilla", False, mask, clip_ratio_c=0.5))
    with pytest.raises(ValueError, match="loss_agg_mode='token-median'"):
        fn(old, log_prob, advantages, mask, "token-median", actor_config("vanilla", False, mask))
    config = actor_config("cispo", False, mask, clip_ratio_low=-0.1)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        core_algos.get_policy_loss_fn("rlhf_fast_cispo")(old, log_prob, advantages, mask, "token-mean", config)
    config = actor_config("clip_cov", False, mask, policy_loss={"clip_cov_ub": 0.1})
    with pytest.raises(ValueError, match="policy_loss.clip_cov_ub"):
        core_algos.get_policy_loss_fn("rlhf_fast_clip_cov")(old, log_prob, advantages, mask, "token-mean", config)
    with pytest.raises(TypeError, match="algorithm config"):
        fn(old, log_prob, advantages, mask, "token-mean", AlgoConfig())
    config = actor_config("vanilla", False, mask)
    config.global_batch_info.update(dp_size=2, batch_num_tokens=None)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fn(old, log_prob, advantages, mask, "token-mean", config)


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------

# verl's rloo_vectorized gives a lone response 0 where its rloo keeps the score: rlhf_fast_rloo is rloo.
ESTIMATORS = ("grpo", "grpo_vectorized", "rloo", "opo", "grpo_passk", "gpg", "reinforce_plus_plus",
              "reinforce_plus_plus_baseline", "remax")  # fmt: skip


def adv_batch(estimator: str, rows=14, tokens=12):
    """verl's compute_advantage inputs: outcome rewards at each response's last token (per-token
    ones for the return-based estimators), an int64 mask with padding (verl's, from the attention
    mask), and a uid per prompt as strings, groups of 1 to 4 responses in any order (at least 2
    for pass@k)."""
    mask = random_mask(rows, tokens, "right") | (torch.arange(tokens) < 2)  # every response has 2+ tokens
    scores = torch.randn(rows)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask
    if estimator in ("reinforce_plus_plus", "remax"):
        rewards = torch.where(mask, 0.1 * torch.randn(rows, tokens), 0.0) + torch.where(last, scores[:, None], 0.0)
    else:
        rewards = torch.where(last, scores[:, None], 0.0)
    sizes = [2, 3, 4, 2, 3] if estimator == "grpo_passk" else [1, 3, 4, 2, 1, 3]
    groups = np.repeat(np.arange(len(sizes)), sizes)[:rows]
    groups = np.concatenate([groups, np.full(rows - len(groups), len(sizes))]) if len(groups) < rows else groups
    uid = np.array([f"prompt-{g}" for g in np.random.default_rng(int(torch.randint(0, 2**31, ()))).permutation(groups)],
                   dtype=object)  # fmt: skip
    return rewards, mask.long(), uid


def compute_advantage_kwargs(estimator, rewards, mask, uid, config):
    """The keyword arguments verl.trainer.ppo.ray_trainer.compute_advantage passes to a registered estimator."""
    kwargs = {"token_level_rewards": rewards.clone(), "response_mask": mask.clone(), "config": config, "index": uid}
    if estimator == "remax":
        kwargs["reward_baselines"] = torch.randn(rewards.shape[0])
    return kwargs


@pytest.mark.parametrize("norm", [True, False], ids=["std", "no-std"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantage_estimator_matches_verl(registered, estimator, norm):
    if estimator == "grpo_passk" and not norm:
        pytest.skip("rlhf_fast_grpo_passk raises on norm_adv_by_std_in_grpo=False (test_passk_without_std_is_named)")
    rewards, mask, uid = adv_batch(estimator)
    config = AlgoConfig(gamma=0.9, lam=0.95, norm_adv_by_std_in_grpo=norm)
    kwargs = compute_advantage_kwargs(estimator, rewards, mask, uid, config)
    if estimator.startswith("grpo"):
        kwargs["norm_adv_by_std_in_grpo"] = norm  # verl's grpo takes it as an argument (ray_trainer's direct call)
    their_adv, their_ret = core_algos.get_adv_estimator_fn(estimator)(**kwargs)
    mine = estimator.removesuffix("_vectorized")
    my_adv, my_ret = core_algos.get_adv_estimator_fn("rlhf_fast_" + mine)(**kwargs)
    on = mask.bool()
    assert rel_err(my_adv[on], their_adv[on]) <= BUDGET, rel_err(my_adv[on], their_adv[on])
    assert rel_err(my_ret[on], their_ret[on]) <= BUDGET, rel_err(my_ret[on], their_ret[on])
    assert not my_adv[~on].any() and not my_ret[~on].any()


def test_gae_matches_verl_and_replaces_it(registered):
    """rlhf_fast_gae, and verl's compute_gae_advantage_return replaced by it (register(replace_gae=True))."""
    rows, tokens = 9, 16
    mask = (random_mask(rows, tokens, "holes") | (torch.arange(tokens) < 1)).long()
    rewards, values = torch.randn(rows, tokens), torch.randn(rows, tokens)
    original = ours._patched[ours.GAE_REPLACEMENT]
    their_adv, their_ret = original(token_level_rewards=rewards, values=values, response_mask=mask, gamma=0.99, lam=0.95)
    for fn in (core_algos.get_adv_estimator_fn("rlhf_fast_gae"), core_algos.compute_gae_advantage_return):
        my_adv, my_ret = fn(token_level_rewards=rewards, values=values, response_mask=mask, gamma=0.99, lam=0.95)
        assert rel_err(my_adv[mask.bool()], their_adv[mask.bool()]) <= BUDGET
        assert rel_err(my_ret[mask.bool()], their_ret[mask.bool()]) <= BUDGET


def test_passk_without_std_is_named(registered):
    rewards, mask, uid = adv_batch("grpo_passk")
    config = AlgoConfig(norm_adv_by_std_in_grpo=False)
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
        core_algos.get_adv_estimator_fn("rlhf_fast_grpo_passk")(**compute_advantage_kwargs("grpo_passk", rewards, mask, uid, config))


# ---------------------------------------------------------------------------------------------
# Log-probs and entropies
# ---------------------------------------------------------------------------------------------


def logits_case(rows=6, tokens=7, vocab=97):
    logits = 3 * torch.randn(rows, tokens, vocab)
    return logits, torch.randint(0, vocab, (rows, tokens))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_logprobs_from_logits_is_ours_with_verls_values_and_gradients(registered, inplace_backward):
    logits, labels = logits_case()
    upstream = torch.randn(labels.shape)
    results = []
    for fn in (VERL_ORIGINALS["logprobs_from_logits"], verl_F.logprobs_from_logits):
        leaf = logits.clone().requires_grad_()
        logp = fn(leaf * 1.0, labels, inplace_backward=inplace_backward)  # a non-leaf, as the model's logits
        (logp * upstream).sum().backward()
        results.append((logp.detach(), leaf.grad))
    assert verl_F.logprobs_from_logits is ours.logprobs_from_logits
    assert rel_err(results[1][0], results[0][0]) <= BUDGET
    assert rel_err(results[1][1], results[0][1], floor=labels.numel() ** 0.5) <= BUDGET


@pytest.mark.parametrize("name", ["entropy_from_logits", "entropy_from_logits_with_chunking"])
def test_entropy_from_logits_is_ours_with_verls_values_and_gradients(registered, name):
    logits, _ = logits_case()
    logits = logits.reshape(-1, logits.shape[-1])  # the engine's [total_nnz, V]
    upstream = torch.randn(logits.shape[0])
    results = []
    for fn in (VERL_ORIGINALS[name], getattr(verl_F, name)):
        leaf = logits.clone().requires_grad_()
        entropy = fn(leaf)
        (entropy * upstream).sum().backward()
        results.append((entropy.detach(), leaf.grad))
    assert getattr(verl_F, name) is getattr(ours, name)
    assert rel_err(results[1][0], results[0][0]) <= BUDGET
    assert rel_err(results[1][1], results[0][1], floor=logits.shape[0] ** 0.5) <= BUDGET


def test_fused_linear_for_ppo_is_ours_with_verls_values_and_gradients():
    experimental = pytest.importorskip("verl.utils.experimental.torch_functional")
    theirs_cls = experimental.FusedLinearForPPO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntestedVersionWarning)
        ours.register()
    try:
        assert experimental.FusedLinearForPPO is ours.FusedLinearForPPO
        hidden, weight = torch.randn(2, 9, 16), 0.3 * torch.randn(83, 16)
        labels = torch.randint(0, 83, (2, 9))
        up_logp, up_entropy = torch.randn(2, 9), torch.randn(2, 9)
        results = []
        for cls in (theirs_cls, experimental.FusedLinearForPPO):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            logp, entropy = cls(impl_backend="torch").forward(h, w, labels, temperature=0.7)
            ((logp * up_logp).sum() + (entropy * up_entropy).sum()).backward()
            results.append((logp.detach(), entropy.detach(), h.grad, w.grad))
        for mine, theirs in zip(results[1], results[0], strict=True):
            assert rel_err(mine, theirs) <= BUDGET
    finally:
        ours.unregister()
    assert experimental.FusedLinearForPPO is theirs_cls


def test_linear_cross_entropy_refuses_what_it_cannot_serve(registered):
    hidden, weight, labels = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    logp, entropy = ours.linear_cross_entropy(hidden, weight, labels, 1.0, "none")
    assert logp.shape == entropy.shape == (5,)
    with pytest.raises(ValueError, match="reduction"):
        ours.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    with pytest.raises(ValueError, match="dist_process_group"):
        ours.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())


# ---------------------------------------------------------------------------------------------
# register / unregister
# ---------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_unregister_restores():
    naive_rollout = pytest.importorskip("verl.workers.rollout.naive.naive_rollout")  # binds logprobs_from_logits by name
    losses, estimators = dict(core_algos.POLICY_LOSS_REGISTRY), dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntestedVersionWarning)
        first = ours.register(replace_gae=True)
        assert ours.register(replace_gae=True) == tuple(n for n in first if ":" in n)  # patched once: nothing left to patch
    gae = ours._patched[ours.GAE_REPLACEMENT]
    try:
        assert core_algos.get_policy_loss_fn("rlhf_fast_vanilla") is ours.POLICY_LOSS_FNS["rlhf_fast_vanilla"]
        assert core_algos.get_adv_estimator_fn("rlhf_fast_grpo") is ours.grpo_advantage
        assert core_algos.get_policy_loss_fn("vanilla") is losses["vanilla"]  # verl's own stay
        assert naive_rollout.logprobs_from_logits is ours.logprobs_from_logits
        assert core_algos.compute_gae_advantage_return is ours.gae_advantage
    finally:
        ours.unregister()
    assert core_algos.POLICY_LOSS_REGISTRY == losses and core_algos.ADV_ESTIMATOR_REGISTRY == estimators
    assert naive_rollout.logprobs_from_logits is VERL_ORIGINALS["logprobs_from_logits"]
    assert verl_F.entropy_from_logits is VERL_ORIGINALS["entropy_from_logits"]
    assert core_algos.compute_gae_advantage_return is gae


def test_version_outside_the_tested_range_warns(monkeypatch):
    monkeypatch.setattr(ours, "SUPPORTED", ("0.1", "0.2"))
    with pytest.warns(UntestedVersionWarning, match="verl"):
        ours.register(logprobs=False)
    ours.unregister()
