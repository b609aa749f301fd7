"""The registered policy objectives (rlhf_fast.objectives) beyond PPO (GSPO, GSPO-token, CISPO, SAPO,
GMPO, GPG, Clip-Cov, KL-Cov) against the float64 reference in every layer: policy_loss, fused_policy_loss and fused_linear_policy_loss
(whose sequence-coupled objectives run as two sweeps), with padding, one-token and empty
responses, extreme ratios and all-masked batches; and the registry's contract."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import objectives, reference
from rlhf_fast.objectives import OBJECTIVES, register_objective

from numerics import poison, policy_term_scale, random_mask, rel_err

TOL = 2e-5
COUPLED = ["gspo", "gspo_token"]
OTHERS = [name for name in OBJECTIVES if name != "ppo"]
CLIPPING = ["gspo", "gspo_token", "cispo", "gmpo"]  # objectives whose clipfrac counts a clip
CLIPS = [{"clip_eps": 0.2}, {"clip_eps": 0.2, "clip_eps_high": 0.28}, {"clip_eps": None}]


def sequence_case(rows=9, tokens=11, per_token_adv=False, pattern="mixed"):
    """Rows whose mean log-ratio (GSPO's log s_i) cycles through three regimes by row: inside the
    clip range, beyond it on the side the clip cuts (toward the advantage's sign), and beyond it
    on the side it leaves alone; tokens scatter around the row's mean. NaN/inf where masked."""
    mask = random_mask(rows, tokens, pattern)
    logp = -3 * torch.rand(rows, tokens)
    seq_adv = torch.randn(rows)
    far = 0.3 + 1.2 * torch.rand(rows)
    regime = torch.arange(rows) % 3
    target = torch.where(regime == 0, 0.1 * torch.rand(rows) - 0.05,
                         torch.where(regime == 1, torch.sign(seq_adv) * far, -torch.sign(seq_adv) * far))  # fmt: skip
    log_ratio = target[:, None] + 0.05 * torch.randn(rows, tokens)
    old_logp = logp - log_ratio
    ref_logp = logp + 0.3 * torch.randn(rows, tokens)
    advantages = seq_adv[:, None] + 0.3 * torch.randn(rows, tokens) if per_token_adv else seq_adv
    if per_token_adv:
        advantages = poison(advantages, mask)
    return poison(logp, mask), poison(old_logp, mask), advantages, mask, poison(ref_logp, mask)


def check_against_reference(inputs, upstream=1.0, **options):
    logp, old_logp, advantages, mask, ref_logp = inputs
    draw = torch.randint(0, 2**31, ()).item()  # Clip-Cov draws its tokens: the same draw on both sides
    x = logp.clone().requires_grad_(True)
    torch.manual_seed(draw)
    loss, stats = rlhf_fast.policy_loss(x, old_logp, advantages, mask, ref_logp=ref_logp, **options)
    (loss * upstream).backward()
    y = logp.double().requires_grad_(True)
    ref = None if ref_logp is None else ref_logp.double()
    torch.manual_seed(draw)
    want, want_stats = reference.policy_loss(y, old_logp.double(), advantages.double(), mask, ref_logp=ref, **options)
    (want * upstream).backward()
    kl = {k: options[k] for k in ("kl_coef", "kl_estimator") if k in options}
    scale = policy_term_scale(logp, old_logp, advantages, mask, options.get("agg", "token-mean"), ref_logp=ref_logp, **kl)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2), (loss.item(), want.item())
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert rel_err(x.grad, y.grad) < TOL, f"grad: {rel_err(x.grad, y.grad):.3g}"
    for key, value in want_stats.items():
        assert abs(stats[key].item() - value.item()) <= TOL * max(abs(value.item()), 1e-2), key
    return stats


@pytest.mark.parametrize("objective", OTHERS)
@pytest.mark.parametrize("agg", reference.AGG_MODES)
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("with_ref", [False, True])
def test_matches_reference(objective, agg, clip, per_token_adv, with_ref):
    logp, old_logp, advantages, mask, ref_logp = sequence_case(per_token_adv=per_token_adv)
    kl = {"kl_coef": 0.1, "kl_estimator": "k3"} if with_ref else {}
    stats = check_against_reference((logp, old_logp, advantages, mask, ref_logp if with_ref else None),
                                    upstream=torch.randn(()).item(), objective=objective, agg=agg, **clip, **kl)  # fmt: skip
    if clip["clip_eps"] is not None and objective in CLIPPING:
        clipped = stats["clipfrac"] + stats.get("clipfrac_lower", 0.0)  # GMPO splits it by the sign of A
        assert 0 < clipped <= 1  # the clip is exercised (some masks leave only rows beyond it)


def test_gspo_gradient_is_the_sequence_mean_and_gspo_token_matches_it():
    """At s_i = 1 nothing clips: GSPO's gradient is -A_i / |y_i| on each token of row i (over the
    number of rows with seq-mean-token-mean: -A_i / (|y_i| R)), and GSPO-token's equals it when
    the advantage is the sequence's."""
    logp, _, advantages, mask, _ = sequence_case()
    count, rows = mask.sum(-1, keepdim=True), (mask.sum(-1) > 0).sum()
    expected = torch.where(mask, -advantages[:, None] / count.clamp(min=1) / rows, 0.0)
    for objective in COUPLED:
        x = logp.clone().requires_grad_(True)
        loss, _ = rlhf_fast.policy_loss(x, logp.detach(), advantages, mask, objective=objective, agg="seq-mean-token-mean")
        loss.backward()
        assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-8), objective


