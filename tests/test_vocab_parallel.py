"""Vocabulary-parallel ops (``vocab_group=``) on 2 gloo processes equal the single-process op on the whole vocabulary.

One spawn of 2 workers runs every case (process start-up costs seconds): each worker draws the
same full inputs (same seed), runs the single-process op on the whole vocabulary and the
vocabulary-parallel op on its shard (V odd: uneven shards), and compares both with the float64
reference on the same input values. A result passes when its error is within the tolerance rule
(``numerics.tolerance``) or within twice the single-process op's own error plus the float32
allowance (bf16 linear heads round their logits in bf16, an error both ops share). Failures are
collected and raised together at the end, so that no rank is left waiting in a collective.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.backends.registry import BACKENDS, can_serve

from numerics import policy_term_scale, random_mask, rel_err, tolerance

WORLD = 2
B, T, V, H = 4, 9, 203, 32  # V odd: shards of 102 and 101
TEMPERATURE = 0.7
DTYPES = (torch.float32, torch.bfloat16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounds(rank: int) -> tuple[int, int]:
    first = (V + 1) // 2
    return (0, first) if rank == 0 else (first, V)


def _check(what, par, single, exact, floor=None):
    """par (vocabulary-parallel) and single (one process, whole vocabulary) vs exact (float64)."""
    err, own = rel_err(par, exact, floor=floor), rel_err(single, exact, floor=floor)
    budget = max(tolerance(par.dtype, exact, floor=floor), 2 * own + tolerance(torch.float32))
    assert err <= budget, f"{what}: rel err {err:.3g} > {budget:.3g} (single-process op: {own:.3g})"


def _labels():
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.25] = -100
    labels[0, 0], labels[0, 1] = 0, V - 1  # the first and last ids: one on each shard
    return labels


def _grads(*tensors):
    return [t.grad for t in tensors if t is not None]


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()


# ---- logits ops --------------------------------------------------------------------------------


def _logits_case():
    return (torch.randn(B, T, V, dtype=torch.float64) * 2), _labels()


def case_token_logprobs(backend, dtype, group, lo, hi):
    full, labels = _logits_case()
    full = full.to(dtype)
    g_logp, g_ent = torch.randn(B, T), torch.randn(B, T)

    def run(logits, fn=rlhf_fast.token_logprobs, **kw):
        x = _leaf(logits)
        logp, ent = fn(x, labels, temperature=TEMPERATURE, return_entropy=True, **kw)
        ((logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(logp.dtype)).sum()).backward()
        assert torch.equal(x, logits), "the logits were modified"
        return logp.detach(), ent.detach(), x.grad

    exact = run(full.double(), reference.token_logprobs)
    single = run(full, backend=backend)
    par = run(full[..., lo:hi], backend=backend, vocab_group=group)
    _check("logp", par[0], single[0], exact[0])
    _check("entropy", par[1], single[1], exact[1])
    _check("grad logits shard", par[2], single[2][..., lo:hi], exact[2][..., lo:hi], floor=(B * T) ** 0.5)
    # The in-place backward writes the same gradient into the shard's storage.
    grads = []
    for inplace in (False, True):
        x = full[..., lo:hi].clone().requires_grad_()
        logp = rlhf_fast.token_logprobs(x.clone(), labels, temperature=TEMPERATURE, backend=backend, vocab_group=group,
                                        inplace_backward=inplace)  # fmt: skip
        (logp * g_logp).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]), "in-place backward differs"


def case_int32_labels_custom_ignore_float64(backend, dtype, group, lo, hi):
    """int32 labels, ignore_index=-1, and float64 logits where the backend serves them (once: on the float32 pass)."""
    if dtype != torch.float32 or not can_serve(backend, torch.device("cpu"), torch.float64):
        return
    full, labels = _logits_case()
    labels = labels.masked_fill(labels == -100, -1).int()
    g_logp = torch.randn(B, T, dtype=torch.float64)

    def run(logits, fn=rlhf_fast.token_logprobs, **kw):
        x = _leaf(logits)
        logp = fn(x, labels, temperature=1.3, ignore_index=-1, **kw)
        (logp * g_logp).sum().backward()
        return logp.detach(), x.grad

    exact = run(full, reference.token_logprobs)
    single = run(full, backend=backend)
    par = run(full[..., lo:hi], backend=backend, vocab_group=group)
    assert par[0].dtype == torch.float64
    _check("logp", par[0], single[0], exact[0])
    _check("grad logits shard", par[1], single[1][..., lo:hi], exact[1][..., lo:hi], floor=(B * T) ** 0.5)


def case_sft_loss(backend, dtype, group, lo, hi):
    full, labels = _logits_case()
    full = full.to(dtype)

    def run(logits, fn=rlhf_fast.sft_loss, **kw):
        x = _leaf(logits)
        loss = fn(x, labels, **kw)
        loss.backward()
        return loss.detach(), x.grad

    exact = run(full.double(), reference.sft_loss)
    single = run(full, backend=backend)
    par = run(full[..., lo:hi], backend=backend, vocab_group=group)
    _check("sft loss", par[0], single[0], exact[0])
    _check("grad logits shard", par[1], single[1][..., lo:hi], exact[1][..., lo:hi], floor=(B * T) ** 0.5)


def _policy_inputs(logp_exact):
    mask = random_mask(B, T)
    old_logp = (logp_exact + 0.1 * torch.randn(B, T, dtype=torch.float64)).float()
    ref_logp = (logp_exact + 0.1 * torch.randn(B, T, dtype=torch.float64)).float()
    return old_logp, torch.randn(B), mask, ref_logp


POLICY = {"kl_coef": 0.1, "kl_estimator": "k3", "entropy_coef": 0.01, "temperature": TEMPERATURE}


def _loss_scale(logp_exact, old_logp, adv, mask, ref_logp, entropy):
    """The policy loss sums terms of both signs and can cancel: its rounding is measured against
    the terms' size (numerics.policy_term_scale), plus the entropy bonus's."""
    agg = rlhf_fast.PolicyLossOptions().agg
    terms = policy_term_scale(logp_exact, old_logp, adv, mask, agg, ref_logp=ref_logp, kl_coef=POLICY["kl_coef"])
    return terms + POLICY["entropy_coef"] * abs(entropy.item())
HEAD = {"logit_scale": 0.8, "logit_softcap": 3.0}  # a transformed head (Gemma's soft cap) in the linear policy case


def case_fused_policy_loss(backend, dtype, group, lo, hi):
    full, labels = _logits_case()
    full = full.to(dtype)
    old_logp, adv, mask, ref_logp = _policy_inputs(reference.token_logprobs(full.double(), labels.clamp(min=0),
                                                                            temperature=TEMPERATURE))  # fmt: skip

    def run(logits, fn=rlhf_fast.fused_policy_loss, **kw):
        x = _leaf(logits)
        loss, stats = fn(x, labels, old_logp, adv, mask, ref_logp=ref_logp, **POLICY, **kw)
        loss.backward()
        return loss.detach(), stats["entropy"].detach(), x.grad

    exact = run(full.double(), reference.fused_policy_loss)
    single = run(full, backend=backend)
    par = run(full[..., lo:hi], backend=backend, vocab_group=group)
    logp_exact = reference.token_logprobs(full.double(), labels.clamp(min=0), temperature=TEMPERATURE)
    _check("policy loss", par[0], single[0], exact[0],
           floor=_loss_scale(logp_exact, old_logp, adv, mask, ref_logp, exact[1]))
    _check("stats entropy", par[1], single[1], exact[1])
    _check("grad logits shard", par[2], single[2][..., lo:hi], exact[2][..., lo:hi], floor=(B * T) ** 0.5)


# ---- linear-head ops ---------------------------------------------------------------------------


def _head(dtype):
    hidden = torch.randn(B, T, H, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype)
    bias = torch.randn(V, dtype=torch.float64).to(dtype)
    return hidden, weight, bias


def _run_linear(fn, hidden, weight, bias, call, **kw):
    """Leaves of hidden, weight, bias; ``call(fn, h, w, b, **kw)`` -> (values..., scalar to backward)."""
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    *values, total = call(fn, h, w, b, **kw)
    total.backward()
    assert torch.equal(h, hidden) and torch.equal(w, weight) and torch.equal(b, bias), "an input was modified"
    return [v.detach() for v in values] + _grads(h, w, b)


def _check_linear(names, par, single, exact, lo, hi, floors=None):
    n_values = len(names)
    for name, p, s, e in zip(names, par[:n_values], single[:n_values], exact[:n_values]):
        _check(name, p, s, e, floor=(floors or {}).get(name))
    (ph, pw, pb), (sh, sw, sb), (eh, ew, eb) = par[n_values:], single[n_values:], exact[n_values:]
    _check("grad hidden", ph, sh, eh)
    _check("grad weight shard", pw, sw[lo:hi], ew[lo:hi])
    _check("grad bias shard", pb, sb[lo:hi], eb[lo:hi])


def case_linear_token_logprobs(backend, dtype, group, lo, hi):
    hidden, weight, bias = _head(dtype)
    labels = _labels()
    g_logp, g_ent = torch.randn(B, T), torch.randn(B, T)

    def call(fn, h, w, b, **kw):
        logp, ent = fn(h, w, labels, bias=b, temperature=TEMPERATURE, return_entropy=True, **kw)
        return logp, ent, (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(logp.dtype)).sum()

    exact = _run_linear(reference.linear_token_logprobs, hidden.double(), weight.double(), bias.double(), call)
    single = _run_linear(rlhf_fast.linear_token_logprobs, hidden, weight, bias, call, backend=backend, chunk_size=16)
    par = _run_linear(rlhf_fast.linear_token_logprobs, hidden, weight[lo:hi], bias[lo:hi], call, backend=backend,
                      chunk_size=16, vocab_group=group)  # fmt: skip
    _check_linear(("logp", "entropy"), par, single, exact, lo, hi)


def case_linear_sft_loss(backend, dtype, group, lo, hi):
    hidden, weight, bias = _head(dtype)
    labels = _labels()

    def call(fn, h, w, b, **kw):
        loss = fn(h, w, labels, bias=b, **kw)
        return loss, loss

    exact = _run_linear(reference.linear_sft_loss, hidden.double(), weight.double(), bias.double(), call)
    single = _run_linear(rlhf_fast.linear_sft_loss, hidden, weight, bias, call, backend=backend, chunk_size=16)
    par = _run_linear(rlhf_fast.linear_sft_loss, hidden, weight[lo:hi], bias[lo:hi], call, backend=backend,
                      chunk_size=16, vocab_group=group)  # fmt: skip
    _check_linear(("sft loss",), par, single, exact, lo, hi)


def case_fused_linear_policy_loss(backend, dtype, group, lo, hi):
    hidden, weight, bias = _head(dtype)
    labels = _labels().clamp(min=0)  # masked positions decide what is ignored
    logp_exact = reference.linear_token_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(),
                                                 temperature=TEMPERATURE, **HEAD)  # fmt: skip
    old_logp, adv, mask, ref_logp = _policy_inputs(logp_exact)

    def call(fn, h, w, b, **kw):
        loss, stats = fn(h, w, labels, old_logp, adv, mask, bias=b, ref_logp=ref_logp, **POLICY, **HEAD, **kw)
        return loss, stats["entropy"], loss

    exact = _run_linear(reference.fused_linear_policy_loss, hidden.double(), weight.double(), bias.double(), call)
    single = _run_linear(rlhf_fast.fused_linear_policy_loss, hidden, weight, bias, call, backend=backend, chunk_size=16)
    par = _run_linear(rlhf_fast.fused_linear_policy_loss, hidden, weight[lo:hi], bias[lo:hi], call, backend=backend,
                      chunk_size=16, vocab_group=group)  # fmt: skip
    scale = _loss_scale(logp_exact, old_logp, adv, mask, ref_logp, exact[1])
    _check_linear(("policy loss", "stats entropy"), par, single, exact, lo, hi, floors={"policy loss": scale})


CASES = (case_token_logprobs, case_int32_labels_custom_ignore_float64, case_sft_loss, case_fused_policy_loss, case_linear_token_logprobs, case_linear_sft_loss,
         case_fused_linear_policy_loss)  # fmt: skip
SLOW_BACKENDS = {"triton": (case_token_logprobs,)}  # interpreted on CPU: its forward kernel on one case


# ---- bad input ---------------------------------------------------------------------------------


def _raises(fn, pattern: str):
    with pytest.raises(ValueError, match=pattern):
        fn()


def bad_inputs(group, rank, lo, hi):
    logits, labels = torch.randn(B, T, hi - lo), _labels()
    weight, hidden = torch.randn(hi - lo, H), torch.randn(B, T, H)
    # A label beyond the whole vocabulary (one within it but beyond this shard is fine).
    _raises(lambda: rlhf_fast.token_logprobs(logits, labels.masked_fill(labels == 0, V), vocab_group=group),
            rf"labels must be in \[0, {V}\)")  # fmt: skip
    _raises(lambda: rlhf_fast.linear_token_logprobs(hidden, weight, labels.masked_fill(labels == 0, -1),
                                                    vocab_group=group), rf"labels must be in \[0, {V}\)")  # fmt: skip
    # Shards that disagree: rank 1 has one token row fewer; rank 1 has an empty vocabulary shard.
    rows = B * T - rank
    _raises(lambda: rlhf_fast.token_logprobs(logits.reshape(-1, hi - lo)[:rows], labels.reshape(-1)[:rows],
                                             vocab_group=group),
            rf"shards disagree: .*rank 0: \(102, {B * T}\), rank 1: \(101, {B * T - 1}\)")
    narrow = logits[..., : (hi - lo) * (1 - rank)]
    _raises(lambda: rlhf_fast.token_logprobs(narrow, labels, vocab_group=group), rf"rank 1: \(0, {B * T}\)")
    _raises(lambda: rlhf_fast.linear_token_logprobs(hidden[..., : H - rank], weight[:, : H - rank], labels,
                                                    vocab_group=group), rf"rank 0: \(102, {B * T}, {H}\)")  # fmt: skip
    # A group of one process.
    singles = [dist.new_group([r]) for r in range(WORLD)]
    _raises(lambda: rlhf_fast.sft_loss(logits, labels, vocab_group=singles[rank]), "vocab_group has 1 process")


def modules(group, rank, lo, hi):
    """The nn modules hold vocab_group and hand it to the op."""
    logits, labels = torch.randn(B, T, V)[..., lo:hi], _labels()
    hidden, weight, _ = _head(torch.float32)
    held = rlhf_fast.nn.TokenLogProbs(return_entropy=True, vocab_group=group)(logits, labels)
    given = rlhf_fast.token_logprobs(logits, labels, return_entropy=True, vocab_group=group)
    assert all(torch.equal(a, b) for a, b in zip(held, given)), "TokenLogProbs(vocab_group=)"
    held = rlhf_fast.nn.LinearSFTLoss(vocab_group=group)(hidden, weight[lo:hi], labels)
    assert torch.equal(held, rlhf_fast.linear_sft_loss(hidden, weight[lo:hi], labels, vocab_group=group)), "LinearSFTLoss"


def _backends():
    return [b for b in BACKENDS if can_serve(b, torch.device("cpu"), torch.bfloat16)]


def _worker(rank: int, port: int, seed: int, backends: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    failures = []
    try:
        lo, hi = _bounds(rank)
        for backend in backends:
            for dtype in DTYPES:
                for case in SLOW_BACKENDS.get(backend, CASES):
                    torch.manual_seed(seed)  # the same full inputs on every rank
                    try:
                        case(backend, dtype, dist.group.WORLD, lo, hi)
                    except AssertionError as exc:
                        failures.append(f"{case.__name__} {backend} {dtype}: {exc}")
        for check in (bad_inputs, modules):
            torch.manual_seed(seed)
            try:
                check(dist.group.WORLD, rank, lo, hi)
            except (AssertionError, pytest.fail.Exception):
                failures.append(f"{check.__name__}: {traceback.format_exc()}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    assert not failures, f"rank {rank} (seed {seed}):\n" + "\n".join(failures)


def test_vocab_parallel_ops_equal_the_whole_vocabulary_on_two_gloo_processes():
    backends = _backends()
    assert "torch" in backends
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    mp.spawn(_worker, args=(_free_port(), seed, backends), nprocs=WORLD, join=True)


def test_vocab_group_without_torch_distributed_raises():
    assert not dist.is_initialized()
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="vocab_group was given .* torch.distributed is not initialised"):
        rlhf_fast.token_logprobs(logits, labels, vocab_group=object())
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        rlhf_fast.linear_sft_loss(torch.randn(2, 3, 4), torch.randn(5, 4), labels, vocab_group=object())
