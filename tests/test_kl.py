"""kl_penalty and kl_penalized_rewards vs the float64 reference, on every backend."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference

from numerics import MASK_PATTERNS, backend_params, poison, random_mask, rel_err, require

ESTIMATORS = ("k1", "k2", "k3", "abs")
TOL = 2e-5


def logprob_pairs(shape, device="cpu"):
    """Log-probs from -100 to 0: uniform, near-equal pairs (tiny differences) and exact ties."""
    logp = -100 * torch.rand(shape, device=device) ** 3
    ref_logp = -100 * torch.rand(shape, device=device) ** 3
    near = torch.rand(shape, device=device) < 0.3
    ref_logp = torch.where(near, logp + 1e-3 * torch.randn(shape, device=device), ref_logp).clamp(max=0)
    tie = torch.rand(shape, device=device) < 0.1
    return logp, torch.where(tie, logp, ref_logp)


def compare(got, want, tol=TOL):
    """float32 result vs the float64 reference: inf exactly where the float32 rounding of the
    reference overflows (k3 = e^{100} at ref - logp = 100), relative error on the rest."""
    want32 = want.float()
    overflow = torch.isinf(want32)
    assert torch.equal(torch.isinf(got), overflow)
    assert rel_err(got[~overflow], want[~overflow]) < tol, f"rel err {rel_err(got[~overflow], want[~overflow]):.3g}"


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty_matches_reference(estimator, dtype):
    logp, ref_logp = (x.to(dtype) for x in logprob_pairs((64, 50)))
    x = logp.clone().requires_grad_(True)
    got = rlhf_fast.kl_penalty(x, ref_logp, estimator=estimator)
    assert got.dtype == torch.float32
    y = logp.double().requires_grad_(True)
    want = reference.kl_penalty(y, ref_logp.double(), estimator=estimator)
    compare(got, want)
    finite = (ref_logp.double() - logp.double()).abs() < 80  # gradients e^{80} ~ 1e35 still fit float32
    g = torch.randn(want.shape)
    (got[finite] * g[finite]).sum().backward()
    (want[finite] * g[finite].double()).sum().backward()
    compare(x.grad.float()[finite], y.grad[finite], tol=1e-2 if dtype == torch.bfloat16 else TOL)


def test_k3_properties():
    """k3 >= 0 everywhere, exactly 0 at logp == ref_logp, and accurate for tiny differences."""
    logp, ref_logp = logprob_pairs((200, 40))
    k3 = rlhf_fast.kl_penalty(logp, ref_logp, estimator="k3")
    assert (k3 >= 0).all()
    assert (k3[logp == ref_logp] == 0).all()
    d = torch.tensor([1e-7, -1e-6, 1e-4, -3e-3, 0.49, -0.51, 2.0])
    got = rlhf_fast.kl_penalty(torch.zeros(7), d, estimator="k3")
    want = reference.kl_penalty(torch.zeros(7, dtype=torch.float64), d.double(), estimator="k3")
    assert ((got - want).abs() / want).max() < 1e-6  # relative error per entry, not only norm-wise


def rewards_case(rows, tokens, pattern, device):
    mask = random_mask(rows, tokens, pattern, device)
    logp, ref_logp = logprob_pairs((rows, tokens), device)
    logp, ref_logp = logp / 10, ref_logp / 10  # keep e^{ref - logp} finite in float32
    return poison(logp, mask), poison(ref_logp, mask), torch.randn(rows, device=device) * 3, mask


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("pattern", MASK_PATTERNS)
@pytest.mark.parametrize("kl_clamp", [None, 0.5])
def test_kl_penalized_rewards_matches_reference(backend, device, estimator, pattern, kl_clamp):
    require(backend, device, torch.float32, "kl_rewards")
    logp, ref_logp, scores, mask = rewards_case(7, 23, pattern, device)
    inputs = [t.clone().requires_grad_(True) for t in (logp, ref_logp, scores)]
    got = rlhf_fast.kl_penalized_rewards(*inputs, mask, beta=0.3, estimator=estimator, kl_clamp=kl_clamp,
                                         backend=backend)  # fmt: skip
    ref_inputs = [torch.where(mask, t, 0).double().requires_grad_(True) for t in (logp, ref_logp)]
    ref_inputs.append(scores.double().requires_grad_(True))
    want = reference.kl_penalized_rewards(*ref_inputs, mask, beta=0.3, estimator=estimator, kl_clamp=kl_clamp)
    assert got.dtype == torch.float32 and rel_err(got, want) < TOL
    assert (got[~mask] == 0).all()
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (want * g.double()).sum().backward()
    for name, a, b in zip(("logp", "ref_logp", "scores"), inputs, ref_inputs):
        assert torch.isfinite(a.grad).all(), name
        assert rel_err(a.grad, b.grad) < TOL, f"grad {name}: {rel_err(a.grad, b.grad):.3g}"
    if kl_clamp is not None:  # both kinds of token occur; a clamped one passes no gradient
        kl = reference.kl_penalty(*(t.detach() for t in ref_inputs[:2]), estimator=estimator)
        clamped = mask & (kl.abs() > kl_clamp)
        assert clamped.any() and (mask & ~clamped & (kl != 0)).any()
        assert (inputs[0].grad[clamped] == 0).all() and (inputs[1].grad[clamped] == 0).all()


def test_kl_clamped_rewards_equal_verl_and_openrlhf():
    """verl's apply_kl_penalty with kl_penalty="low_var_kl" (k3 clamped to [-10, 10]) and
    OpenRLHF's compute_approx_kl + compute_reward (every estimator clamped to [-10, 10]), written
    as the peers write them (in float64), values and gradients."""
    rows, tokens, beta = 6, 17, 0.2
    mask = torch.arange(tokens) < torch.randint(1, tokens + 1, (rows, 1))  # right padding, >= 1 token
    logp = -4 * torch.rand(rows, tokens, dtype=torch.float64)
    ref_logp = logp + 8 * torch.randn(rows, tokens, dtype=torch.float64)  # |d| > 10 on ~1 token in 5
    scores = torch.randn(rows, dtype=torch.float64)

    def verl_kl_penalty(logprob, ref_logprob):  # verl core_algos.kl_penalty, "low_var_kl"
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)

    def verl_rewards(logprob):  # verl ray_trainer.apply_kl_penalty
        token_level_scores = torch.zeros_like(logprob)
        valid_response_length = mask.sum(-1)
        token_level_scores[torch.arange(rows), valid_response_length - 1] = scores
        kld = verl_kl_penalty(logprob, ref_logp) * mask
        return token_level_scores - beta * kld

    def openrlhf_approx_kl(log_probs, log_probs_base, kl_estimator):  # openrlhf/models/utils.py
        if kl_estimator == "k1":
            log_ratio = log_probs - log_probs_base
        if kl_estimator == "k2":
            log_ratio = log_probs - log_probs_base
            log_ratio = log_ratio**2 / 2.0
        if kl_estimator == "k3":
            log_ratio = log_probs - log_probs_base
            log_ratio = -log_ratio
            log_ratio = log_ratio.exp() - 1 - log_ratio
        log_ratio = log_ratio.clamp(min=-10, max=10)
        return log_ratio

    def openrlhf_rewards(log_probs, kl_estimator):  # compute_reward
        kl_reward = -beta * openrlhf_approx_kl(log_probs, ref_logp, kl_estimator) * mask
        eos_indices = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
        last_reward = torch.zeros_like(kl_reward).scatter_(dim=1, index=eos_indices, src=scores.unsqueeze(1))
        return last_reward + kl_reward

    peers = [("verl low_var_kl", "k3", verl_rewards)]
    peers += [(f"OpenRLHF {e}", e, lambda x, e=e: openrlhf_rewards(x, e)) for e in ("k1", "k2", "k3")]
    for name, estimator, peer in peers:
        x = logp.clone().requires_grad_(True)
        want = peer(x)
        want.sum().backward()
        y = logp.float().requires_grad_(True)
        got = rlhf_fast.kl_penalized_rewards(y, ref_logp.float(), scores.float(), mask, beta=beta, estimator=estimator,
                                             kl_clamp=10.0)  # fmt: skip
        got.sum().backward()
        assert rel_err(got, want) < TOL, f"{name}: rel err {rel_err(got, want):.3g}"
        assert rel_err(y.grad, x.grad) < TOL, f"{name} grad: rel err {rel_err(y.grad, x.grad):.3g}"
        assert (x.grad[mask] == 0).any() and (x.grad[mask] != 0).any(), name  # clamped and unclamped tokens


@pytest.mark.parametrize("backend,device", backend_params())
def test_kl_penalized_rewards_score_placement(backend, device):
    require(backend, device, torch.float32, "kl_rewards")
    mask = torch.tensor(
        [[0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]],
        dtype=torch.bool, device=device,
    )  # fmt: skip
    logp = torch.zeros(4, 7, device=device)
    scores = torch.tensor([1.0, float("nan"), 3.0, 4.0], device=device)  # row 1 is empty: its NaN is ignored
    rewards = rlhf_fast.kl_penalized_rewards(logp, logp, scores, mask, beta=0.1, backend=backend)
    want = torch.zeros(4, 7)
    want[0, 4], want[2, 6], want[3, 6] = 1.0, 3.0, 4.0
    assert torch.equal(rewards.cpu(), want)
    one = rlhf_fast.kl_penalized_rewards(logp[:, :1] - 1, logp[:, :1], scores, mask[:, -1:], beta=0.5, backend=backend)
    assert torch.equal(one.cpu(), torch.tensor([[0.0], [0.0], [3.5], [4.5]]))  # T = 1: -beta * k1 = +0.5


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s, m, beta=-0.1), "beta must be a finite number >= 0"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s, m, beta=float("nan")), "beta must be"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x[:, :3], s, m, beta=0.1), r"ref_logp must have shape \(3, 4\)"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s[:2], m, beta=0.1), r"scores must have shape \(3,\)"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s, m.t(), beta=0.1), r"mask must have shape \(3, 4\)"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s, m, beta=0.1, estimator="k5"), "estimator must be one of"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s, m, beta=0.1, kl_clamp=-1.0), "kl_clamp must be a finite number > 0, got -1.0"),
        (lambda x, m, s: rlhf_fast.kl_penalized_rewards(x, x, s, m, beta=0.1, kl_clamp=float("nan")), "kl_clamp must be a finite number > 0, got nan"),
        (lambda x, m, s: rlhf_fast.kl_penalty(x, x, estimator="kl"), "estimator must be one of"),
        (lambda x, m, s: rlhf_fast.kl_penalty(x, x[0]), r"ref_logp must have shape \(3, 4\)"),
    ],
)
def test_bad_inputs(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool), torch.randn(3))