@pytest.mark.parametrize("objective", OTHERS)
def test_short_empty_and_masked_responses(objective):
    """One-token responses, empty rows, an all-masked batch: finite, and 0 with zero gradient where
    nothing is valid."""
    logp, advantages = -3 * torch.rand(6, 5), torch.randn(6)
    old_logp, ref_logp = logp + 0.5 * torch.randn(6, 5), logp + 0.3 * torch.randn(6, 5)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = True  # one-token responses
    mask[2, :] = True  # one full row; rows 3-5 empty
    check_against_reference((poison(logp, mask), poison(old_logp, mask), advantages, mask, poison(ref_logp, mask)),
                            objective=objective, agg="seq-mean-token-mean", kl_coef=0.1)  # fmt: skip
    none = torch.zeros_like(mask)
    x = poison(logp, none).requires_grad_(True)
    loss, stats = rlhf_fast.policy_loss(x, poison(old_logp, none), advantages, none, objective=objective)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and all(v == 0 for v in stats.values())


@pytest.mark.parametrize("objective", OTHERS)
@pytest.mark.parametrize("log_ratio", [50.0, -50.0])
def test_extreme_ratios_stay_finite(objective, log_ratio):
    """|log s| = 50: the clipped side is a constant (zero gradient, no exp of 50 needed), the other
    side is |A| e^50, large but finite in float32: no NaN or inf in the loss or the gradient."""
    mask = torch.ones(4, 6, dtype=torch.bool)
    old = torch.full((4, 6), -60.0)
    advantages = torch.tensor([1.0, -1.0, 2.0, -0.5])
    x = (old + log_ratio).requires_grad_(True)
    loss, _ = rlhf_fast.policy_loss(x, old, advantages, mask, objective=objective, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    want, _ = reference.policy_loss(x.detach().double(), old.double(), advantages.double(), mask, objective=objective,
                                    clip_eps=0.2)  # fmt: skip
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def clear_of_selection_ties(logp, old_logp, advantages, mask, options, gap=1e-4) -> bool:
    """Whether the token selections of clip_cov and kl_cov are decided by margins of at least
    ``gap`` (relative), so that float32 rounding of the log-probs cannot flip them: kl_cov's
    covariance rank at its top-k boundary, clip_cov's covariance bounds and clip range. Valid
    tokens in one sequence only have equal advantages, so every covariance is 0: a tie too."""
    adv = advantages.unsqueeze(-1).expand(mask.shape)
    cov = torch.where(mask, objectives._covariance(logp, adv, mask), torch.nan)[mask]
    size = gap * max(cov.abs().max().item(), 1.0)
    if options.objective == "kl_cov":
        ranked = cov.sort(descending=True).values
        k = min(max(int(options.cov_ratio * ranked.numel()), 1), ranked.numel())
        return k == ranked.numel() or (ranked[k - 1] - ranked[k]).item() > size
    if options.objective == "clip_cov":
        ratio = (logp - old_logp).exp()[mask]
        bounds = (1 - options.clip_eps, 1 + options.clip_eps)
        return all((cov - b).abs().min() > size for b in (options.clip_cov_lb, options.clip_cov_ub)) and all(
            (ratio - b).abs().min() > gap for b in bounds
        )
    return True


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("backend", ["torch", "host"])
def test_fused_ops_equal_the_composition(objective, backend):
    """fused_policy_loss and fused_linear_policy_loss (two sweeps for the coupled objectives) equal
    token_logprobs + policy_loss on explicit logits: loss, stats, and the gradients of the logits,
    of hidden, weight and bias, in float64."""
    B, T, H, V = 4, 7, 16, 97
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5).requires_grad_()
    bias = (0.5 * torch.randn(V, dtype=torch.float64)).requires_grad_()
    options = rlhf_fast.PolicyLossOptions(objective=objective, kl_coef=0.05, agg="seq-mean-token-mean")
    while True:  # the backends' float32 log-probs must pick the tokens the float64 reference picks
        mask = random_mask(B, T, "mixed")
        labels = torch.where(mask, torch.randint(0, V, (B, T)), -7)
        with torch.no_grad():
            logp = reference.linear_token_logprobs(hidden, weight, torch.where(mask, labels, 0), bias=bias)
        old_logp = poison(logp + 0.3 * torch.randn(B, T, dtype=torch.float64), mask)
        advantages = torch.randn(B, dtype=torch.float64)
        if clear_of_selection_ties(logp, old_logp, advantages, mask, options):
            break
    ref_logp = poison(logp + 0.2 * torch.randn(B, T, dtype=torch.float64), mask)
    kw = dict(ref_logp=ref_logp, options=options, entropy_coef=0.01, temperature=0.9)

    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    torch.manual_seed(0)  # the same Clip-Cov draw in every call
    want, want_stats = reference.fused_policy_loss(logits, labels, old_logp, advantages, mask, **kw)
    want.backward()
    z = logits.detach().requires_grad_()
    torch.manual_seed(0)
    got, got_stats = rlhf_fast.fused_policy_loss(z, labels, old_logp, advantages, mask, backend=backend, **kw)
    got.backward()
    # The backends' kernels compute in float32: the loss's rounding is that of its terms, which cancel.
    scale = policy_term_scale(logp, old_logp, advantages, mask, options.agg, ref_logp=ref_logp, kl_coef=options.kl_coef)
    assert abs(got.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2)
    assert rel_err(z.grad, logits.grad) < TOL

    params = (hidden, weight, bias)
    torch.manual_seed(0)
    loss, stats = rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias,
                                                     backend=backend, chunk_size=5, **kw)  # fmt: skip
    grads = torch.autograd.grad(loss, params)
    logits = hidden @ weight.T + bias
    torch.manual_seed(0)
    want, _ = reference.fused_policy_loss(logits, labels, old_logp, advantages, mask, **kw)
    want_grads = torch.autograd.grad(want, params)
    assert abs(loss.item() - want.item()) <= TOL * max(abs(want.item()), scale, 1e-2)
    for name, g, w in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert rel_err(g, w) < TOL, f"{name}: {rel_err(g, w):.3g}"
    for key, value in want_stats.items():
        assert abs(stats[key].item() - value.item()) <= TOL * max(abs(value.item()), 1e-2), key
        assert abs(got_stats[key].item() - value.item()) <= TOL * max(abs(value.item()), 1e-2), key


def test_registry_contract():
    separable = {name for name, entry in OBJECTIVES.items() if entry.separable}
    assert separable == {"ppo", "cispo", "sapo", "gpg"}
    with pytest.raises(ValueError, match=r"objective must be one of \('ppo', 'gspo', 'gspo_token', 'cispo'"):
        rlhf_fast.PolicyLossOptions(objective="grpo-ish")
    with pytest.raises(ValueError, match="dual_clip applies to objective='ppo' only"):
        rlhf_fast.PolicyLossOptions(objective="gspo", dual_clip=3.0)
    with pytest.raises(ValueError, match="objective 'ppo' is registered already"):
        register_objective("ppo", separable=True)(lambda *args: None)

