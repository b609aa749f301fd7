"""The KL estimators in float32-accurate torch, with their gradients: the one copy of this math,
used by the ops (ops/kl.py, ops/policy_loss.py) and by the torch backend alike (a leaf module:
it imports nothing of ours). The float64 spec is reference.kl_penalty."""

from __future__ import annotations

import torch

# k3(x) = e^x - 1 - x with x = ref_logp - logp. Evaluated as written, float32 loses every digit
# once |x| < 1e-4 (e^x - 1 - x ~ x^2 / 2 drowns in the rounding of e^x ~ 1); below |x| = 0.5 the
# Taylor series to x^8 is exact to 4e-8 relative (next term x^9 / 9!), and above it the
# subtraction loses at most a factor ~5 of the rounding of e^x. Shared with kernels/rewards.py.
K3_SERIES_BELOW = 0.5
_K3_TAYLOR = (1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320)  # x^2 .. x^8


def k3_of(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 - x >= 0 to float32 accuracy for every x (differentiable). [...] -> [...]"""
    small = x.abs() < K3_SERIES_BELOW
    xs = torch.where(small, x, 0.0)  # keep the unused branch finite, in value and in gradient
    poly = xs * _K3_TAYLOR[-1] + _K3_TAYLOR[-2]
    for c in reversed(_K3_TAYLOR[:-2]):
        poly = poly * xs + c
    series = xs * xs * poly
    xl = torch.where(small, 1.0, x)
    return torch.where(small, series, (torch.expm1(xl) - xl).clamp(min=0.0))


def kl_values(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """The estimator's formula on already validated tensors (see reference.kl_penalty)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return k3_of(-d)
    return d.abs()


def kl_loss_values(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: float | None,
                   value: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The policy loss's KL term (see reference.kl_loss): ``kl_values`` clamped to [-clamp, clamp]
    (verl's low_var_kl clamps k3 at 10, OpenRLHF every estimator); an estimator ending in "+" has
    that value with the gradient of k2, d = logp - ref_logp (verl's straight-through "k3+": an
    unbiased estimate of the KL's gradient whatever the value's estimator). ``value``: that
    ``kl_values``, when the caller computed it already."""
    if value is None:
        value = kl_values(logp, ref_logp, estimator.removesuffix("+"))
    if clamp is not None:
        value = value.clamp(-clamp, clamp)
    if not estimator.endswith("+"):
        return value
    d = logp - ref_logp
    k2 = 0.5 * d * d
    return k2 - k2.detach() + value.detach()


def kl_grad(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """d kl / d logp of ``kl_values`` (d kl / d ref_logp is its negative)."""
    d = logp - ref_logp
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "k2":
        return d
    if estimator == "k3":
        return -torch.expm1(-d)  # d/dlogp (e^{-d} + d - 1) = 1 - e^{-d}
    return torch.sign(d)
