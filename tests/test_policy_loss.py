"""policy_loss vs the float64 reference, its properties, gradient accumulation and validation."""

from __future__ import annotations

import itertools

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.choices import KL_LOSS_ESTIMATORS

from numerics import CLIPS, KLS, poison, policy_term_scale, random_mask, rel_err

TOL = 2e-5
AGGS = reference.AGG_MODES


def policy_case(rows=7, tokens=13, pattern="mixed", per_token_adv=True, device="cpu"):
    """Advantages of both signs; NaN and inf at every masked position of every input; log-ratios
    cycling along each row through three regimes, so that any row of 3+ valid tokens (the "mixed"
    pattern's full row) exercises them all: inside the clip range, outside it on the side the clip
    cuts (toward the advantage's sign), and outside it on the side it leaves alone (where a dual
    clip may bite)."""
    mask = random_mask(rows, tokens, pattern, device)
    logp = -3 * torch.rand(rows, tokens, device=device)
    adv_shape = (rows, tokens) if per_token_adv else (rows,)
    advantages = torch.randn(adv_shape, device=device)
    toward = torch.sign(advantages if per_token_adv else advantages[:, None].expand(rows, tokens))
    far = 0.3 + 1.5 * torch.rand(rows, tokens, device=device)  # beyond log(1.28), the widest clip
    regime = torch.arange(tokens, device=device) % 3
    log_ratio = torch.where(regime == 0, 0.2 * torch.rand(rows, tokens, device=device) - 0.1,
                            torch.where(regime == 1, toward * far, -toward * far))  # fmt: skip
    old_logp = logp - log_ratio
    ref_logp = logp + 0.3 * torch.randn(rows, tokens, device=device)
    if per_token_adv:
        advantages = poison(advantages, mask)
    return poison(logp, mask), poison(old_logp, mask), advantages, mask, poison(ref_logp, mask)


def run_both(logp, old_logp, advantages, mask, ref_logp, upstream, entropy=None, **options):
    """(loss, stats, grad) of the op in float32 and of the reference in float64."""
    x = logp.clone().requires_grad_(True)
    loss, stats = rlhf_fast.policy_loss(x, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, **options)
    (loss * upstream).backward()
    y = logp.double().requires_grad_(True)
    ref = None if ref_logp is None else ref_logp.double()
    entropy = None if entropy is None else entropy.double()
    want, want_stats = reference.policy_loss(y, old_logp.double(), advantages.double(), mask, ref_logp=ref,
                                             entropy=entropy, **options)  # fmt: skip
    (want * upstream).backward()
    return (loss, stats, x.grad), (want, want_stats, y.grad)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("per_token_adv", [True, False])
def test_matches_reference(agg, clip, with_ref, per_token_adv):
    logp, old_logp, advantages, mask, ref_logp = policy_case(per_token_adv=per_token_adv)
    kl = KLS[1 + torch.randint(0, 4, ()).item()] if with_ref else {}
    upstream = torch.randn(()).item()
    (loss, stats, grad), (want, want_stats, want_grad) = run_both(
        logp, old_logp, advantages, mask, ref_logp if with_ref else None, upstream, agg=agg, **clip, **kl
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    scale = policy_term_scale(logp, old_logp, advantages, mask, agg, ref_logp=ref_logp if with_ref else None, **kl)
    assert abs(loss.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2), (loss.item(), want.item())
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert rel_err(grad, want_grad) < TOL, f"grad: {rel_err(grad, want_grad):.3g}"
    assert set(want_stats) <= set(stats)
    for key, value in stats.items():
        assert value.dtype == torch.float32 and value.shape == () and not value.requires_grad, key
        assert torch.isfinite(value), key
        if key in want_stats:
            assert abs(value.item() - want_stats[key].item()) <= TOL * max(abs(want_stats[key].item()), 1e-2), key
    if clip["clip_eps"] is not None:
        assert 0 < stats["clipfrac"] < 1  # both regimes are exercised


def test_ppo_gradient_at_ratio_one():
    """With logp == old_logp nothing is clipped and the gradient is -A * grad logp (token-mean: / count)."""
    logp, _, advantages, mask, _ = policy_case()
    count = mask.sum()
    for options in ({"clip_eps": 0.2}, {"clip_eps": None}, {"clip_eps": 0.1, "dual_clip": 1.5}):
        x = logp.clone().requires_grad_(True)
        loss, stats = rlhf_fast.policy_loss(x, logp.detach(), advantages, mask, **options)
        loss.backward()
        expected = torch.where(mask, -advantages, 0) / count
        assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-8)
        assert torch.allclose(loss, expected.sum(), rtol=1e-5, atol=1e-7)
        assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and stats["ratio_max"] == 1


