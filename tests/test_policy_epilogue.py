"""fused_policy_loss's one-kernel path (the "policy_epilogue" op: kernels/policy_epilogue.py,
csrc/host/policy_epilogue.cpp, csrc/cuda/policy_epilogue.cu): the loss, stats and logits' gradient
equal today's three-step path (forward kernel, [B, T] autograd, backward kernel) and the float64
reference, for every objective and option the kernel computes, on every backend that has the op;
other calls keep the old path.

Triton is interpreted on CPU here (tests/conftest.py): small shapes; the broad sweep is `slow`.
The cuda cases carry the `gpu` marker; float64 logits run on the host only."""

from __future__ import annotations

import importlib
import itertools
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.backends.base import LOSS_OPS
from rlhf_fast.backends.registry import BACKENDS, can_serve, provider
from rlhf_fast.objectives import OBJECTIVES

from numerics import (assert_close, assert_rows_within_one_ulp, backend_params, poison, policy_term_scale, random_mask,
                      rel_err, require, tolerance, truncates)  # fmt: skip

fpl = importlib.import_module("rlhf_fast.ops.fused_policy_loss")  # the module: the package re-exports the function

# The backends with a policy_epilogue kernel, on the device each runs on (Triton on CPU when interpreted).
KERNEL_BACKENDS = ("triton", "host", "cuda")
WHERE = [pytest.param(p.values, id=p.id, marks=p.marks) for p in backend_params() if p.values[0] in KERNEL_BACKENDS
         and (p.values[0] == "triton" or (p.values[0] == "host") == (p.values[1] == "cpu"))]  # fmt: skip


@pytest.fixture(params=WHERE)
def where(request):
    """(backend, device) of one kernel backend; each test skips it on a dtype it cannot serve."""
    return request.param

OBJECTIVE_CASES = [
    dict(objective="ppo", clip_eps=0.2),
    dict(objective="ppo", clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0),
    dict(objective="ppo", clip_eps=None),
    dict(objective="ppo", clip_eps=None, dual_clip=2.0),
    dict(objective="cispo", clip_eps=None, clip_eps_high=0.28),
    dict(objective="cispo", clip_eps=0.2),
    dict(objective="cispo", clip_eps=None),
    dict(objective="gpg"),
    dict(objective="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05),
]
KL_CASES = [
    {},
    dict(kl_coef=0.1, kl_estimator="k3"),
    dict(kl_coef=0.05, kl_estimator="k1"),
    dict(kl_coef=0.2, kl_estimator="k2", kl_clamp=0.02),
    dict(kl_coef=0.3, kl_estimator="abs"),
    dict(kl_coef=0.1, kl_estimator="k3", kl_clamp=0.01),
    dict(kl_coef=0.1, kl_estimator="k3+", kl_clamp=0.01),
    dict(kl_coef=0.1, kl_estimator="abs+"),
    dict(kl_coef=0.0, kl_estimator="k2"),  # ref_logp for the "kl" stat only
]
ROLLOUT_CASES = [
    {},
    dict(rollout_is="token", rollout_is_threshold=1.5),
    dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_threshold=3.0),
    dict(rollout_is="geometric", rollout_is_mode="masked_weight", rollout_is_threshold=1.3),
    dict(rollout_is="token", rollout_is_mode="truncate", rollout_is_threshold=1.5, rollout_is_threshold_low=0.8),
]
AGGS = reference.AGG_MODES


