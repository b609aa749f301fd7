"""fused_linear_policy_loss vs fused_policy_loss(hidden @ weight.T + bias, ...): loss, stats and the
gradients of hidden, weight and bias, for every policy_loss option, in float64."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.choices import KL_LOSS_ESTIMATORS
from rlhf_fast.reference import AGG_MODES

from numerics import poison, random_mask, rel_err, require

B, T, H, V = 4, 9, 40, 300
# float64 logits, but the [B, T] loss math runs in float32 on both sides (policy_loss_terms), and
# the order differs: we weight each token's gradient by its agg weight before the product, they
# divide at the end. So a few float32 roundings apart.
TOL = 8 * torch.finfo(torch.float32).eps
STAT_TOL = 8 * torch.finfo(torch.float32).eps


def make_inputs(*, per_token_adv=True, with_ref=True, dtype=torch.float64):
    hidden = torch.randn(B, T, H, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, dtype=torch.float64) * 1.5 / H**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    mask = random_mask(B, T, "mixed")
    labels = torch.where(mask, torch.randint(0, V, (B, T)), torch.randint(-5, V + 5, (B, T)))  # junk where masked
    # old_logp near the current policy's, so that some ratios clip and some do not.
    with torch.no_grad():
        logp = reference.linear_token_logprobs(hidden.double(), weight.double(), torch.where(mask, labels, 0), bias=bias.double())
    old_logp = poison(logp + 0.3 * torch.randn(B, T, dtype=torch.float64), mask)
    advantages = torch.randn(B, T, dtype=torch.float64) if per_token_adv else torch.randn(B, dtype=torch.float64)
    ref_logp = poison(logp + 0.2 * torch.randn(B, T, dtype=torch.float64), mask) if with_ref else None
    return hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp


def run_both(inputs, *, backend="host", chunk_size=7, upstream=1.0, **kw):
    """(loss, stats, grads) of the fused-linear op and of fused_policy_loss on explicit float64 logits."""
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = inputs
    loss, stats = rlhf_fast.fused_linear_policy_loss(
        hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp,
        backend=backend, chunk_size=chunk_size, **kw,
    )  # fmt: skip
    (upstream * loss).backward()
    got = (loss.detach(), stats, [t.grad for t in (hidden, weight, bias)])
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    want_loss, want_stats = rlhf_fast.fused_policy_loss(
        reference.linear_logits(h, w, b), labels, old_logp, advantages, mask, ref_logp=ref_logp, backend="torch", **kw
    )
    (upstream * want_loss).backward()
    return got, (want_loss.detach(), want_stats, [h.grad, w.grad, b.grad])


def check(got, want, tol=TOL):
    assert torch.isfinite(got[0]) and abs(got[0].item() - want[0].item()) <= tol * max(1.0, abs(want[0].item()))
    assert set(got[1]) == set(want[1])
    if got[2][0].dtype == torch.float64:  # float64 inputs on both sides: the loss dtype matches too
        assert got[0].dtype == want[0].dtype
    for key in want[1]:
        stat_tol = max(tol, STAT_TOL)
        assert abs(got[1][key].item() - want[1][key].item()) <= stat_tol * max(1.0, abs(want[1][key].item())), key
    for name, a, b in zip(("hidden", "weight", "bias"), got[2], want[2]):
        assert torch.isfinite(a).all() and rel_err(a, b) <= tol, f"grad {name}: rel err {rel_err(a, b):.3g}"


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("backend", ["host", "torch"])
def test_agg_modes_with_entropy(backend, agg):
    require(backend, "cpu", torch.float64)
    check(*run_both(make_inputs(), backend=backend, agg=agg, entropy_coef=0.03, temperature=0.8, kl_coef=0.05))


@pytest.mark.parametrize(
    "options",
    [
        dict(clip_eps=None),
        dict(clip_eps=0.2),
        dict(clip_eps=0.2, clip_eps_high=0.28),
        dict(clip_eps=0.1, dual_clip=1.5),
        dict(clip_eps=0.2, dual_clip=3.0, clip_eps_high=0.3, agg="seq-mean-token-sum-norm"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_clip_options(options):
    check(*run_both(make_inputs(with_ref=False), **options))


@pytest.mark.parametrize("estimator", KL_LOSS_ESTIMATORS)
def test_kl_estimators(estimator):
    check(*run_both(make_inputs(), kl_coef=0.1, kl_estimator=estimator))


@pytest.mark.parametrize("objective", ["ppo", "gspo"])
def test_top_entropy_quantile(objective):
    """The entropy mask ranks the whole batch, so even a separable objective runs two sweeps."""
    check(*run_both(make_inputs(), top_entropy_quantile=0.3, objective=objective, entropy_coef=0.01))


def test_kl_clamp_and_importance_correction():
    check(*run_both(make_inputs(), kl_coef=0.2, kl_estimator="k3+", kl_clamp=0.05, kl_is_correction=True))


def test_ref_logp_without_kl_coef_reports_kl():
    got, want = run_both(make_inputs(), kl_coef=0.0)
    assert "kl" in got[1]
    check(got, want)


@pytest.mark.parametrize("n_chunks_size", [36, 18, 5], ids=["1chunk", "2chunks", "odd"])
def test_chunking_sequence_advantages_normalizer(n_chunks_size):
    """[B] advantages, an explicit normaliser (micro-batch form), a non-unit upstream gradient."""
    inputs = make_inputs(per_token_adv=False)
    got, want = run_both(inputs, chunk_size=n_chunks_size, normalizer=17.0, agg="seq-mean-token-mean",
                         upstream=-0.6, entropy_coef=0.01)  # fmt: skip
    check(got, want)


def test_tensor_normalizer_and_no_valid_token():
    inputs = list(make_inputs())
    check(*run_both(tuple(inputs), normalizer=torch.tensor(11.0)))
    inputs = list(make_inputs())
    inputs[6] = torch.zeros(B, T, dtype=torch.bool)
    got, want = run_both(tuple(inputs), entropy_coef=0.1, kl_coef=0.2)
    assert got[0].item() == 0 and all((g == 0).all() for g in got[2])
    check(got, want)


# The interpreter evaluates both sides of every tl.where: the unselected side warns (0 * inf).
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_float32():
    require("triton", "cpu", torch.float32)
    inputs = make_inputs(dtype=torch.float32)
    got, want = run_both(inputs, backend="triton", entropy_coef=0.02, kl_coef=0.1, dual_clip=2.0, temperature=1.2)
    check(got, want, tol=2e-5)


def test_matches_the_plain_reference():
    """Against reference.fused_linear_policy_loss (float64 throughout): the loss and the stats it has."""
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = make_inputs()
    kw = dict(clip_eps=0.2, dual_clip=2.5, kl_coef=0.1, agg="token-mean", temperature=0.9, entropy_coef=0.05)
    loss, stats = rlhf_fast.fused_linear_policy_loss(
        hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp, chunk_size=10, **kw
    )
    want, want_stats = reference.fused_linear_policy_loss(
        hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp, **kw
    )
    assert abs(loss.item() - want.item()) < 1e-6
    for key in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy"):
        assert abs(stats[key].item() - want_stats[key].item()) < 1e-5, key


def test_module_and_no_grad():
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = make_inputs()
    module = rlhf_fast.nn.FusedLinearPolicyLoss(entropy_coef=0.01, kl_coef=0.1, chunk_size=8)
    loss, stats = module(hidden, weight, labels, old_logp, advantages, mask, bias, ref_logp)
    with torch.no_grad():
        loss2, _ = rlhf_fast.fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, bias=bias, ref_logp=ref_logp,
            entropy_coef=0.01, kl_coef=0.1,
        )  # fmt: skip
    assert loss.requires_grad and not loss2.requires_grad and abs(loss.item() - loss2.item()) < 1e-12
    assert "chunk_size=8" in repr(module) and not stats["entropy"].requires_grad


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (dict(kl_coef=0.1, ref_logp=None), ValueError, "needs ref_logp"),
        (dict(hidden=torch.randn(B * T, H, dtype=torch.float64)), ValueError, r"hidden must have shape \[B, T, H\]"),
        (dict(old_logp=torch.zeros(B, T + 1)), ValueError, "old_logp must have shape"),
        (dict(advantages=torch.zeros(T)), ValueError, "advantages must have shape"),
        (dict(agg="mean"), ValueError, "agg must be one of"),
        (dict(entropy_coef=float("nan")), ValueError, "entropy_coef must be a finite number"),
        (dict(weight=torch.randn(V, H + 1, dtype=torch.float64)), ValueError, "weight must be"),
    ],
)
def test_bad_inputs(change, error, pattern):
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = make_inputs()
    args = dict(hidden=hidden, weight=weight, labels=labels, old_logp=old_logp, advantages=advantages, mask=mask)
    kw = dict(bias=bias, ref_logp=ref_logp)
    for key, value in change.items():
        (args if key in args else kw)[key] = value
    with pytest.raises(error, match=pattern):
        rlhf_fast.fused_linear_policy_loss(*args.values(), **kw)
