"""Shared test helpers: backends to test, norm-wise relative error, low-precision error budgets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.backends.cuda import CudaProvider
from rlhf_fast.backends.host import HostProvider
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


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed against the float64 reference evaluated on the same input values."""
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]


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
# The compiled extension's providers and build script
# ---------------------------------------------------------------------------------------------

PROVIDERS = {"host": (HostProvider(), "cpu"), "cuda": (CudaProvider(), "cuda")}
ROOT = Path(__file__).resolve().parents[1]


def provider_on(name: str, dtype: torch.dtype):
    """(provider, device) for a test, or skip with the provider's own reason."""
    prov, device = PROVIDERS[name]
    support = prov.available()
    if support:
        support = prov.supports(torch.device(device), dtype)
    if not support:
        pytest.skip(f"{name}: {support.reason}")
    return prov, device


def load_build_script():
    """setup.py's helpers (its setup() call runs only as __main__), so the test compiles the way the build does."""
    spec = importlib.util.spec_from_file_location("rlhf_fast_build_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