def case(rows=4, tokens=5, vocab=37, dtype=torch.float32, *, pad=3, neg_inf=True):
    """Logits [rows, tokens, vocab + pad] (the op sees [..., :vocab]: a row stride that is not V),
    some -inf entries away from the labels, a mask with an empty and a full row, labels with
    garbage at masked positions, and [B, T] inputs poisoned there."""
    mask = random_mask(rows, tokens, "mixed")
    full = torch.randn(rows, tokens, vocab + pad, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (rows, tokens))
    if neg_inf:
        holes = (torch.rand(rows, tokens, vocab) < 0.1) & (torch.arange(vocab) != labels.unsqueeze(-1))
        full[..., :vocab] = full[..., :vocab].masked_fill(holes, -torch.inf)
    full = full.to(dtype)
    logp = reference.token_logprobs(full[..., :vocab].double(), labels).float()
    old_logp = logp + 0.3 * torch.randn(rows, tokens)
    inputs = dict(
        old_logp=poison(old_logp, mask),
        advantages=poison(torch.randn(rows, tokens), mask),
        mask=mask,
        ref_logp=poison(old_logp + 0.2 * torch.randn(rows, tokens), mask),
        rollout_logp=poison(old_logp + 0.3 * torch.randn(rows, tokens), mask),
    )
    garbage = torch.tensor([-100, vocab + 7, -1])[torch.randint(0, 3, (rows, tokens))]
    return full, torch.where(mask, labels, garbage), inputs, vocab


