"""rlhf_fast._C's [B, T] kernels (kl_rewards, gae, whiten, ppo_advantages, group_advantages) through
the host and cuda providers, against the torch provider (the reference formulas in float32).

tests/test_advantages.py and tests/test_kl.py run the public ops on every backend against the
float64 reference; this file covers what they do not: outputs poisoned with NaN before the kernel
(every element must be written), rows longer than one CUDA chunk (2048 tokens), many rows, thread
counts, the fused PPO pass against its three steps, and that the build compiles every source.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.backends.registry import provider

from numerics import load_build_script, poison, provider_on, random_mask, rel_err

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 kernels vs the float32 torch provider: a few roundings apart
ON = [pytest.param("host", id="host"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# Token counts around the CUDA kernels' chunk (256 threads x 8 tokens) and search steps.
TOKENS = [1, 37, 2047, 2048, 2049, 5000]


def bt_case(rows, tokens, pattern="mixed"):
    """CPU inputs of every [B, T] op, NaN/inf at masked positions."""
    mask = random_mask(rows, tokens, pattern)
    logp = poison(-torch.rand(rows, tokens) * 4, mask)
    ref_logp = poison(-torch.rand(rows, tokens) * 4, mask)
    values = poison(torch.randn(rows, tokens), mask)
    rewards = poison(torch.randn(rows, tokens), mask)
    grads = [poison(torch.randn(rows, tokens), mask) for _ in range(2)]
    return mask, logp, ref_logp, torch.randn(rows) * 3, values, rewards, grads


def calls(case, estimator="k3", gamma=0.99, lam=0.9, whiten=True):
    """(method, inputs, number of outputs, options) of every [B, T] provider method; the options
    end with kl_clamp and (whitening) unbiased where a call sets them, the clamp biting at 0.5."""
    mask, logp, ref_logp, scores, values, rewards, (grad_a, grad_r) = case
    return [
        ("kl_rewards_forward", (logp, ref_logp, scores, mask), 1, (0.1, estimator)),
        ("kl_rewards_forward", (logp, ref_logp, scores, mask), 1, (0.1, estimator, 0.5)),
        ("gae_forward", (rewards, values, mask), 2, (gamma, lam)),
        ("gae_backward", (grad_a, grad_r, mask), 2, (gamma, lam)),
        ("whiten_forward", (values, mask), 1, (True,)),
        ("whiten_forward", (values, mask), 1, (False,)),
        ("whiten_forward", (values, mask), 1, (True, False)),
        ("ppo_advantages_forward", (logp, ref_logp, scores, values, mask), 3, (0.1, estimator, gamma, lam, whiten)),
        ("ppo_advantages_forward", (logp, ref_logp, scores, values, mask), 3,
         (0.1, estimator, gamma, lam, whiten, 0.5, False)),
    ]


def run_method(prov, device, method, inputs, n_out, options):
    """Outputs (on the CPU) of one provider method on ``device``, outputs poisoned with NaN first."""
    inputs = [x.to(device) for x in inputs]
    shape = inputs[-1].shape
    outs = [torch.full(shape, math.nan, device=device) for _ in range(n_out)]
    getattr(prov, method)(*inputs, *outs, *options)
    return [o.cpu() for o in outs]


def check_against_torch(name, case, tol=TOL, **kw):
    prov, device = provider_on(name, torch.float32)
    torch_prov = provider("torch")
    mask = case[0]
    for method, inputs, n_out, options in calls(case, **kw):
        got = run_method(prov, device, method, inputs, n_out, options)
        want = run_method(torch_prov, "cpu", method, inputs, n_out, options)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.isfinite(a).all(), f"{method} output {i}: not finite"
            assert (a[~mask] == 0).all(), f"{method} output {i}: nonzero at a masked position"
            assert rel_err(a, b) < tol, f"{method} output {i}: rel err {rel_err(a, b):.3g}"


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_bt_kernels_match_torch(name, tokens, estimator):
    check_against_torch(name, bt_case(6, tokens), estimator=estimator)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("pattern", ["right", "left", "holes", "empty"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.5), (0.9, 0.0)])
def test_bt_kernels_masks_and_discounts(name, pattern, gamma, lam):
    check_against_torch(name, bt_case(4, 3000, pattern), gamma=gamma, lam=lam)


@pytest.mark.parametrize("name", ON)
@pytest.mark.parametrize("mode,group_size", [("grpo", 2), ("grpo", 7), ("drgrpo", 1), ("rloo", 64), ("grpo", 1000)])
def test_group_advantages_match_torch(name, mode, group_size):
    prov, device = provider_on(name, torch.float32)
    scores = torch.randn(group_size * 5) * 2 + 100
    scores[:group_size] = 3.25  # a group of identical scores: exactly 0
    got = torch.full_like(scores, math.nan, device=device)
    prov.group_advantages_forward(scores.to(device), got, group_size, mode, 1e-6)
    want = torch.empty_like(scores)
    provider("torch").group_advantages_forward(scores, want, group_size, mode, 1e-6)
    got = got.cpu()
    assert (got[:group_size] == 0).all()
    assert rel_err(got, want) < TOL, f"rel err {rel_err(got, want):.3g}"


@pytest.mark.parametrize("kl_clamp,unbiased", [(None, True), (0.5, False)])
def test_host_fused_ppo_equals_its_steps(kl_clamp, unbiased):
    """The host's fused pass runs the same per-token functions as its three steps: bitwise equal."""
    prov, _ = provider_on("host", torch.float32)
    mask, logp, ref_logp, scores, values, _, _ = bt_case(9, 777)
    fused = [torch.full(mask.shape, math.nan) for _ in range(3)]
    prov.ppo_advantages_forward(logp, ref_logp, scores, values, mask, *fused, 0.2, "k3", 0.97, 0.9, True, kl_clamp,
                                unbiased)  # fmt: skip
    rewards, advantages, returns = (torch.full(mask.shape, math.nan) for _ in range(3))
    prov.kl_rewards_forward(logp, ref_logp, scores, mask, rewards, 0.2, "k3", kl_clamp)
    prov.gae_forward(rewards, values, mask, advantages, returns, 0.97, 0.9)
    prov.whiten_forward(advantages, mask, advantages, True, unbiased)  # in place
    for a, b in zip(fused, (rewards, advantages, returns)):
        assert torch.equal(a, b)


