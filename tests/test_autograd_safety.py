"""Autograd safety of every op that saves inputs or gradients: an input changed in place between
forward and backward raises as eager does, and repeated backwards (retain_graph=True, with
zero_grad(set_to_none=False) between) give eager's gradients: nothing handed out aliases saved state."""

from __future__ import annotations

import pytest
import torch

import rlhf_fast
from rlhf_fast import reference

from numerics import rel_err

N, H, V = 6, 8, 13
TOL = 2e-5


def cases():
    labels = torch.randint(0, V, (2, 3))
    old, adv, mask = torch.randn(2, 3) - 2, torch.randn(2), torch.ones(2, 3, dtype=torch.bool)

    def linear(op, **kw):
        def run(hidden, weight):
            out = op(hidden.view(2, 3, H), weight, labels, **kw)
            return out[0] if isinstance(out, tuple) else out.sum() if out.dim() else out

        def eager(hidden, weight):
            logits = torch.nn.functional.linear(hidden.view(2, 3, H), weight)
            return run_on_logits(op, logits, **kw)

        return run, eager

    def policy(hidden, weight, labels, **kw):
        return rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old, adv, mask, **kw)

    def run_on_logits(op, logits, **kw):
        if op is rlhf_fast.linear_sft_loss:
            return reference.sft_loss(logits, labels)
        if op is rlhf_fast.linear_token_logprobs:
            return reference.token_logprobs(logits, labels).sum()
        return reference.fused_policy_loss(logits, labels, old, adv, mask, **kw)[0]

    return {
        "linear_sft_loss": linear(rlhf_fast.linear_sft_loss),
        "linear_token_logprobs": linear(rlhf_fast.linear_token_logprobs),
        "fused_linear_policy_loss": linear(policy),
        "fused_linear_policy_loss[gspo]": linear(policy, objective="gspo"),  # the two-sweep path
    }




@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("target", ["hidden", "weight"])
def test_inplace_change_between_forward_and_backward_raises(name, target):
    hidden, weight = torch.randn(N, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    run, _ = cases()[name]
    loss = run(hidden, weight)
    with torch.no_grad():
        (hidden if target == "hidden" else weight).mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", ["linear_sft_loss", "fused_linear_policy_loss", "fused_linear_policy_loss[gspo]"])
@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_repeated_backwards_accumulate_like_eager(name, upstream):
    hidden, weight = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    run, eager = cases()[name]
    for fn in (run, eager):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w) * upstream
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        three = (h.grad.clone(), w.grad.clone())
        h.grad.zero_(), w.grad.zero_()  # zero_grad(set_to_none=False)
        loss.backward()
        one = (h.grad.clone(), w.grad.clone())
        if fn is run:
            got = (three, one)
        else:
            want = (three, one)
    for (g3, g1), (w3, w1) in zip(zip(*got), zip(*want)):
        # The policy losses run their [B, T] math in float32: TOL is test_policy_loss's float32 budget.
        assert rel_err(g3, w3) < TOL and rel_err(g1, w1) < TOL
        assert rel_err(g3, 3 * g1) < 1e-12  # every backward gives the same gradients
