"""fused_policy_loss equals token_logprobs + policy_loss - entropy bonus, in value and gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.ops.aggregate import aggregate

from numerics import CLIPS, KLS, LOW_PRECISION, assert_rows_within_one_ulp, backend_params, poison, policy_term_scale, random_mask, rel_err, require

AGGS = reference.AGG_MODES


def fused_case(rows=3, tokens=6, vocab=40, device="cpu", dtype=torch.float32):
    mask = random_mask(rows, tokens, "mixed", device)
    logits = (torch.randn(rows, tokens, vocab, device=device) * 2).to(dtype)
    labels = torch.randint(0, vocab, (rows, tokens), device=device)
    old_logp = reference.token_logprobs(logits.float(), labels) + 0.5 * torch.randn(rows, tokens, device=device)
    ref_logp = old_logp + 0.3 * torch.randn(rows, tokens, device=device)
    advantages = torch.randn(rows, tokens, device=device)
    # What the fused op sees at masked positions: padding ids, -100, out-of-range ids, NaN inputs.
    garbage = torch.tensor([-100, vocab + 7, 0, -1], device=device)[torch.randint(0, 4, (rows, tokens), device=device)]
    fused_labels = torch.where(mask, labels, garbage)
    inputs = (poison(old_logp, mask), poison(advantages, mask), mask, poison(ref_logp, mask))
    return logits, labels, fused_labels, inputs


def composed(logits, labels, old_logp, advantages, mask, ref_logp, *, temperature, entropy_coef, backend, normalizer=None, **options):
    logp, entropy = rlhf_fast.token_logprobs(logits, labels, temperature=temperature, return_entropy=True, backend=backend)
    loss, stats = rlhf_fast.policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, normalizer=normalizer, **options)
    loss = loss - entropy_coef * aggregate(entropy, mask, options.get("agg", "token-mean"), normalizer)
    return loss, stats


def check_equal(backend, logits, labels, fused_labels, inputs, *, temperature, entropy_coef, with_ref, upstream=None,
                **options):  # fmt: skip
    old_logp, advantages, mask, ref_logp = inputs
    ref_logp = ref_logp if with_ref else None
    upstream = torch.randn(()).item() if upstream is None else upstream
    x = logits.clone().requires_grad_(True)
    loss, stats = rlhf_fast.fused_policy_loss(
        x, fused_labels, old_logp, advantages, mask, ref_logp=ref_logp, temperature=temperature,
        entropy_coef=entropy_coef, backend=backend, **options,
    )  # fmt: skip
    (loss * upstream).backward()
    y = logits.clone().requires_grad_(True)
    want, want_stats = composed(y, labels, old_logp, advantages, mask, ref_logp, temperature=temperature,
                                entropy_coef=entropy_coef, backend=backend, **options)  # fmt: skip
    (want * upstream).backward()
    assert torch.allclose(loss, want, rtol=1e-6, atol=1e-7), (loss.item(), want.item())
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    if x.grad.dtype in LOW_PRECISION:
        assert_rows_within_one_ulp(x.grad, y.grad, "grad")
    else:
        assert rel_err(x.grad, y.grad) < 1e-6, f"grad: {rel_err(x.grad, y.grad):.3g}"
    assert set(stats) == set(want_stats) | {"entropy"}
    for key, value in want_stats.items():
        assert torch.allclose(stats[key], value, rtol=1e-6, atol=1e-7), key
    return loss, stats, x.grad


OPTION_GRID = [
    dict(agg=agg, entropy_coef=coef, **clip)
    for agg, clip, coef in itertools.product(AGGS, CLIPS, (0.0, 0.01))
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_equals_composition_every_option(options):
    """Every agg x clip x entropy combination, with a KL loss of a random estimator every other time."""
    case = fused_case()
    with_ref = bool(torch.randint(0, 2, ()))
    kl = KLS[1 + torch.randint(0, 4, ()).item()] if with_ref else {}
    temperature = float(torch.empty(()).uniform_(0.5, 1.5))
    check_equal("torch", *case, temperature=temperature, with_ref=with_ref, **kl, **options)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("options", [
    dict(agg="token-mean", clip_eps=0.2, entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3"),
    dict(agg="seq-mean-token-sum-norm", clip_eps=None, dual_clip=2.0, entropy_coef=0.0),
    dict(agg="token-sum", clip_eps=0.2, entropy_coef=0.01, kl_coef=0.2, kl_estimator="k3+", kl_clamp=0.05,
         kl_is_correction=True),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_composition_every_backend(backend, device, options, dtype):
    require(backend, device, dtype)
    logits, labels, fused_labels, inputs = fused_case(device=device, dtype=dtype)
    check_equal(backend, logits, labels, fused_labels, inputs, temperature=0.8, with_ref=True, **options)


def test_matches_float64_reference():
    logits, labels, fused_labels, (old_logp, advantages, mask, ref_logp) = fused_case(rows=5, tokens=9, vocab=70)
    options = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.1, agg="seq-mean-token-mean")
    x = logits.clone().requires_grad_(True)
    loss, stats = rlhf_fast.fused_policy_loss(x, fused_labels, old_logp, advantages, mask, ref_logp=ref_logp,
                                              temperature=0.9, entropy_coef=0.02, **options)  # fmt: skip
    loss.backward()
    y = logits.double().requires_grad_(True)
    want, want_stats = reference.fused_policy_loss(y, fused_labels, old_logp.double(), advantages.double(), mask,
                                                   ref_logp=ref_logp.double(), temperature=0.9, entropy_coef=0.02,
                                                   **options)  # fmt: skip
    want.backward()
    valid_labels = torch.where(mask, fused_labels, 0)
    logp, entropy = reference.token_logprobs(y.detach(), valid_labels, temperature=0.9, return_entropy=True)
    scale = policy_term_scale(logp, old_logp, advantages, mask, options["agg"], ref_logp=ref_logp, kl_coef=0.1)
    scale += 0.02 * reference.aggregate(entropy, mask, options["agg"]).item()
    assert abs(loss.item() - want.item()) <= 2e-5 * max(abs(want.item()), scale, 1e-2), (loss.item(), want.item())
    assert rel_err(x.grad, y.grad) < 2e-5
    for key, value in want_stats.items():
        assert stats[key].item() == pytest.approx(value.item(), rel=2e-5, abs=1e-7), key


@pytest.mark.parametrize("backend,device", backend_params())
def test_top_entropy_quantile(backend, device):
    """TRL's high-entropy token mask on the entropies the kernel computes, vs the float64 reference."""
    require(backend, device, torch.float32)
    logits, _, fused_labels, (old_logp, advantages, mask, ref_logp) = fused_case(rows=5, tokens=9, vocab=70, device=device)
    options = dict(top_entropy_quantile=0.4, kl_coef=0.1, entropy_coef=0.02, temperature=0.9)
    x = logits.clone().requires_grad_(True)
    loss, stats = rlhf_fast.fused_policy_loss(x, fused_labels, old_logp, advantages, mask, ref_logp=ref_logp,
                                              backend=backend, **options)  # fmt: skip
    loss.backward()
    y = logits.double().cpu().requires_grad_(True)
    want, want_stats = reference.fused_policy_loss(y, fused_labels.cpu(), old_logp.double().cpu(), advantages.double().cpu(),
                                                   mask.cpu(), ref_logp=ref_logp.double().cpu(), **options)  # fmt: skip
    want.backward()
    assert rel_err(loss.cpu(), want) < 2e-5 and rel_err(x.grad.cpu(), y.grad) < 2e-5
    assert stats["entropy_mask_frac"].item() == pytest.approx(want_stats["entropy_mask_frac"].item())
    assert 0.3 < stats["entropy_mask_frac"].item() < 0.5


