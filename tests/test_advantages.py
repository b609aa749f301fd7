"""gae, whiten, group_advantages and ppo_advantages on every backend vs the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.backends.registry import BackendUnavailable, can_serve, provider, resolve

from numerics import MASK_PATTERNS, backend_params, poison, random_mask, rel_err, require

TOL = 2e-5  # float32 result vs the float64 reference on the same input values


def gae_case(rows, tokens, pattern, device="cpu"):
    mask = random_mask(rows, tokens, pattern, device)
    rewards = poison(torch.randn(rows, tokens, device=device), mask)
    values = poison(torch.randn(rows, tokens, device=device), mask)
    return rewards, values, mask


def reference_gae_grads(rewards, values, mask, g_adv, g_ret, gamma, lam):
    r = torch.where(mask, rewards, 0).double().requires_grad_(True)
    v = torch.where(mask, values, 0).double().requires_grad_(True)
    adv, ret = reference.gae(r, v, mask, gamma=gamma, lam=lam)
    ((adv * g_adv.double()).sum() + (ret * g_ret.double()).sum()).backward()
    return adv.detach(), ret.detach(), r.grad, v.grad


def check_gae(rewards, values, mask, gamma, lam, backend, tol=TOL):
    g_adv, g_ret = torch.randn_like(rewards), torch.randn_like(rewards)
    want = reference_gae_grads(rewards, values, mask, g_adv, g_ret, gamma, lam)
    r, v = rewards.clone().requires_grad_(True), values.clone().requires_grad_(True)
    adv, ret = rlhf_fast.gae(r, v, mask, gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32
    ((adv * g_adv).sum() + (ret * g_ret).sum()).backward()
    for name, got, ref in zip(("advantages", "returns", "grad rewards", "grad values"), (adv, ret, r.grad, v.grad), want):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref) < tol, f"{name}: rel err {rel_err(got, ref):.3g}"
        assert (got[~mask] == 0).all(), name


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("pattern", MASK_PATTERNS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.0, 0.7), (0.8, 0.0), (0.0, 0.0)])
def test_gae_matches_reference(backend, device, pattern, gamma, lam):
    require(backend, device, torch.float32, "gae")
    check_gae(*gae_case(7, 37, pattern, device), gamma, lam, backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_gae_single_token_and_empty(backend, device):
    require(backend, device, torch.float32, "gae")
    check_gae(*gae_case(5, 1, "mixed", device), 0.9, 0.95, backend)
    for shape in [(0, 4), (3, 0)]:
        adv, ret = rlhf_fast.gae(torch.randn(shape), torch.randn(shape), torch.ones(shape, dtype=torch.bool), backend=backend)
        assert adv.shape == ret.shape == shape


@pytest.mark.slow
def test_gae_long_rows_torch():
    """T = 32768, gamma = lam = 1 (nothing decays: the longest sums), then a decaying left-padded row."""
    check_gae(*gae_case(1, 32768, "holes"), 1.0, 1.0, "torch")
    rewards, values, mask = gae_case(1, 32768, "left")
    got = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="torch")
    want = reference.gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    assert rel_err(got[0], want[0]) < TOL and rel_err(got[1], want[1]) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", backend_params())
def test_gae_long_row_kernels(backend, device):
    """One long row on the kernel backends (interpreted Triton is slow: forward at 32768, backward at 3000)."""
    if backend == "torch":
        pytest.skip("covered by test_gae_long_rows_torch")
    require(backend, device, torch.float32, "gae")
    rewards, values, mask = gae_case(1, 32768, "holes", device)
    adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=1.0, lam=1.0, backend=backend)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, gamma=1.0, lam=1.0)
    assert rel_err(adv, want_adv) < TOL and rel_err(ret, want_ret) < TOL
    check_gae(*gae_case(1, 3000, "holes", device), 0.99, 0.9, backend)


def test_gae_masked_values_change_nothing():
    rewards, values, mask = gae_case(6, 50, "holes")
    adv, ret = rlhf_fast.gae(rewards, values, mask, backend="torch")
    other = torch.where(mask, values, torch.randn_like(values) * 1e6)
    adv2, ret2 = rlhf_fast.gae(rewards, other, mask, backend="torch")
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def gae_rounding_bound(rewards, values, gamma, lam):
    """Per-token bound on the float32 rounding of GAE over a dense [B, T] row.

    Each delta_t = r_t + gamma v_{t+1} - v_t is rounded a few times relative to
    |r_t| + gamma |v_{t+1}| + |v_t|, and every step of adv_t = delta_t + gamma lam adv_{t+1} rounds
    again relative to |adv_t|; whatever order a backend sums in, the error at t is at most a few
    eps per token of the decayed sum S_t = sum_k (gamma lam)^k (|r| + gamma |v'| + |v|)_{t+k},
    which is reference.gae of those magnitudes with zero values.
    """
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    size = (rewards.abs() + gamma * next_values.abs() + values.abs()).double()
    decayed, _ = reference.gae(size, torch.zeros_like(size), torch.ones_like(size, dtype=torch.bool), gamma=gamma, lam=lam)
    return 4 * (rewards.shape[-1] + 2) * torch.finfo(torch.float32).eps * decayed


def test_gae_skips_masked_tokens():
    """A hole in the middle of a row changes nothing for the tokens around it (the chain is unbroken):
    the holed row on the torch backend and the dense row on the default one agree within the float32
    rounding of the computation (they sum in different orders)."""
    rewards, values = torch.randn(1, 6), torch.randn(1, 6)
    holed = torch.tensor([[True, True, False, False, True, True]])
    adv, _ = rlhf_fast.gae(rewards, values, holed, gamma=0.9, lam=0.8, backend="torch")
    keep = holed[0]
    dense_r, dense_v = rewards[:, keep], values[:, keep]
    dense, _ = rlhf_fast.gae(dense_r, dense_v, torch.ones(1, 4, dtype=torch.bool), gamma=0.9, lam=0.8)
    exact, _ = reference.gae(dense_r.double(), dense_v.double(), torch.ones(1, 4, dtype=torch.bool), gamma=0.9, lam=0.8)
    bound = gae_rounding_bound(dense_r, dense_v, 0.9, 0.8)
    for name, got in (("holed (torch)", adv[:, keep]), ("dense (auto)", dense)):
        err = (got.double() - exact).abs()
        assert (err <= bound).all(), f"{name}: error {err.max():.3g} above the float32 bound {bound.min():.3g}"


def test_reference_scan_equals_loop():
    rewards, values, mask = gae_case(4, 100, "mixed")
    rewards, values = rewards.double(), values.double()
    for got, want in zip(reference.gae_scan(rewards, values, mask, gamma=0.97, lam=0.9), reference.gae(rewards, values, mask, gamma=0.97, lam=0.9)):
        assert rel_err(got, want) < 1e-12


# ---------------------------------------------------------------------------------------------
# whiten
# ---------------------------------------------------------------------------------------------


def check_whiten(x, mask, shift_mean, backend, unbiased=True):
    g = torch.randn_like(x)
    ref_x = torch.where(mask, x, 0).double().requires_grad_(True)
    want = reference.whiten(ref_x, mask, shift_mean=shift_mean, unbiased=unbiased)
    (want * g.double()).sum().backward()
    got_x = x.clone().requires_grad_(True)
    got = rlhf_fast.whiten(got_x, mask, shift_mean=shift_mean, unbiased=unbiased, backend=backend)
    (got * g).sum().backward()
    assert got.dtype == torch.float32
    assert rel_err(got, want) < TOL, f"whiten: {rel_err(got, want):.3g}"
    assert rel_err(got_x.grad, ref_x.grad) < 1e-4, f"grad: {rel_err(got_x.grad, ref_x.grad):.3g}"
    assert torch.isfinite(got_x.grad).all() and (got[~mask] == 0).all() and (got_x.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("pattern", MASK_PATTERNS)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_matches_reference(backend, device, pattern, shift_mean, unbiased):
    require(backend, device, torch.float32, "whiten")
    mask = random_mask(6, 45, pattern, device)
    x = poison(torch.randn(6, 45, device=device) * 3 + 20, mask)  # a large mean: no E[x^2] - mean^2
    check_whiten(x, mask, shift_mean, backend, unbiased)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_degenerate_counts(backend, device, unbiased):
    require(backend, device, torch.float32, "whiten")
    x = torch.randn(3, 5, device=device)
    none = torch.zeros(3, 5, dtype=torch.bool, device=device)
    assert (rlhf_fast.whiten(poison(x, none), none, unbiased=unbiased, backend=backend) == 0).all()
    for shift_mean in (True, False):  # n = 0: values and gradients all 0
        check_whiten(poison(x, none), none, shift_mean, backend, unbiased)
    one = none.clone()
    one[1, 2] = True
    out = rlhf_fast.whiten(poison(x, one), one, shift_mean=False, unbiased=unbiased, backend=backend)
    assert out[1, 2] == x[1, 2] and (out[~one] == 0).all()  # n = 1: centred value 0, mean added back
    for shift_mean in (True, False):  # n = 1: gradient 0, or g with the mean added back
        check_whiten(poison(x, one), one, shift_mean, backend, unbiased)
    many = torch.ones(40, 1500, dtype=torch.bool, device=device)  # 2 chunks per row, merged moments
    check_whiten(torch.randn(40, 1500, device=device), many, True, backend, unbiased)


def test_whiten_equals_openrlhf_and_verl():
    """unbiased=False is OpenRLHF's advantage normalisation (experience_maker, biased variance,
    var.clamp(min=1e-8).rsqrt()); the default is verl's masked_whiten (masked_var with the Bessel
    correction, rsqrt(var + 1e-8)); both written as the peers write them, on the valid tokens."""
    mask = random_mask(8, 33, "right")
    mask[:, 0] = True
    adv = torch.randn(8, 33, dtype=torch.float64) * 2 + 0.5
    num_actions = mask.sum()
    mean = (adv * mask).sum() / num_actions
    var = ((adv - mean).pow(2) * mask).sum() / num_actions
    openrlhf = (adv - mean) * var.clamp(min=1e-8).rsqrt()
    got = rlhf_fast.whiten(adv.float(), mask, unbiased=False)
    assert rel_err(got[mask], openrlhf[mask]) < TOL

    verl_var = var * (num_actions / (num_actions - 1))  # masked_var(unbiased=True)
    verl = (adv - mean) * torch.rsqrt(verl_var + 1e-8)
    assert rel_err(rlhf_fast.whiten(adv.float(), mask)[mask], verl[mask]) < TOL
    assert not torch.allclose(got[mask].double(), verl[mask], rtol=1e-4)  # the two differ by sqrt(n / (n - 1))


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------

MODES_AND_SIZES = [(mode, g) for mode in ("grpo", "drgrpo", "rloo") for g in (1, 2, 8) if not (g == 1 and mode != "drgrpo")]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("mode,group_size", MODES_AND_SIZES + [("grpo", 5), ("rloo", 64)])
def test_group_advantages_matches_reference(backend, device, mode, group_size):
    require(backend, device, torch.float32, "group_advantages")
    scores = torch.randn(group_size * 6, device=device) * 2 + 3
    g = torch.randn_like(scores)
    ref_s = scores.double().requires_grad_(True)
    want = reference.group_advantages(ref_s, group_size, mode=mode)
    (want * g.double()).sum().backward()
    s = scores.clone().requires_grad_(True)
    got = rlhf_fast.group_advantages(s, group_size, mode=mode, backend=backend)
    (got * g).sum().backward()
    assert got.dtype == torch.float32
    assert rel_err(got, want) < TOL
    # The grpo gradient cancels (for G = 2 it is ~eps of its terms, g / std): bound its error by
    # PyTorch's own float32 error plus a few float32 roundings of those terms, in absolute norms.
    s32 = scores.clone().requires_grad_(True)
    (reference.group_advantages(s32, group_size, mode=mode) * g).sum().backward()
    terms = g.double().view(-1, group_size)
    if mode == "grpo":
        terms = terms / scores.double().view(-1, group_size).std(dim=1, keepdim=True)
    err, torch_err = ((t.grad.double() - ref_s.grad).norm().item() for t in (s, s32))
    budget = 2 * torch_err + 16 * torch.finfo(torch.float32).eps * terms.norm().item()
    assert err <= budget, f"grad: abs err {err:.3g} > {budget:.3g} (PyTorch float32: {torch_err:.3g})"


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("value", [0.1, 1e-3, 12345.678, -3.3])
def test_group_advantages_identical_scores_exactly_zero(backend, device, value):
    require(backend, device, torch.float32, "group_advantages")
    scores = torch.full((8 * 3,), value, device=device)
    for mode, group_size in MODES_AND_SIZES:
        assert (rlhf_fast.group_advantages(scores, group_size, mode=mode, backend=backend) == 0).all(), mode


def test_rloo_is_leave_one_out():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    got = rlhf_fast.group_advantages(scores, 3, mode="rloo")
    assert torch.allclose(got, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, -1.5, -1.5, 3.0]))


# ---------------------------------------------------------------------------------------------
# ppo_advantages: rewards + GAE + whitening
# ---------------------------------------------------------------------------------------------


# (kl_clamp, unbiased): the defaults, and OpenRLHF's (every KL clamped, biased whitening) with a
# clamp that bites: |logp - ref_logp| reaches 5 below.
PPO_OPTIONS = [pytest.param(None, True, id="default"), pytest.param(1.0, False, id="clamp-biased")]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("kl_clamp,unbiased", PPO_OPTIONS)
def test_ppo_advantages_matches_reference(backend, device, estimator, whiten, kl_clamp, unbiased):
    require(backend, device, torch.float32, "ppo_advantages")
    mask = random_mask(7, 40, "mixed", device)
    logp = poison(-torch.rand(7, 40, device=device) * 5, mask)
    ref_logp = poison(-torch.rand(7, 40, device=device) * 5, mask)
    values = poison(torch.randn(7, 40, device=device), mask)
    scores = torch.randn(7, device=device)
    options = dict(beta=0.05, estimator=estimator, gamma=0.99, lam=0.9, whiten=whiten, kl_clamp=kl_clamp,
                   unbiased=unbiased, backend=backend)  # fmt: skip
    got = rlhf_fast.ppo_advantages(logp, ref_logp, scores, values, mask, **options)
    d = lambda t: torch.where(mask, t, 0).double().requires_grad_(True)  # noqa: E731
    ref_inputs = d(logp), d(ref_logp), scores.double().requires_grad_(True), d(values)
    rewards = reference.kl_penalized_rewards(*ref_inputs[:3], mask, beta=0.05, estimator=estimator, kl_clamp=kl_clamp)
    adv, ret = reference.gae(rewards, ref_inputs[3], mask, gamma=0.99, lam=0.9)
    if whiten:
        adv = reference.whiten(adv, mask, unbiased=unbiased)
    for name, a, b in zip(("advantages", "returns", "rewards"), got, (adv, ret, rewards)):
        assert rel_err(a, b) < TOL, f"{name}: {rel_err(a, b):.3g}"
        assert torch.isfinite(a).all() and (a[~mask] == 0).all(), name

    # With a gradient to carry, the same result comes from the differentiable composition, and
    # its gradients (through the clamp and the whitening) are the reference's.
    inputs = [t.clone().requires_grad_(True) for t in (logp, ref_logp, scores, values)]
    composed = rlhf_fast.ppo_advantages(*inputs[:3], inputs[3], mask, **options)
    for a, b in zip(composed, got):
        assert rel_err(a, b) < TOL
    g = torch.randn(2, 7, 40, device=device)
    (composed.advantages * g[0] + composed.returns * g[1]).sum().backward()
    (adv * g[0].double() + ret * g[1].double()).sum().backward()
    for name, a, b in zip(("logp", "ref_logp", "scores", "values"), inputs, ref_inputs):
        assert torch.isfinite(a.grad).all(), name
        assert rel_err(a.grad, b.grad) < 1e-4, f"grad {name}: {rel_err(a.grad, b.grad):.3g}"
        assert a is inputs[2] or (a.grad[~mask] == 0).all(), name


# ---------------------------------------------------------------------------------------------
# registry and validation (the kernel-facing contract of every provider: tests/test_providers.py)
# ---------------------------------------------------------------------------------------------


def test_auto_falls_back_to_torch_and_explicit_says_why(monkeypatch):
    """A provider without [B, T] kernels is skipped by "auto" and refused, with the reason, when named."""
    cpu = torch.device("cpu")
    host = provider("host") if can_serve("host", cpu, torch.float32) else None
    if host is not None and "gae" not in host.ops:
        assert resolve("auto", cpu, torch.float32, op="gae").name == "torch"
        with pytest.raises(BackendUnavailable, match="no gae kernel"):
            rlhf_fast.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), backend="host")
    support = can_serve("cuda", cpu, torch.float32, "gae")
    assert not support and support.reason
    assert resolve("auto", cpu, torch.float32, op="gae").supports_op("gae")
    assert resolve("auto", cpu, torch.float32).supports_op("token_logprobs")


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda r, v, m: rlhf_fast.gae(r, v[:, :-1], m), ValueError, r"values must have shape \(4, 6\)"),
        (lambda r, v, m: rlhf_fast.gae(r, v, m[:-1]), ValueError, "mask must have shape"),
        (lambda r, v, m: rlhf_fast.gae(r[0], v[0], m[0]), ValueError, r"rewards must have shape \[B, T\]"),
        (lambda r, v, m: rlhf_fast.gae(r, v, m, gamma=1.5), ValueError, "gamma must be a finite number >= 0.0 and <= 1.0"),
        (lambda r, v, m: rlhf_fast.gae(r, v, m, lam=-0.1), ValueError, "lam must be"),
        (lambda r, v, m: rlhf_fast.gae(r.long(), v, m), TypeError, "rewards must have dtype"),
        (lambda r, v, m: rlhf_fast.whiten(r, m.t()), ValueError, "mask must have shape"),
        (lambda r, v, m: rlhf_fast.group_advantages(r[0], 4), ValueError, r"batch \(6 rows\) must be divisible by group_size=4"),
        (lambda r, v, m: rlhf_fast.group_advantages(r[0], 1), ValueError, "group_size must be >= 2 with mode='grpo'"),
        (lambda r, v, m: rlhf_fast.group_advantages(r[0], 1, mode="rloo"), ValueError, "group_size must be >= 2 with mode='rloo'"),
        (lambda r, v, m: rlhf_fast.group_advantages(r[0], 0, mode="drgrpo"), ValueError, "group_size must be >= 1"),
        (lambda r, v, m: rlhf_fast.group_advantages(r[0], 2, mode="ppo"), ValueError, "mode must be one of"),
        (lambda r, v, m: rlhf_fast.group_advantages(r, 2), ValueError, r"scores must have shape \[B\]"),
        (lambda r, v, m: rlhf_fast.ppo_advantages(r, v, r[:, 0], v, m, beta=-1.0), ValueError, "beta must be a finite number >= 0"),
        (lambda r, v, m: rlhf_fast.ppo_advantages(r, v, r[:2, 0], v, m, beta=0.1), ValueError, r"scores must have shape \(4,\)"),
        (lambda r, v, m: rlhf_fast.ppo_advantages(r, v, r[:, 0], v, m, beta=0.1, estimator="k4"), ValueError, "estimator must be one of"),
        (lambda r, v, m: rlhf_fast.ppo_advantages(r, v, r[:, 0], v, m, beta=0.1, kl_clamp=0.0), ValueError, "kl_clamp must be a finite number > 0, got 0.0"),
        (lambda r, v, m: rlhf_fast.ppo_advantages(r, v, r[:, 0], v, m, beta=0.1, kl_clamp=math.inf), ValueError, "kl_clamp must be a finite number > 0, got inf"),
        (lambda r, v, m: rlhf_fast.gae(r, v, m, backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool))


def test_float_mask_and_low_precision_inputs():
    rewards, values, mask = gae_case(3, 20, "holes")
    rewards, values = rewards.nan_to_num(0, 0, 0), values.nan_to_num(0, 0, 0)
    want = rlhf_fast.gae(rewards, values, mask)
    got = rlhf_fast.gae(rewards.bfloat16(), values.double(), mask.float())
    assert got[0].dtype == torch.float32
    assert rel_err(got[0], want[0]) < 2e-2
