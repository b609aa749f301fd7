"""Benchmark of the advantage ops on [B, T] rollouts: gae, the fused ppo_advantages pipeline, group_advantages.

    python -m rlhf_fast.bench --ops gae,ppo_advantages,group_advantages [--quick] [--shapes ...]

gae (forward, and forward + backward w.r.t. rewards and values), B = 64, T = 4096:
  eager         rlhf_fast.reference.gae: the readable loop over T, the usual way to write it
  eager-scan    reference.gae_scan: the same recurrence as a vectorised affine scan (log2 T steps)
  eager-blocked gae_blocked below: matrix products over blocks of 64 tokens, the fastest plain
                PyTorch formulation we know
  compile       torch.compile of gae_scan (the loop would unroll T steps into one graph)
  backend=<b>   rlhf_fast.gae(..., backend=b) for every backend that serves gae here; the others
                are rows saying why (registry.can_serve(name, device, float32, op="gae"))
"x eager" is the speedup over the Python loop, "x eager-scan" over the vectorised version.

ppo_advantages (forward): KL-penalised rewards (k1, beta 0.05) -> GAE -> whitening; eager is the
composition of the reference functions (loop GAE), eager-scan the same with gae_scan.

group_advantages (GRPO normalisation of [B] scores in groups of G): eager is the reference.

Bytes an op must move: gae reads rewards, values (4 B each) and the mask (1 B) and writes
advantages and returns (8 B): 17 B per token forward; its backward reads two gradients and the
mask and writes two: 17 B more. ppo_advantages reads logp, ref_logp, values and the mask and
writes rewards, advantages and returns: 25 B per token. group_advantages: 8 B per score forward,
12 B more backward.
"""

from __future__ import annotations



import torch

import rlhf_fast
from rlhf_fast import reference

from .case import Impl, TensorCase, backend_impls, compile_impl

GAMMA, LAM = 1.0, 0.95
BETA, ESTIMATOR = 0.05, "k1"
GROUP_MODE = "grpo"


