"""Benchmark of pairwise_reward_loss, the Bradley-Terry loss of reward-model training.

    python -m rlhf_fast.bench --ops pairwise [--quick] [--shapes ...]

loss = mean(-log sigmoid(c - r - margin)) + 0.01 * mean((c + r)^2), a [B] margin (Llama 2's) and
the centring term on; forward, and forward + backward w.r.t. chosen and rejected.
  eager      rlhf_fast.reference.pairwise_reward_loss
  compile    torch.compile of it
  rlhf_fast  rlhf_fast.pairwise_reward_loss (validated, float32 math; no kernel of its own)
At a reward model's batch (B = 512 pairs) the op is a few microseconds of launches; B = 2^20 in
the full run shows its bandwidth. Bytes it must move: chosen, rejected, margin (12 B per pair)
forward; the two gradients (8 B per pair) more backward.
"""

from __future__ import annotations



import torch

import rlhf_fast
from rlhf_fast import reference

from .case import Impl, TensorCase, compile_impl

CENTER_COEF = 0.01


class PairwiseCase(TensorCase):
    op = "pairwise"
    leaves = ("chosen", "rejected")
    outputs = ("loss",)

    def tensors(self, gen):
        b, dev = self.dims["B"], self.device
        chosen = torch.randn(b, generator=gen, device=dev)
        return {
            "chosen": chosen + 0.5,
            "rejected": torch.randn(b, generator=gen, device=dev),
            "margin": torch.rand(b, generator=gen, device=dev),
        }

    def call(self, fn, x):
        return (fn(x.chosen, x.rejected, margin=x.margin, center_coef=CENTER_COEF)[0],)

    def implementations(self):
        return [
            Impl("eager", make=lambda: reference.pairwise_reward_loss),
            compile_impl(reference.pairwise_reward_loss),
            Impl("rlhf_fast", make=lambda: rlhf_fast.pairwise_reward_loss, ours=True),
        ]

    def work(self, mode):
        return (12 if mode == "fwd" else 20) * self.dims["B"], 0.0


SHAPES = {
    "pairwise": {
        "tiny": [({"B": 64}, ("headline",))],
        ("cpu", True): [({"B": 512}, ("headline",))],
        ("cpu", False): [({"B": 512}, ("headline",)), ({"B": 2**20}, ())],
        ("cuda", True): [({"B": 512}, ("headline",))],
        ("cuda", False): [({"B": 512}, ("headline",)), ({"B": 2**20}, ())],
    }
}
CASES = {"pairwise": PairwiseCase}
DTYPES = {"cpu": torch.float32, "cuda": torch.float32}