def test_inplace_backward_and_module():
    logits, _, fused_labels, (old_logp, advantages, mask, ref_logp) = fused_case()
    module = rlhf_fast.nn.FusedPolicyLoss(entropy_coef=0.01, kl_coef=0.1, temperature=0.7)
    assert "entropy_coef=0.01" in repr(module)
    x = logits.clone().requires_grad_(True)
    loss, _ = module(x, fused_labels, old_logp, advantages, mask, ref_logp)
    loss.backward()
    leaf = logits.clone().requires_grad_(True)
    view = leaf * 1.0
    module.inplace_backward = True
    loss2, _ = module(view, fused_labels, old_logp, advantages, mask, ref_logp)
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.allclose(leaf.grad, x.grad, rtol=1e-6, atol=1e-8)


def test_gradient_computed_in_the_forward():
    """Training on the logits alone: the gradient exists when the call returns (in place: in the
    logits' storage), a second backward recomputes it, and an in-place change between forward and
    backward raises, as eager's would."""
    logits, _, fused_labels, (old_logp, advantages, mask, ref_logp) = fused_case()
    args = (fused_labels, old_logp, advantages, mask)
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_fast.fused_policy_loss(x, *args, ref_logp=ref_logp, kl_coef=0.1)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert torch.allclose(x.grad, 2 * first, rtol=1e-6, atol=1e-9)

    leaf = logits.clone().requires_grad_(True)
    view = leaf * 1.0
    loss2, _ = rlhf_fast.fused_policy_loss(view, *args, ref_logp=ref_logp, kl_coef=0.1, inplace_backward=True)
    assert torch.allclose(view.detach(), first, rtol=1e-6, atol=1e-9)  # the gradient, before any backward
    loss2.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be computed again"):
        loss2.backward()

    y = logits.clone().requires_grad_(True)
    loss3, _ = rlhf_fast.fused_policy_loss(y, *args)
    with torch.no_grad():
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss3.backward()