def test_zero_gradient_on_clipped_masked_and_extreme_tokens():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 2.0, -2.0]])
    log_ratio = torch.tensor([[0.5, 300.0, -0.5, 2.0, 300.0, 0.0, 0.1, -0.1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    # token: clipped high, clipped high (ratio inf in float32), clipped low, dual-clipped,
    # dual-clipped (ratio inf), masked, inside, inside
    old = torch.full((1, 8), -5.0)
    x = (old + log_ratio).requires_grad_(True)
    loss, stats = rlhf_fast.policy_loss(x, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert (x.grad[0, :6] == 0).all() and (x.grad[0, 6:] != 0).all()
    assert stats["clipfrac"].item() == pytest.approx(3 / 7) and stats["dual_clipfrac"].item() == pytest.approx(2 / 7)
    want, _ = reference.policy_loss(x.detach().double(), old.double(), adv.double(), mask, clip_eps=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("estimator", KL_LOSS_ESTIMATORS)
@pytest.mark.parametrize("kl_clamp", [None, 0.5])
@pytest.mark.parametrize("kl_is_correction", [False, True])
def test_kl_term_options(estimator, kl_clamp, kl_is_correction):
    """The KL term's clamp, straight-through gradient and importance correction vs the reference."""
    logp, old_logp, advantages, mask, ref_logp = policy_case()
    ref_logp = logp + 1.5 * torch.randn_like(logp)  # wide enough that a 0.5 clamp bites
    options = {"kl_coef": 0.3, "kl_estimator": estimator, "kl_clamp": kl_clamp, "kl_is_correction": kl_is_correction}
    upstream = torch.randn(()).item()
    (loss, stats, grad), (want, want_stats, want_grad) = run_both(
        logp, old_logp, advantages, mask, ref_logp, upstream, **options
    )
    scale = policy_term_scale(logp, old_logp, advantages, mask, "token-mean", ref_logp=ref_logp, kl_coef=0.3,
                              kl_estimator=estimator.removesuffix("+"))  # fmt: skip
    assert abs(loss.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2)
    assert rel_err(grad, want_grad) < TOL
    assert abs(stats["kl"].item() - want_stats["kl"].item()) <= TOL * max(abs(want_stats["kl"].item()), 1e-2)


def test_kl_term_equals_verl_and_trl():
    """verl's low_var_kl (k3 clamped at 10) and its "k3+" (k2's gradient); TRL's
    use_bias_correction_kl (k3 times the ratio), written as the peers write them."""
    logp = -torch.rand(3, 7, dtype=torch.float64) * 4
    ref_logp = logp + torch.linspace(-30, 30, 21, dtype=torch.float64).view(3, 7)
    old_logp = logp + 0.2 * torch.randn_like(logp)
    mask = torch.ones(3, 7, dtype=torch.bool)
    zero_adv = torch.zeros(3, 7)

    def ours(x, **options):
        loss, _ = rlhf_fast.policy_loss(x, old_logp.float(), zero_adv, mask, ref_logp=ref_logp.float(), kl_coef=1.0,
                                        agg="token-sum", **options)  # fmt: skip
        return loss

    kl = (ref_logp - logp).clamp(-20, 20)  # verl kl_penalty_forward, "low_var_kl"
    low_var_kl = (kl.exp() - kl - 1).clamp(-10, 10)
    x = logp.float().requires_grad_(True)
    ours(x, kl_estimator="k3", kl_clamp=10.0).backward()
    assert rel_err(ours(logp.float(), kl_estimator="k3", kl_clamp=10.0), low_var_kl.sum()) < 1e-6
    y = logp.float().requires_grad_(True)
    ours(y, kl_estimator="k3+", kl_clamp=10.0).backward()
    assert rel_err(y.grad, logp - ref_logp) < 1e-6  # k2's gradient: d = logp - ref_logp
    assert (x.grad[low_var_kl.abs() >= 10] == 0).all()

    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # TRL grpo_trainer, beta != 0
    coef_1 = torch.exp(logp - old_logp)
    near = (ref_logp - logp).abs() < 5  # keep e^30 out: the float32 op and this float64 line differ there
    trl = (per_token_kl * coef_1)[near].sum()
    got, _ = rlhf_fast.policy_loss(logp.float()[near].view(1, -1), old_logp.float()[near].view(1, -1),
                                   zero_adv[near].view(1, -1), mask[near].view(1, -1),
                                   ref_logp=ref_logp.float()[near].view(1, -1), kl_coef=1.0, agg="token-sum",
                                   kl_is_correction=True)  # fmt: skip
    assert rel_err(got, trl) < 1e-5


@pytest.mark.parametrize("quantile", [0.2, 0.5, 1.0])
def test_top_entropy_quantile(quantile):
    """Only the high-entropy tokens keep their policy-gradient term, as TRL's GRPOTrainer masks
    them: threshold = torch.quantile(entropies[mask], 1 - q), kept = entropies >= threshold."""
    logp, old_logp, advantages, mask, ref_logp = policy_case(rows=6, tokens=11)
    entropy = poison(3 * torch.rand(6, 11), mask)
    options = {"top_entropy_quantile": quantile, "kl_coef": 0.1}
    (loss, stats, grad), (want, want_stats, want_grad) = run_both(
        logp, old_logp, advantages, mask, ref_logp, 1.0, entropy=entropy, **options
    )
    assert rel_err(loss, want) < TOL and rel_err(grad, want_grad) < TOL
    threshold = torch.quantile(entropy[mask], 1 - quantile)  # TRL get_high_entropy_mask
    kept = mask & (entropy >= threshold)
    if quantile < 1:
        assert stats["entropy_mask_frac"].item() == pytest.approx(kept.sum().item() / mask.sum().item())
    no_kl, _ = rlhf_fast.policy_loss(logp, old_logp, advantages, mask, entropy=entropy, top_entropy_quantile=quantile)
    per_token = torch.maximum(-advantages * (logp - old_logp).exp(), -advantages * (logp - old_logp).exp().clamp(0.8, 1.2))
    trl = torch.where(kept, per_token, 0.0).sum() / mask.sum()
    assert rel_err(no_kl, trl) < TOL


def test_top_entropy_quantile_needs_entropies():
    logp, old_logp, advantages, mask, _ = policy_case()
    with pytest.raises(ValueError, match="pass entropy="):
        rlhf_fast.policy_loss(logp, old_logp, advantages, mask, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="top_entropy_quantile must be a finite number > 0.0 and <= 1.0"):
        rlhf_fast.PolicyLossOptions(top_entropy_quantile=0.0)


@pytest.mark.parametrize("agg", AGGS)
def test_no_valid_token(agg):
    logp, old_logp, advantages, _, ref_logp = policy_case()
    mask = torch.zeros_like(logp, dtype=torch.bool)
    x = poison(logp, mask).requires_grad_(True)
    loss, stats = rlhf_fast.policy_loss(x, poison(old_logp, mask), poison(advantages, mask), mask,
                                        ref_logp=poison(ref_logp, mask), kl_coef=0.1, agg=agg)  # fmt: skip
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()
    assert all(torch.isfinite(v) and v == 0 for v in stats.values())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("per_token_adv", [True, False])
def test_gradient_accumulation(agg, per_token_adv):
    """Micro-batches with uneven token counts, each normalised by the global loss_normalizer,
    add up to the full-batch loss and gradient."""
    logp, old_logp, advantages, mask, ref_logp = policy_case(rows=9, tokens=11, per_token_adv=per_token_adv)
    options = {"agg": agg, "clip_eps": 0.2, "dual_clip": 3.0, "kl_coef": 0.1}
    x = logp.clone().requires_grad_(True)
    full, _ = rlhf_fast.policy_loss(x, old_logp, advantages, mask, ref_logp=ref_logp, **options)
    full.backward()

    splits = [slice(0, 1), slice(1, 5), slice(5, 9)]
    total = rlhf_fast.global_loss_normalizer([mask[s] for s in splits], agg)
    y = logp.clone().requires_grad_(True)
    summed = 0.0
    for s in splits:
        loss, _ = rlhf_fast.policy_loss(y[s], old_logp[s], advantages[s], mask[s], ref_logp=ref_logp[s],
                                        normalizer=total, **options)  # fmt: skip
        loss.backward()
        summed += loss.item()
    scale = policy_term_scale(logp, old_logp, advantages, mask, agg, ref_logp=ref_logp, kl_coef=0.1)
    assert abs(summed - full.item()) <= 1e-5 * max(abs(full.item()), scale, 1e-2)
    assert torch.allclose(y.grad, x.grad, rtol=1e-5, atol=1e-8)


def test_module_and_options():
    module = rlhf_fast.nn.PolicyLoss(clip_eps=0.1, clip_eps_high=0.3, agg="seq-mean-token-mean")
    assert "clip_eps_high=0.3" in repr(module)
    logp, old_logp, advantages, mask, _ = policy_case()
    got, _ = module(logp, old_logp, advantages, mask)
    want, _ = rlhf_fast.policy_loss(logp, old_logp, advantages, mask, clip_eps=0.1, clip_eps_high=0.3, agg="seq-mean-token-mean")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="dual_clip must be a finite number > 1.0, got 0.5"):
        rlhf_fast.PolicyLossOptions(dual_clip=0.5)


def test_compile_fullgraph():
    logp, old_logp, advantages, mask, ref_logp = policy_case()

    def fn(x):
        loss, stats = rlhf_fast.policy_loss(x, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.1, dual_clip=3.0)
        return loss, stats["clipfrac"]

    x = logp.clone().requires_grad_(True)
    loss, clipfrac = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    want, want_clipfrac = fn(logp)
    assert torch.allclose(loss, want) and torch.equal(clipfrac, want_clipfrac)


BAD = [
    (dict(old_logp=lambda t: t[:, :-1]), r"old_logp must have shape \(3, 5\)"),
    (dict(advantages=lambda t: t[:2]), r"advantages must have shape \(3, 5\) \(per token\) or \(3,\)"),
    (dict(mask=lambda t: t[:, :2]), r"mask must have shape \(3, 5\)"),
    (dict(ref_logp=lambda t: t.t()), r"ref_logp must have shape \(3, 5\)"),
    (dict(logp=lambda t: t[0]), r"logp must have shape \[B, T\]"),
    (dict(clip_eps=0.0), "clip_eps must be a finite number > 0"),
    (dict(clip_eps=-0.2), "clip_eps must be"),
    (dict(clip_eps_high=0.0), "clip_eps_high must be"),
    (dict(dual_clip=1.0), "dual_clip must be a finite number > 1.0"),
    (dict(agg="mean"), "agg must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(kl_coef=-1.0), "kl_coef must be a finite number >= 0"),
    (dict(kl_coef=0.1, ref_logp=None), "kl_coef=0.1 needs ref_logp"),
    (dict(normalizer=0.0), "normalizer must be a finite number > 0"),
]


@pytest.mark.parametrize("change,pattern", BAD)
def test_bad_inputs(change, pattern):
    t = torch.randn(3, 5)
    args = {"logp": t, "old_logp": t, "advantages": t, "mask": torch.ones(3, 5, dtype=torch.bool), "ref_logp": t}
    options = {}
    for key, value in change.items():
        if key in args:
            args[key] = value(args[key]) if callable(value) else value
        else:
            options[key] = value
    with pytest.raises(ValueError, match=pattern):
        rlhf_fast.policy_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], ref_logp=args["ref_logp"], **options)


@pytest.mark.gpu
def test_no_host_sync_gpu():
    logp, old_logp, advantages, mask, ref_logp = (t.cuda() for t in policy_case())
    x = logp.requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for agg, clip in itertools.product(AGGS, CLIPS):
            loss, stats = rlhf_fast.policy_loss(x, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.1, agg=agg, **clip)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
