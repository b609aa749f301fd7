"""Shared test helpers: backends to test, norm-wise relative error, the tolerance rule, shared builders."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.backends.registry import BACKENDS, can_serve


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params():
    """(backend, device) pairs; those that cannot run here are skipped with the backend's reason."""
    params = []
    for device in devices():
        for name in BACKENDS:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


def require(backend: str, device: str, dtype: torch.dtype, op: str = "token_logprobs") -> None:
    support = can_serve(backend, torch.device(device), dtype, op)
    if not support:
        pytest.skip(f"{backend} {op} on {device}/{dtype}: {support.reason}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor, *, floor: float | None = None) -> float:
    """||actual - expected|| / max(||expected||, floor), in float64; floor defaults to 0.01 sqrt(n).

    The floor compares tensors whose entries are all below 0.01 (the entropy of a near one-hot
    distribution, say) absolutely rather than relatively to a norm that is almost zero. For a
    [N, V] logits gradient pass floor=sqrt(N): a row's gradient has norm ~ its upstream gradient,
    so a V = 1 row (gradient exactly 0, computed as 1 - p with p ~ 1) is compared absolutely.
    """
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if floor is None:
        floor = 0.01 * max(expected.numel(), 1) ** 0.5
    return (actual - expected).norm().item() / max(expected.norm().item(), floor)


# ---------------------------------------------------------------------------------------------
# The tolerance rule: a result against the float64 reference evaluated on the same input values
# ---------------------------------------------------------------------------------------------

# float32 and float64 results may be off by 64 eps of their dtype (7.6e-6 / 1.4e-14), norm-wise. A
# result is a sum or a scan of many rounded terms, whose errors add up like a random walk. Measured
# over 40 seeds: token_logprobs (sums over V <= 128256) at most 5 eps on every backend, undiscounted
# GAE over 5000 tokens at most 18 eps (host, which scans left to right). 64 eps, the power of two
# above 3x the worst, stays below the 1e-5 and 2e-5 the suites allowed before. A scan's error grows
# as the square root of its length, and so does the allowance beyond SCAN_MEASURED tokens: times
# sqrt(tokens / SCAN_MEASURED) (host over 32768 tokens: at most 58 eps, 164 allowed).
EPS_MULTIPLE = 64
SCAN_MEASURED = 5000
LOW_PRECISION = (torch.bfloat16, torch.float16)


def tolerance(dtype: torch.dtype, exact: torch.Tensor | None = None, *, floor: float | None = None,
              truncated: bool = False, scan: int = 0) -> float:
    """The relative error (``rel_err`` with ``floor``) allowed for a result of ``dtype`` against ``exact``,
    the float64 reference on the same input values: the one tolerance rule of the tests.

    float32 / float64 results: EPS_MULTIPLE eps of the dtype, times sqrt(scan / SCAN_MEASURED) for a
        result of a scan over ``scan`` > SCAN_MEASURED tokens (see above).
    bfloat16 / float16 results (computed in float32, stored in ``dtype``): PyTorch's own error in that
        dtype, that of its cast of ``exact`` (the least any result stored in it can have), plus twice
        the float32 allowance: a float32 y within d of x rounds to within |round(x) - x| + 2 |d| of x.
    truncated: the result was truncated to ``dtype``, not rounded (see ``truncates``); one ulp of
        every element of ``exact`` replaces PyTorch's rounding error.
    """
    if dtype not in LOW_PRECISION:
        return EPS_MULTIPLE * torch.finfo(dtype).eps * max(1.0, scan / SCAN_MEASURED) ** 0.5
    return torch_error(dtype, exact, floor=floor, truncated=truncated) + 2 * tolerance(torch.float32, scan=scan)


def torch_error(dtype: torch.dtype, exact: torch.Tensor, *, floor: float | None = None, truncated: bool = False):
    """PyTorch's own relative error in a low-precision ``dtype``: rel_err of its cast of ``exact``
    (or, ``truncated``, one ulp of each element of that cast)."""
    exact = exact.detach().double().cpu()
    stored = exact.to(dtype)
    if truncated:
        up = torch.nextafter(stored.abs(), torch.tensor(math.inf, dtype=dtype))
        return rel_err(exact + (up.double() - stored.abs().double()), exact, floor=floor)
    return rel_err(stored, exact, floor=floor)


def truncates(backend: str, device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` stores float32 results in ``dtype`` by truncation: the Triton interpreter's
    bfloat16 (numpy has none: triton/runtime/interpreter.py casts with _convert_float(..., None),
    which drops the low 16 bits, up to 1 ulp off where a GPU rounds to nearest, 1/2 ulp)."""
    return backend == "triton" and torch.device(device).type == "cpu" and dtype == torch.bfloat16


def assert_close(actual: torch.Tensor, exact: torch.Tensor, what: str, *, floor: float | None = None,
                 truncated: bool = False, scan: int = 0) -> float:
    """The tolerance rule as an assertion on ``actual`` (its dtype picks the budget); the message
    prints the error, the budget and, below float32, PyTorch's own error in that dtype."""
    err = rel_err(actual, exact, floor=floor)
    budget = tolerance(actual.dtype, exact, floor=floor, truncated=truncated, scan=scan)
    own = ""
    if actual.dtype in LOW_PRECISION:
        own = f"; PyTorch's own {actual.dtype} error {torch_error(actual.dtype, exact, floor=floor):.3g}"
        own += " (truncating: one ulp)" if truncated else ""
    assert err <= budget, f"{what}: rel err {err:.3g} > {budget:.3g}{own}"
    return err


def assert_within_one_ulp(actual: torch.Tensor, other: torch.Tensor, what: str) -> None:
    """Two 16-bit results that each round a float32 value once, from two computations that agree in
    float32, part by at most one ulp of the larger where the values straddle a rounding boundary."""
    a, b = actual.detach().cpu(), other.detach().cpu()
    larger = torch.maximum(a.abs(), b.abs())
    ulp = torch.nextafter(larger, torch.tensor(math.inf, dtype=larger.dtype)) - larger
    apart = (a.double() - b.double()).abs() > ulp.double()
    assert not apart.any(), f"{what}: {int(apart.sum())} elements more than one ulp apart"


def assert_rows_within_one_ulp(actual: torch.Tensor, other: torch.Tensor, what: str) -> None:
    """``assert_within_one_ulp`` for two 16-bit logits gradients [..., V], held to it where their
    float32 values differ by more than float32 rounding of the row's largest element: there the
    two float32 gradients agree only to that rounding (a tiny p_k (g + g_H (log p_k + H)) whose
    terms cancel), so a 16-bit element far below it may be several of its own ulps off."""
    a, b = actual.detach().cpu(), other.detach().cpu()
    row_scale = torch.maximum(a.abs(), b.abs()).amax(-1, keepdim=True).float()
    clear = (a.float() - b.float()).abs() > tolerance(torch.float32) * row_scale
    assert_within_one_ulp(a[clear], b[clear], what)


MASK_PATTERNS = ("right", "left", "holes", "mixed")


def random_mask(rows: int, tokens: int, pattern: str = "mixed", device="cpu") -> torch.Tensor:
    """[rows, tokens] bool response mask. "right": a valid prefix of random length (0 to T) then
    padding; "left": padding then a valid suffix; "holes": independent random tokens; "mixed":
    rows cycle through right, left, holes, an empty row and a full row."""
    if pattern == "mixed":
        kinds = ("right", "left", "holes", "empty", "full")
        return torch.cat([random_mask(1, tokens, kinds[i % 5], device) for i in range(rows)]) if rows else (
            torch.zeros(0, tokens, dtype=torch.bool, device=device)
        )
    positions = torch.arange(tokens).expand(rows, tokens)
    if pattern == "empty":
        mask = torch.zeros(rows, tokens, dtype=torch.bool)
    elif pattern == "full":
        mask = torch.ones(rows, tokens, dtype=torch.bool)
    elif pattern == "holes":
        mask = torch.rand(rows, tokens) < 0.6
    else:
        lengths = torch.randint(0, tokens + 1, (rows, 1))
        mask = positions < lengths if pattern == "right" else positions >= tokens - lengths
    return mask.to(device)


def poison(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with NaN, +inf and -inf scattered over its masked positions (they must never matter)."""
    junk = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype, device=x.device)
    fill = junk[torch.randint(0, 3, x.shape, device=x.device)]
    return torch.where(mask, x, fill)


def policy_term_scale(logp, old_logp, advantages, mask, agg, *, ref_logp=None, kl_coef=0.0, kl_estimator="k3"):
    """``agg`` of the per-token policy-loss terms' sizes, |A| ratio (+ kl_coef |kl|), in float64.

    A policy loss sums terms of both signs (advantages are), so it can cancel to nearly 0 while
    its float32 rounding error stays proportional to the terms: compare loss values to this scale.
    """
    mask = mask.bool()
    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
    logp, old_logp = (torch.where(mask, t.detach().double(), 0.0) for t in (logp, old_logp))
    size = torch.where(mask, adv.double().abs(), 0.0) * (logp - old_logp).exp()
    if ref_logp is not None and kl_coef:
        kl = reference.kl_penalty(logp, torch.where(mask, ref_logp.double(), 0.0), estimator=kl_estimator)
        size = size + kl_coef * kl.abs()
    return reference.aggregate(size, mask, agg).item()


# ---------------------------------------------------------------------------------------------
# Option sets and configurations shared by several test modules
# ---------------------------------------------------------------------------------------------

CLIPS = [
    {"clip_eps": 0.2},
    {"clip_eps": 0.2, "clip_eps_high": 0.28},
    {"clip_eps": None},
    {"clip_eps": 0.2, "dual_clip": 3.0},
    {"clip_eps": None, "dual_clip": 2.0},
]
KLS = [{}, {"kl_coef": 0.1, "kl_estimator": "k3"}, {"kl_coef": 0.05, "kl_estimator": "k1"},
       {"kl_coef": 0.2, "kl_estimator": "k2"}, {"kl_coef": 0.3, "kl_estimator": "abs"}]  # fmt: skip

# A tiny RL run on the built-in task (rlhf_fast.train needs the [train] extra: imported in tiny()).
TINY_RL = {
    "model.hidden_size": 32,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.intermediate_size": 64,
    "reward.gold": True,
    "data.train_prompts": 64,
    "rollout.batch_size": 8,
    "rollout.max_new_tokens": 6,
    "algo.mini_batch_size": 4,
    "algo.micro_batch_size": 2,
    "optim.lr": 1e-3,
    "train.steps": 2,
    "train.eval_prompts": 8,
    "train.save_every": 0,
    "train.progress": False,
    "train.device": "cpu",
}
ALGOS = {
    "ppo": {"algo.name": "ppo", "algo.epochs": 2},
    "grpo": {"algo.name": "grpo", "rollout.group_size": 4, "algo.kl_place": "loss", "algo.kl_estimator": "k3"},
    "reinforce": {"algo.name": "reinforce", "rollout.group_size": 2, "algo.baseline": "rloo", "algo.mini_batch_size": 8},
}


def tiny(out_dir, **overrides):
    """The RLConfig of a tiny run into ``out_dir``, with ``overrides`` ({"section.key": value})."""
    from rlhf_fast.train.config import load_config
    from rlhf_fast.train.rl.config import RLConfig

    return load_config(RLConfig, None, {"out_dir": str(out_dir), **TINY_RL, **overrides})


# ---------------------------------------------------------------------------------------------
# Inputs of the provider methods (rlhf_fast/backends/base.py), and the build script
# ---------------------------------------------------------------------------------------------

IGNORE = reference.IGNORE_INDEX
ROOT = Path(__file__).resolve().parents[1]
# The Triton kernels run in Python here (tests/conftest.py sets it on machines without a GPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def logits_case(n, vocab, dtype, *, scale=3.0, ignore_frac=0.25, label_dtype=torch.int64, row_pad=0):
    """CPU logits [n, vocab] (a view with row stride vocab + row_pad when row_pad > 0) and labels,
    about ``ignore_frac`` of them IGNORE; with ignore_frac > 0 row 0 is kept and row 1 ignored."""
    full = (torch.randn(n, vocab + row_pad, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    if ignore_frac > 0:
        labels[torch.rand(n) < ignore_frac] = IGNORE
        labels[0] = torch.randint(0, vocab, ())
        labels[1 % n] = IGNORE if n > 1 else labels[0]
    return full[:, :vocab], labels.to(label_dtype)


def bt_case(rows, tokens, pattern="mixed"):
    """CPU inputs of every [B, T] provider method: (mask, logp, ref_logp, scores, values, rewards,
    (grad_advantages, grad_returns)), NaN and inf at the masked positions."""
    mask = random_mask(rows, tokens, pattern)
    logp = poison(-torch.rand(rows, tokens) * 4, mask)
    ref_logp = poison(-torch.rand(rows, tokens) * 4, mask)
    values = poison(torch.randn(rows, tokens), mask)
    rewards = poison(torch.randn(rows, tokens), mask)
    grads = tuple(poison(torch.randn(rows, tokens), mask) for _ in range(2))
    return mask, logp, ref_logp, torch.randn(rows) * 3, values, rewards, grads


def load_build_script():
    """setup.py's helpers (its setup() call runs only as __main__), so the test compiles the way the build does."""
    spec = importlib.util.spec_from_file_location("rlhf_fast_build_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