@pytest.mark.parametrize("upstream", [0.5, -0.3, 3.0])
def test_scaled_backward_rounds_once_in_bf16(upstream):
    """A 16-bit gradient scaled by a non-power of two is recomputed from the logits, so it rounds
    once, as the composed ops' does; a power of two (GradScaler) scales it exactly."""
    logits, labels, fused_labels, inputs = fused_case(dtype=torch.bfloat16)
    check_equal("torch", logits, labels, fused_labels, inputs, temperature=1.0, entropy_coef=0.01, with_ref=False,
                upstream=upstream)  # fmt: skip


def test_other_inputs_with_gradients_take_the_composed_path():
    logits, _, fused_labels, (old_logp, advantages, mask, _) = fused_case()
    adv = torch.where(mask, advantages, 0.0).requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_fast.fused_policy_loss(x, fused_labels, old_logp, adv, mask, clip_eps=None)
    loss.backward()
    assert adv.grad is not None and (adv.grad[mask] != 0).any() and x.grad is not None


@pytest.mark.parametrize("agg", AGGS)
def test_gradient_accumulation(agg):
    logits, _, fused_labels, (old_logp, advantages, mask, ref_logp) = fused_case(rows=7, tokens=5)
    options = dict(agg=agg, entropy_coef=0.05, kl_coef=0.1)
    x = logits.clone().requires_grad_(True)
    full, _ = rlhf_fast.fused_policy_loss(x, fused_labels, old_logp, advantages, mask, ref_logp=ref_logp, **options)
    full.backward()
    splits = [slice(0, 2), slice(2, 3), slice(3, 7)]
    total = rlhf_fast.global_loss_normalizer([mask[s] for s in splits], agg)
    y = logits.clone().requires_grad_(True)
    summed = 0.0
    for s in splits:
        loss, _ = rlhf_fast.fused_policy_loss(y[s], fused_labels[s], old_logp[s], advantages[s], mask[s],
                                              ref_logp=ref_logp[s], normalizer=total, **options)  # fmt: skip
        loss.backward()
        summed += loss.item()
    assert summed == pytest.approx(full.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(y.grad, x.grad, rtol=1e-5, atol=1e-8)


def test_no_valid_token():
    logits, _, fused_labels, (old_logp, advantages, mask, ref_logp) = fused_case()
    mask = torch.zeros_like(mask)
    x = logits.clone().requires_grad_(True)
    loss, stats = rlhf_fast.fused_policy_loss(x, fused_labels.clamp(min=0), old_logp, advantages, mask,
                                              ref_logp=ref_logp, entropy_coef=0.1, kl_coef=0.1)  # fmt: skip
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and stats["entropy"] == 0


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda x, y, m: (x[0], y, m), r"logits must have shape \[B, T, V\]"),
        (lambda x, y, m: (x, y[:, :2], m), r"labels must have shape \(2, 3\)"),
        (lambda x, y, m: (x, y.float(), m), "labels must have dtype"),
        (lambda x, y, m: (x, y, m[:1]), r"mask must have shape \(2, 3\)"),
    ],
)
def test_bad_inputs(make, pattern):
    logits, labels, mask = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3)), torch.ones(2, 3, dtype=torch.bool)
    x, y, m = make(logits, labels, mask)
    with pytest.raises((ValueError, TypeError), match=pattern):
        rlhf_fast.fused_policy_loss(x, y, torch.zeros(2, 3), torch.zeros(2), m)
    with pytest.raises(ValueError, match="entropy_coef must be a finite number"):
        rlhf_fast.fused_policy_loss(logits, labels, torch.zeros(2, 3), torch.zeros(2), mask, entropy_coef=float("inf"))