@contextmanager
def counted_launches(backend):
    """Counts the backend's provider calls: epilogue, token_logprobs forward and backward."""
    counts = {"policy_epilogue_forward": 0, "token_logprobs_forward": 0, "token_logprobs_backward": 0}
    patches = []
    cls = type(provider(backend))
    for method in counts:
        original = getattr(cls, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            counts[_method] += 1
            return _original(self, *args, **kwargs)

        patches.append(mock.patch.object(cls, method, spy))
    for p in patches:
        p.start()
    try:
        yield counts
    finally:
        for p in patches:
            p.stop()


def run(full, labels, inputs, vocab, *, where, in_kernel, inplace=False, upstream=1.0, **kwargs):
    """(loss, stats, gradient of the [..., :vocab] logits, provider calls) of one fused_policy_loss
    on where = (backend, device); results on the CPU."""
    backend, device = where
    leaf = full.to(device, copy=True).requires_grad_(True)
    x = (leaf * 1.0)[..., :vocab] if inplace else leaf[..., :vocab]
    args = {k: v.to(device) for k, v in inputs.items() if k != "rollout_logp" or kwargs.get("rollout_is")}
    fits = fpl._loss_gradient_fits_the_kernel
    decide = fits if in_kernel else lambda *a: False
    with mock.patch.object(fpl, "_loss_gradient_fits_the_kernel", decide), counted_launches(backend) as counts:
        loss, stats = rlhf_fast.fused_policy_loss(x, labels.to(device), backend=backend, inplace_backward=inplace,
                                                  **args, **kwargs)  # fmt: skip
        (loss * upstream).backward()
    assert (leaf.grad[..., vocab:] == 0).all()
    return loss.detach().cpu(), {k: v.cpu() for k, v in stats.items()}, leaf.grad[..., :vocab].cpu(), counts


def check(full, labels, inputs, vocab, *, where, inplace=False, upstream=1.0, **kwargs):
    """The one-kernel path against today's path and the float64 reference."""
    backend, device = where
    require(backend, device, full.dtype, "policy_epilogue")
    loss, stats, grad, counts = run(full, labels, inputs, vocab, where=where, in_kernel=True, inplace=inplace,
                                    upstream=upstream, **kwargs)  # fmt: skip
    low = full.dtype in (torch.bfloat16, torch.float16)
    recomputed = int(upstream != 1.0 and low and not inplace and upstream not in (2.0, 0.5))
    assert counts == {"policy_epilogue_forward": 1, "token_logprobs_forward": 0, "token_logprobs_backward": recomputed}
    want, want_stats, want_grad, old_counts = run(full, labels, inputs, vocab, where=where, in_kernel=False,
                                                  inplace=inplace, upstream=upstream, **kwargs)  # fmt: skip
    assert old_counts["policy_epilogue_forward"] == 0 and old_counts["token_logprobs_forward"] == 1
    # Same logp and entropy (the same forward numerics), the same [B, T] code: the same loss and
    # stats. The CUDA kernel reads every row as a block, the forward kernel small rows as a warp:
    # the same sums in another order, so its logp may differ in the last bit.
    if backend == "cuda":
        assert torch.allclose(loss, want, rtol=1e-6, atol=1e-7), (loss.item(), want.item())
    else:
        assert torch.equal(loss, want), (loss.item(), want.item())
    assert set(stats) == set(want_stats)
    for key, value in want_stats.items():
        assert torch.allclose(stats[key], value, rtol=1e-6, atol=1e-7, equal_nan=True), (key, stats[key], value)
    mask = inputs["mask"]
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    if grad.dtype in (torch.float32, torch.float64):
        # float64: today's path runs the [B, T] math in float32, the kernel in float64.
        assert rel_err(grad, want_grad, floor=grad[..., 0].numel() ** 0.5) < 1e-6
    else:
        # Each path rounds a float32 gradient once, and the two float32 gradients agree to float32
        # rounding of the row's terms.
        assert_rows_within_one_ulp(grad, want_grad, "grad vs today's path")

    # The float64 reference on the same logit values.
    y = full[..., :vocab].double().clone().requires_grad_(True)
    options = {k: v for k, v in kwargs.items() if k not in ("temperature", "entropy_coef")}
    ref_inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    if not kwargs.get("rollout_is"):
        ref_inputs.pop("rollout_logp")
    exact, exact_stats = reference.fused_policy_loss(y, labels, temperature=kwargs.get("temperature", 1.0),
                                                     entropy_coef=kwargs.get("entropy_coef", 0.0), **ref_inputs,
                                                     **options)  # fmt: skip
    (exact * upstream).backward()
    agg = kwargs.get("agg", "token-mean")
    logp, entropy = reference.token_logprobs(y.detach(), torch.where(mask, labels, 0), return_entropy=True,
                                             temperature=kwargs.get("temperature", 1.0))  # fmt: skip
    scale = policy_term_scale(logp, inputs["old_logp"], inputs["advantages"], mask, agg,
                              ref_logp=inputs["ref_logp"], kl_coef=kwargs.get("kl_coef", 0.0))  # fmt: skip
    scale += abs(kwargs.get("entropy_coef", 0.0)) * reference.aggregate(entropy, mask, agg).abs().item()
    budget = tolerance(torch.float32)
    assert abs(loss.item() - exact.item()) <= budget * max(abs(exact.item()), scale, 1e-2), (loss.item(), exact.item())
    # float64 logits: a rollout correction's weights are computed by the op from the float32 [B, T]
    # inputs in float32 (before any kernel), so such a gradient is float32-accurate, not float64.
    graded = grad.float() if grad.dtype == torch.float64 and kwargs.get("rollout_is") else grad
    assert_close(graded, y.grad, "grad vs float64", floor=grad[..., 0].numel() ** 0.5,
                 truncated=truncates(backend, device, grad.dtype))  # fmt: skip
    for key, value in exact_stats.items():
        assert stats[key].item() == pytest.approx(value.item(), rel=budget, abs=1e-6), key


def test_kernel_objectives_are_the_kernels_and_separable():
    assert all(OBJECTIVES[name].separable for name in fpl.KERNEL_OBJECTIVES)
    assert {name for name in BACKENDS if LOSS_OPS <= provider(name).ops} == set(KERNEL_BACKENDS)
    triton, host = bool(provider("triton").available()), bool(provider("host").available())
    if triton:
        from rlhf_fast.kernels.policy_epilogue import OBJECTIVE_CODE, _ratio_bounds

        assert tuple(OBJECTIVE_CODE) == fpl.KERNEL_OBJECTIVES
    if host:
        from rlhf_fast.backends.extension import extension, ratio_bounds

        assert extension().POLICY_OBJECTIVE_CODES == dict(zip(fpl.KERNEL_OBJECTIVES, range(4)))
    if triton and host:  # the extension's ratio bounds are the Triton launcher's
        for objective in OBJECTIVE_CASES:
            options = rlhf_fast.PolicyLossOptions(**objective)
            assert ratio_bounds(options) == _ratio_bounds(options), objective


# Fast tier: every objective case once in float32 and once in bfloat16, the other options
# cycled over them so that each value of each appears.
FAST = [
    dict(dtype=dtype, inplace=inplace, options=dict(objective, agg=agg, temperature=temperature,
                                                     entropy_coef=coef, **kl, **rollout))
    for (objective, dtype), agg, kl, rollout, coef, temperature, inplace in zip(
        itertools.product(OBJECTIVE_CASES, (torch.float32, torch.bfloat16)),
        itertools.cycle(AGGS), itertools.cycle(KL_CASES), itertools.cycle(ROLLOUT_CASES),
        itertools.cycle((0.0, 0.01, -0.02)), itertools.cycle((1.0, 0.7, 1.3)), itertools.cycle((False, True, False)),
    )
]  # fmt: skip
# float64 logits (the host runs them in double): every objective once, other options cycled.
FAST += [
    dict(dtype=torch.float64, inplace=inplace, options=dict(objective, agg=agg, entropy_coef=coef, **kl, **rollout))
    for objective, agg, kl, rollout, coef, inplace in zip(
        OBJECTIVE_CASES, itertools.cycle(AGGS[1:] + AGGS[:1]), itertools.cycle(KL_CASES[1:]),
        itertools.cycle(ROLLOUT_CASES[2:] + ROLLOUT_CASES[:2]), itertools.cycle((0.02, 0.0)),
        itertools.cycle((True, False)),
    )
]  # fmt: skip


def _id(params):
    o = params["options"]
    return "-".join([str(params["dtype"]).removeprefix("torch."), "inplace" if params["inplace"] else "out"]
                    + [f"{k}={v}" for k, v in o.items()])  # fmt: skip


@pytest.mark.parametrize("params", FAST, ids=_id)
def test_equals_todays_path_and_reference(params, where):
    full, labels, inputs, vocab = case(dtype=params["dtype"])
    check(full, labels, inputs, vocab, where=where, inplace=params["inplace"], **params["options"])


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_combination(objective, where):
    """agg x KL x rollout correction for one objective; dtype, entropy_coef, temperature and
    in-place drawn for each (the seed is printed on failure)."""
    for agg, kl, rollout in itertools.product(AGGS, KL_CASES, ROLLOUT_CASES):
        dtype = (torch.float32, torch.bfloat16)[torch.randint(0, 2, ()).item()]
        coef = (0.0, 0.01, -0.02)[torch.randint(0, 3, ()).item()]
        temperature = (1.0, 0.7, 1.3)[torch.randint(0, 3, ()).item()]
        inplace = bool(torch.randint(0, 2, ()))
        full, labels, inputs, vocab = case(rows=3, tokens=4, vocab=19, dtype=dtype)
        check(full, labels, inputs, vocab, where=where, inplace=inplace, agg=agg, temperature=temperature,
              entropy_coef=coef, **objective, **kl, **rollout)  # fmt: skip


@pytest.mark.parametrize("vocab", [1, 17, 300])
def test_vocabulary_sizes_and_tiles(vocab, where):
    """V = 1 (p = 1 exactly), a small tile of several rows, and a one-row tile wider than one chunk."""
    full, labels, inputs, vocab = case(rows=3, tokens=3, vocab=vocab, neg_inf=vocab > 1)
    check(full, labels, inputs, vocab, where=where, objective="ppo", clip_eps=0.2, entropy_coef=0.01, kl_coef=0.1,
          temperature=0.9)  # fmt: skip


@pytest.mark.parametrize("bad", [-1, 37, 10**9])
def test_out_of_range_label_is_refused_before_the_kernel(bad, where):
    """A label outside [0, V) at a valid token: the one-kernel path raises naming it, as the
    composed path does, before any kernel reads the row with it; the logits are untouched."""
    backend, device = where
    require(backend, device, torch.float32, "policy_epilogue")
    full, labels, inputs, vocab = case(rows=3, tokens=4, vocab=37)
    inputs["mask"][0, 0] = True  # a valid token for the bad label, whatever the mask drawn
    labels[0, 0] = bad
    logits = full.to(device, copy=True).requires_grad_(True)
    x = (logits * 1.0)[..., :vocab]  # in place: the gradient would go over these
    before = x.detach().clone()
    args = {k: v.to(device) for k, v in inputs.items() if k != "rollout_logp"}
    with counted_launches(backend) as counts, pytest.raises(ValueError, match=rf"labels must be in \[0, {vocab}\).*got {bad}"):
        rlhf_fast.fused_policy_loss(x, labels.to(device), backend=backend, inplace_backward=True, objective="ppo", **args)
    assert counts == {"policy_epilogue_forward": 0, "token_logprobs_forward": 0, "token_logprobs_backward": 0}
    assert torch.equal(x.detach(), before)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,dtype", [(17, torch.float32), (300, torch.bfloat16), (5000, torch.bfloat16)], ids=str)
def test_cuda_l2_resident_launch_shape(vocab, dtype, monkeypatch):
    """RLHF_FAST_CUDA_EPILOGUE=l2: the CUDA kernel in its other launch shape (1024-thread blocks, one
    per multiprocessor, grid-stride over more rows than blocks) against today's path and the reference."""
    monkeypatch.setenv("RLHF_FAST_CUDA_EPILOGUE", "l2")
    full, labels, inputs, vocab = case(rows=40, tokens=9, vocab=vocab, dtype=dtype)
    check(full, labels, inputs, vocab, where=("cuda", "cuda"), objective="ppo", clip_eps=0.2, entropy_coef=0.01,
          kl_coef=0.1, temperature=0.9)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sequence_advantages_int32_labels(dtype, where):
    """[B] advantages broadcast over T, int32 labels (the kernel takes int64) and float16 logits."""
    full, labels, inputs, vocab = case(rows=4, tokens=4, dtype=dtype)
    inputs["advantages"] = torch.randn(4)
    check(full, labels.to(torch.int32), inputs, vocab, where=where, objective="ppo", clip_eps=0.2, dual_clip=3.0,
          kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean", temperature=0.8)  # fmt: skip


@pytest.mark.parametrize("agg", AGGS)
def test_normalizer_and_empty_mask(agg, where):
    """A global normaliser (micro-batch accumulation) and a batch without a valid token, against today's path."""
    require(*where, torch.float32, "policy_epilogue")
    full, labels, inputs, vocab = case(rows=4, tokens=4)
    total = rlhf_fast.global_loss_normalizer([inputs["mask"], inputs["mask"][:2]], agg)
    for given in (inputs, inputs | {"mask": torch.zeros_like(inputs["mask"])}):
        kw = dict(normalizer=total, agg=agg, objective="cispo", kl_coef=0.1, entropy_coef=0.02)
        loss, stats, grad, counts = run(full, labels, given, vocab, where=where, in_kernel=True, **kw)
        want, want_stats, want_grad, _ = run(full, labels, given, vocab, where=where, in_kernel=False, **kw)
        exact = where[0] != "cuda"  # see check()
        assert counts["policy_epilogue_forward"] == 1
        assert torch.equal(loss, want) if exact else torch.allclose(loss, want, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(stats[k], want_stats[k]) if exact else torch.allclose(stats[k], want_stats[k],
                   rtol=1e-6, atol=1e-7) for k in want_stats)  # fmt: skip
        assert rel_err(grad, want_grad, floor=grad[..., 0].numel() ** 0.5) < 1e-6
    assert loss == 0 and (grad == 0).all()


def test_nan_advantage_poisons_its_row_only(where):
    """A NaN advantage at a valid token: a NaN loss and a NaN gradient in that token's row, as today."""
    require(*where, torch.float32, "policy_epilogue")
    full, labels, inputs, vocab = case(rows=3, tokens=4, neg_inf=False)
    mask = inputs["mask"]
    b, t = mask.nonzero()[0].tolist()
    inputs["advantages"] = inputs["advantages"].clone()
    inputs["advantages"][b, t] = float("nan")
    loss, _, grad, _ = run(full, labels, inputs, vocab, where=where, in_kernel=True, kl_coef=0.1)
    want, _, want_grad, _ = run(full, labels, inputs, vocab, where=where, in_kernel=False, kl_coef=0.1)
    assert loss.isnan() and want.isnan()
    assert torch.equal(grad.isnan(), want_grad.isnan()) and grad[b, t].isnan().all()
    others = ~grad.isnan()
    assert rel_err(grad[others], want_grad[others]) < 1e-6


@pytest.mark.parametrize("upstream", [0.5, -0.3, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scaled_backward(dtype, upstream, where):
    """A 16-bit gradient scaled by a non-power of two is recomputed by the backward kernel from the
    epilogue's token gradients; otherwise the kernel's gradient is scaled."""
    full, labels, inputs, vocab = case(rows=3, tokens=4, dtype=dtype)
    check(full, labels, inputs, vocab, where=where, upstream=upstream, objective="ppo", entropy_coef=0.01,
          kl_coef=0.1)  # fmt: skip


def test_second_backward_and_inplace(where):
    backend, device = where
    require(backend, device, torch.float32, "policy_epilogue")
    full, labels, inputs, vocab = case(rows=3, tokens=4)
    full, labels, inputs = full.to(device), labels.to(device), {k: v.to(device) for k, v in inputs.items()}
    x = full[..., :vocab].clone().requires_grad_(True)
    loss, _ = rlhf_fast.fused_policy_loss(x, labels, backend=backend, kl_coef=0.1, **inputs | {"rollout_logp": None})
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # recomputed from the logits by the backward kernel
    assert torch.allclose(x.grad, 2 * first, rtol=1e-6, atol=1e-9)

    leaf = full[..., :vocab].clone().requires_grad_(True)
    view = leaf * 1.0
    loss2, _ = rlhf_fast.fused_policy_loss(view, labels, backend=backend, kl_coef=0.1, inplace_backward=True,
                                           **inputs | {"rollout_logp": None})  # fmt: skip
    assert view._version > 0  # written in place, and marked so
    assert torch.allclose(view.detach(), first, rtol=1e-6, atol=1e-9)  # the gradient, before any backward
    loss2.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be computed again"):
        loss2.backward()


@pytest.mark.parametrize("options", [
    dict(objective="gspo"),
    dict(objective="ppo", kl_coef=0.1, kl_is_correction=True),
    dict(objective="ppo", top_entropy_quantile=0.5),
])  # fmt: skip
def test_other_losses_keep_todays_path(options, where):
    require(*where, torch.float32, "policy_epilogue")
    full, labels, inputs, vocab = case(rows=3, tokens=4)
    _, _, _, counts = run(full, labels, inputs, vocab, where=where, in_kernel=True, **options)
    assert counts == {"policy_epilogue_forward": 0, "token_logprobs_forward": 1, "token_logprobs_backward": 1}


def test_kl_coef_without_ref_logp_raises_before_writing_in_place(where):
    backend, device = where
    require(backend, device, torch.float32, "policy_epilogue")
    full, labels, inputs, vocab = case(rows=2, tokens=3)
    full, labels, inputs = full.to(device), labels.to(device), {k: v.to(device) for k, v in inputs.items()}
    x = full[..., :vocab].clone().requires_grad_(True)
    view = x * 1.0
    before = view.detach().clone()
    args = {k: v for k, v in inputs.items() if k not in ("ref_logp", "rollout_logp")}
    with pytest.raises(ValueError, match="needs ref_logp"):
        rlhf_fast.fused_policy_loss(view, labels, backend=backend, kl_coef=0.1, inplace_backward=True, **args)
    assert torch.equal(view.detach(), before)


def test_decision():
    """On CPU tensors: each backend that serves the op here, and "auto" where it resolves to one."""
    logits = torch.randn(2, 3, 5)
    plain = rlhf_fast.PolicyLossOptions()
    for backend in ("torch", "host", "cuda", "triton"):
        serves = bool(can_serve(backend, logits.device, logits.dtype, "policy_epilogue"))
        assert serves == (backend == "host" and bool(can_serve("host", logits.device, logits.dtype))
                          or backend == "triton" and bool(can_serve("triton", logits.device, logits.dtype)))
        assert fpl._loss_gradient_fits_the_kernel(logits, plain, backend) == serves
        assert not fpl._loss_gradient_fits_the_kernel(logits, rlhf_fast.PolicyLossOptions(objective="gmpo"), backend)
    # "auto" on CPU is the host when it is built, else the torch reference: three steps.
    assert fpl._loss_gradient_fits_the_kernel(logits, plain, "auto") == bool(can_serve("host", logits.device,
                                                                                         logits.dtype))
    with rlhf_fast.use_backend("torch"):
        assert not fpl._loss_gradient_fits_the_kernel(logits, plain, "auto")
