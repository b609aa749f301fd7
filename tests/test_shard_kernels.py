"""The token_logprobs kernels on a vocabulary shard (``vocab_offset``, ``log_mass``): the provider
contract of rlhf_fast/backends/base.py on every backend, in one process.

The shard is a slice [lo, hi) of whole-vocabulary logits, a view with the whole row's stride as a
real shard's logits need not be. Forward: the shard's own lse and entropy, and logp of the labels it
owns (0 for the others, which it must never read). Backward, given the shard's own lse and its log
share of the whole softmax: the whole vocabulary's gradient on the shard's columns, against the
float64 autograd of the whole vocabulary. ops/vocab_parallel.py runs the same kernels across
processes (tests/test_vocab_parallel.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast.backends.registry import provider

from numerics import IGNORE, assert_close, backend_params, logits_case, require, truncates

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # both sides of the interpreter's tl.where

TEMPERATURE = 0.7


def shard_case(n, vocab, lo, hi, dtype, *, offset=0.0):
    """Whole-vocabulary logits [n, vocab] (one -inf per few rows, ``offset`` added), labels over the
    whole vocabulary: in the shard, outside it, and IGNORE."""
    logits, labels = logits_case(n, vocab, dtype)
    logits = (logits.double() + offset).to(dtype)
    dead = (lo + 1) % vocab
    logits[::3, dead] = -math.inf
    labels[::3] = torch.where(labels[::3] == dead, lo, labels[::3])  # a -inf label's logp is -inf: not this test's
    labels[2] = lo  # the shard's first column and
    labels[3 % n] = hi - 1  # its last
    labels[4 % n] = hi % vocab if hi < vocab else lo - 1  # a neighbour owned elsewhere
    return logits, labels


def whole_vocabulary(logits, labels, g_logp, g_entropy):
    """float64 logp, entropy, lse and the logits' gradient of sum(g logp + g_H entropy), 0 at IGNORE rows."""
    x = logits.double().requires_grad_()
    keep = labels != IGNORE
    log_p = torch.log_softmax(x / TEMPERATURE, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p.clamp(min=-1e3)).sum(-1)  # a -inf logit: 0, and a gradient of 0 rather than NaN
    logp = log_p.gather(-1, torch.where(keep, labels, 0).long()[:, None]).squeeze(-1)
    logp, entropy = torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)
    (grad,) = torch.autograd.grad((g_logp.double() * logp + g_entropy.double() * entropy).sum(), x)
    lse = torch.logsumexp(x.detach() / TEMPERATURE, dim=-1)
    return logp.detach(), entropy.detach(), lse, grad


def poisoned(n, dtype):
    return torch.full((n,), math.nan, dtype=dtype)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab, lo, hi, offset", [(37, 0, 19, 0.0), (37, 19, 37, 0.0), (301, 120, 233, 0.0),
                                                   (301, 120, 233, 1e6), (5000, 1700, 4099, 0.0)])  # fmt: skip