def test_host_thread_count_does_not_change_results():
    provider_on("host", torch.float32)
    from rlhf_fast.backends.extension import extension, kl_estimator_code

    mask, logp, ref_logp, scores, values, _, _ = bt_case(40, 3001)
    results = []
    for threads in (1, 2, 3):
        outs = [torch.full(mask.shape, math.nan) for _ in range(3)]
        p = extension().PpoAdvantagesParams(
            logp=logp.data_ptr(), ref_logp=ref_logp.data_ptr(), scores=scores.data_ptr(), values=values.data_ptr(),
            mask=mask.data_ptr(), rewards=outs[0].data_ptr(), advantages=outs[1].data_ptr(),
            returns=outs[2].data_ptr(), moments=0, rows=40, tokens=3001, beta=0.1, estimator=kl_estimator_code("k2"),
            kl_clamp=0.5, gamma=1.0, lam=0.95, whiten=True, whiten_unbiased=False, whiten_eps=reference.WHITEN_EPS,
        )  # fmt: skip
        extension().host.ppo_advantages_forward(p, num_threads=threads)
        results.append(torch.stack(outs))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_host_rejects_unknown_codes_and_layouts():
    prov, _ = provider_on("host", torch.float32)
    from rlhf_fast.backends.extension import extension

    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    kl = extension().KlRewardsParams(
        logp=x.data_ptr(), ref_logp=x.data_ptr(), scores=x.data_ptr(), mask=mask.data_ptr(), rewards=x.data_ptr(),
        rows=2, tokens=3, beta=0.1, estimator=7, kl_clamp=math.inf,
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown KL estimator code 7"):
        extension().host.kl_rewards_forward(kl, num_threads=1)
    group = extension().GroupAdvantagesParams(scores=x.data_ptr(), out=x.data_ptr(), groups=2, group_size=3, mode=5,
                                             eps=1e-6)
    with pytest.raises(ValueError, match="unknown mode code 5"):
        extension().host.group_advantages_forward(group, num_threads=1)
    with pytest.raises(ValueError, match="values must be contiguous"):
        prov.gae_forward(x, torch.zeros(3, 2).t(), mask, x.clone(), x.clone(), 1.0, 0.9)
    with pytest.raises(ValueError, match="mask must be a contiguous"):
        prov.whiten_forward(x, mask.float(), x.clone(), True)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,tokens", [(64, 4096), (1, 32768), (3000, 7)])
def test_cuda_matches_host_at_scale(rows, tokens):
    """Long rows (16 chunks), many rows, every op; host and cuda agree to float32 rounding."""
    case = bt_case(rows, tokens)
    host, _ = provider_on("host", torch.float32)
    cuda, device = provider_on("cuda", torch.float32)
    for method, inputs, n_out, options in calls(case, gamma=1.0, lam=1.0):
        got = run_method(cuda, device, method, inputs, n_out, options)
        want = run_method(host, "cpu", method, inputs, n_out, options)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.isfinite(a).all() and rel_err(a, b) < TOL, f"{method} output {i}: {rel_err(a, b):.3g}"


def test_every_source_is_built():
    """setup.py lists its sources by hand: a csrc file missing there would be silently unused."""
    build = load_build_script()
    host = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "host").glob("*.cpp"))
    cuda = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sorted(build.HOST_SOURCES) == sorted(["csrc/bindings.cpp", *host])
    assert sorted(build.CUDA_SOURCES) == cuda