def right_padded_mask(b: int, t: int, gen: torch.Generator, device) -> torch.Tensor:
    """[B, T] bool: each row valid on a prefix of length uniform in [T/4, T] (response lengths vary)."""
    lengths = torch.randint(max(1, t // 4), t + 1, (b, 1), generator=gen, device=device)
    return torch.arange(t, device=device) < lengths


class GAECase(TensorCase):
    op = "gae"
    leaves = ("rewards", "values")
    outputs = ("advantages", "returns")
    ratio_to = ("eager", "eager-scan", "eager-blocked")

    def tensors(self, gen):
        b, t = self.dims["B"], self.dims["T"]
        dev = self.device
        return {
            "rewards": torch.randn(b, t, generator=gen, device=dev).mul_(0.1),
            "values": torch.randn(b, t, generator=gen, device=dev),
            "mask": right_padded_mask(b, t, gen, dev),
        }

    def call(self, fn, x):
        return tuple(fn(x.rewards, x.values, x.mask, gamma=GAMMA, lam=LAM))

    def implementations(self):
        return [
            Impl("eager", make=lambda: reference.gae),
            Impl("eager-scan", make=lambda: reference.gae_scan),
            Impl("eager-blocked", make=lambda: gae_blocked),
            compile_impl(reference.gae_scan),
        ] + backend_impls("gae", self.device, torch.float32, lambda name: _with_backend(rlhf_fast.gae, name))

    def work(self, mode):
        n = self.dims["B"] * self.dims["T"]
        return (17 if mode == "fwd" else 34) * n, 0.0


class PPOAdvantagesCase(TensorCase):
    op = "ppo_advantages"
    modes = ("fwd",)  # rollout-side: the op has no autograd
    leaves = ()
    outputs = ("advantages", "returns", "rewards")
    ratio_to = ("eager", "eager-scan", "eager-blocked")

    def tensors(self, gen):
        b, t = self.dims["B"], self.dims["T"]
        dev = self.device
        logp = -torch.rand(b, t, generator=gen, device=dev).mul_(3.0)
        return {
            "logp": logp,
            "ref_logp": logp + 0.1 * torch.randn(b, t, generator=gen, device=dev),
            "scores": torch.randn(b, generator=gen, device=dev),
            "values": torch.randn(b, t, generator=gen, device=dev),
            "mask": right_padded_mask(b, t, gen, dev),
        }

    def call(self, fn, x):
        return tuple(fn(x.logp, x.ref_logp, x.scores, x.values, x.mask))

    def implementations(self):
        return [
            Impl("eager", make=lambda: _ppo_reference(reference.gae)),
            Impl("eager-scan", make=lambda: _ppo_reference(reference.gae_scan)),
            Impl("eager-blocked", make=lambda: _ppo_reference(gae_blocked)),
            compile_impl(_ppo_reference(reference.gae_scan)),
        ] + backend_impls("ppo_advantages", self.device, torch.float32, _ppo_ours)

    def work(self, mode):
        return 25 * self.dims["B"] * self.dims["T"], 0.0


class GroupAdvantagesCase(TensorCase):
    op = "group_advantages"
    leaves = ("scores",)
    outputs = ("advantages",)

    def tensors(self, gen):
        return {"scores": torch.randn(self.dims["B"], generator=gen, device=self.device)}

    def call(self, fn, x):
        return (fn(x.scores, self.dims["G"], mode=GROUP_MODE),)

    def implementations(self):
        return [
            Impl("eager", make=lambda: reference.group_advantages),
            compile_impl(reference.group_advantages),
        ] + backend_impls(
            "group_advantages", self.device, torch.float32, lambda name: _with_backend(rlhf_fast.group_advantages, name)
        )

    def work(self, mode):
        return (8 if mode == "fwd" else 20) * self.dims["B"], 0.0


def gae_blocked(rewards, values, mask, *, gamma=1.0, lam=0.95, block=64):
    """GAE as matrix products: the strongest plain-PyTorch formulation we know, the baseline our
    kernels must beat beside the loop and the scan. A_i = sum over j >= i of (gamma lam)^(j - i) delta_j
    once each row's valid tokens are packed to its front (a no-op for right-padded masks), so
    within a block of ``block`` tokens A is delta times one fixed triangular [block, block]
    matrix, and each block adds (gamma lam)^(distance) times the next block's first advantage,
    itself a triangular product over the blocks."""
    mask = mask.bool()
    b, t = mask.shape
    packed = not bool((mask[:, 1:] & ~mask[:, :-1]).any())  # right-padded: valid tokens already in front
    order = None if packed else torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    r = torch.where(mask, rewards, 0.0)
    v = torch.where(mask, values, 0.0)
    if order is not None:
        r, v = r.gather(1, order), v.gather(1, order)
    n_blocks = -(-t // block)
    pad = n_blocks * block - t
    r, v = torch.nn.functional.pad(r, (0, pad)), torch.nn.functional.pad(v, (0, pad))
    delta = r + gamma * torch.nn.functional.pad(v[:, 1:], (0, 1)) - v
    k = torch.arange(block, device=mask.device, dtype=r.dtype)
    within = torch.where(k[None, :] >= k[:, None], (gamma * lam) ** (k[None, :] - k[:, None]), 0.0)
    local = (delta.view(b, n_blocks, block) @ within.T).view(b, n_blocks, block)
    n = torch.arange(n_blocks, device=mask.device, dtype=r.dtype)
    across = torch.where(n[None, :] >= n[:, None], (gamma * lam) ** (block * (n[None, :] - n[:, None])), 0.0)
    firsts = local[..., 0] @ across.T  # A at the first token of each block
    following = torch.nn.functional.pad(firsts[:, 1:], (0, 1))
    advantages = (local + (gamma * lam) ** (block - k) * following[..., None]).reshape(b, -1)[:, :t]
    if order is not None:
        advantages = torch.empty_like(advantages).scatter_(1, order, advantages)
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, torch.where(mask, advantages + torch.where(mask, values, 0.0), 0.0)


def _with_backend(op, name):
    def fn(*args, **kwargs):
        return op(*args, backend=name, **kwargs)

    return fn


def _ppo_reference(gae_fn):
    """rewards -> GAE -> whitening, composed from the reference functions (what a trainer writes)."""

    def ppo_advantages(logp, ref_logp, scores, values, mask):
        rewards = reference.kl_penalized_rewards(logp, ref_logp, scores, mask, beta=BETA, estimator=ESTIMATOR)
        advantages, returns = gae_fn(rewards, values, mask, gamma=GAMMA, lam=LAM)
        return reference.whiten(advantages, mask), returns, rewards

    return ppo_advantages


def _ppo_ours(name):
    def ppo_advantages(logp, ref_logp, scores, values, mask):
        out = rlhf_fast.ppo_advantages(
            logp, ref_logp, scores, values, mask, beta=BETA, estimator=ESTIMATOR, gamma=GAMMA, lam=LAM,
            whiten=True, backend=name,
        )  # fmt: skip
        return out.advantages, out.returns, out.rewards

    return ppo_advantages


# (device, quick) -> [(dims, tags)]; "tiny" is the CI test's table. B = 64, T = 4096 is issue 3's case.
HEADLINE = ({"B": 64, "T": 4096}, ("headline", "sweep-tokens"))
TOKEN_SWEEP = [({"B": 64, "T": t}, ("sweep-tokens",)) for t in (256, 1024, 16384)]
SHAPES = {
    "gae": {
        "tiny": [({"B": 4, "T": 64}, ("headline", "sweep-tokens")), ({"B": 4, "T": 16}, ("sweep-tokens",))],
        ("cpu", True): [HEADLINE],
        ("cpu", False): [HEADLINE] + TOKEN_SWEEP[:2],
        ("cuda", True): [HEADLINE],
        ("cuda", False): [HEADLINE] + TOKEN_SWEEP,
    },
    "ppo_advantages": {
        "tiny": [({"B": 4, "T": 64}, ("headline",))],
        ("cpu", True): [({"B": 64, "T": 4096}, ("headline",))],
        ("cpu", False): [({"B": 64, "T": 4096}, ("headline",))],
        ("cuda", True): [({"B": 64, "T": 4096}, ("headline",))],
        ("cuda", False): [({"B": 64, "T": 4096}, ("headline",))],
    },
    "group_advantages": {
        "tiny": [({"B": 64, "G": 8}, ("headline",))],
        ("cpu", True): [({"B": 1024, "G": 16}, ("headline",))],
        ("cpu", False): [({"B": 1024, "G": 16}, ("headline",)), ({"B": 2**20, "G": 16}, ())],
        ("cuda", True): [({"B": 1024, "G": 16}, ("headline",))],
        ("cuda", False): [({"B": 1024, "G": 16}, ("headline",)), ({"B": 2**20, "G": 16}, ())],
    },
}
CASES = {"gae": GAECase, "ppo_advantages": PPOAdvantagesCase, "group_advantages": GroupAdvantagesCase}
DTYPES = {"cpu": torch.float32, "cuda": torch.float32}  # the ops compute in float32