def test_shard_forward_and_backward(backend, device, dtype, vocab, lo, hi, offset):
    require(backend, device, dtype)
    if offset and dtype != torch.float32:
        pytest.skip("the offset logits case is float32's (bf16 has no digits left at 1e6)")
    n = 37 if vocab <= 256 else 6
    odt = torch.float64 if dtype == torch.float64 else torch.float32
    logits, labels = shard_case(n, vocab, lo, hi, dtype, offset=offset)
    g_logp, g_entropy = torch.randn(n, dtype=odt), torch.randn(n, dtype=odt)
    logp_all, entropy_all, lse_all, grad_all = whole_vocabulary(logits, labels, g_logp, g_entropy)
    shard = logits[:, lo:hi].to(device)  # a view: the whole row's stride
    labels = labels.to(device)
    keep, owned = labels.cpu() != IGNORE, (labels.cpu() >= lo) & (labels.cpu() < hi)
    prov = provider(backend)

    logp, entropy, lse = (poisoned(n, odt).to(device) for _ in range(3))
    prov.token_logprobs_forward(shard, labels, logp, entropy, lse, TEMPERATURE, IGNORE, lo)
    own = torch.log_softmax(logits[:, lo:hi].double() / TEMPERATURE, dim=-1)
    own_entropy = -torch.where(own.exp() > 0, own.exp() * own, 0.0).sum(-1)
    own_logp = own.gather(-1, (labels.cpu().long() - lo).clamp(0, hi - lo - 1)[:, None]).squeeze(-1)
    assert_close(logp.cpu(), torch.where(owned, own_logp, 0.0), "shard logp")
    assert_close(entropy.cpu(), torch.where(keep, own_entropy, 0.0), "shard entropy")
    assert_close(lse.cpu()[keep], torch.logsumexp(logits[:, lo:hi].double() / TEMPERATURE, -1)[keep], "shard lse")

    # What ops/vocab_parallel.combine hands the backward: the whole entropy and the shard's log share
    # of the softmax (here exact: combine's carries the rounding of the shards' lse, ~2^-24 |lse|).
    own_lse = torch.logsumexp(logits[:, lo:hi].double() / TEMPERATURE, -1)
    log_mass = torch.where(keep, own_lse - lse_all, 0.0).to(odt).to(device)
    grad = torch.full((n, hi - lo + 3), math.nan, dtype=dtype, device=device)[:, : hi - lo]
    prov.token_logprobs_backward(shard, labels, lse, entropy_all.to(odt).to(device), g_logp.to(device),
                                 g_entropy.to(device), grad, TEMPERATURE, IGNORE, lo, log_mass)  # fmt: skip
    assert_close(grad.cpu(), grad_all[:, lo:hi], "shard gradient", floor=n**0.5,
                 truncated=truncates(backend, device, dtype))  # fmt: skip


@pytest.mark.parametrize("backend, device", backend_params())
def test_shard_backward_in_place_and_without_entropy(backend, device):
    require(backend, device, torch.float32)
    n, vocab, lo, hi = 9, 301, 150, 301
    logits, labels = shard_case(n, vocab, lo, hi, torch.float32)
    g_logp = torch.randn(n)
    logp_all, _, lse_all, grad_all = whole_vocabulary(logits, labels, g_logp, torch.zeros(n))
    prov = provider(backend)
    shard = logits[:, lo:hi].clone().to(device)
    labels = labels.to(device)
    logp, lse = poisoned(n, torch.float32).to(device), poisoned(n, torch.float32).to(device)
    prov.token_logprobs_forward(shard, labels, logp, None, lse, TEMPERATURE, IGNORE, lo)
    keep = labels.cpu() != IGNORE
    own_lse = torch.logsumexp(logits[:, lo:hi].double() / TEMPERATURE, -1)
    log_mass = torch.where(keep, own_lse - lse_all, 0.0).float().to(device)
    prov.token_logprobs_backward(shard, labels, lse, None, g_logp.to(device), None, shard, TEMPERATURE, IGNORE, lo,
                                 log_mass)  # fmt: skip
    assert_close(shard.cpu(), grad_all[:, lo:hi], "in-place shard gradient", floor=n**0.5)


@pytest.mark.parametrize("backend, device", backend_params())
def test_no_shard_is_offset_zero(backend, device):
    """vocab_offset = 0 and log_mass = None are today's whole-vocabulary kernels, bit for bit."""
    require(backend, device, torch.float32)
    logits, labels = shard_case(11, 301, 0, 301, torch.float32)
    g = torch.randn(11)
    prov = provider(backend)
    x, labels = logits.to(device), labels.to(device)
    runs = []
    for extra in ((), (0, None)):
        logp, entropy, lse = (poisoned(11, torch.float32).to(device) for _ in range(3))
        prov.token_logprobs_forward(x, labels, logp, entropy, lse, TEMPERATURE, IGNORE, *extra[:1])
        grad = torch.empty_like(x)
        prov.token_logprobs_backward(x, labels, lse, entropy, g.to(device), g.to(device), grad, TEMPERATURE, IGNORE,
                                     *extra)  # fmt: skip
        runs.append((logp, entropy, lse, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
