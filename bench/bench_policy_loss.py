"""Benchmark of fused_policy_loss: the GRPO / PPO loss straight from [B, T, V] logits.

    python -m rlhf_fast.bench --ops policy_loss [--quick] [--shapes ...]

The loss: clip 0.2, a k3 KL to ref_logp with coefficient 0.04 (GRPO's KL loss), token-mean over a
right-padded mask (rows 1/4 to fully valid), per-sequence advantages [B], no entropy bonus (the
entropy is still computed, as a stat). old_logp and ref_logp are the current log-probs plus noise
of 0.2, so that some ratios clip. Forward, and forward + backward w.r.t. the logits.

Implementations:
  eager          rlhf_fast.reference.fused_policy_loss: log_softmax, gather, entropy and the loss
                 ops composed in eager PyTorch (the spec)
  compile        torch.compile of that composition
  trl            TRL's formulation: selective_log_softmax, then the policy loss (no entropy)
  backend=<b>    rlhf_fast.fused_policy_loss(..., backend=b)
  token_logprobs/backend=<b>
                 rlhf_fast.token_logprobs(..., return_entropy=True, backend=b) alone, its backward
                 fed the loss's per-token gradient: the same logits gradient without the loss math.
                 backend=<b> over this row is what the loss math costs (issue 3: at most 1.1x).

Verification: the float64 oracle runs the reference in row chunks (logp and entropy, then the
loss and its per-token gradient by autograd), and the logits gradient on a sample of rows (as
bench_logprobs.py). Bytes the op must move: those of token_logprobs with entropy (N V e forward,
3 N V e forward + backward, e the logits' element size), plus 6 [B, T] tensors (negligible).
"""

from __future__ import annotations

from dataclasses import dataclass


import torch

import rlhf_fast
from rlhf_fast import reference

from . import bench_logprobs as bl
from . import harness
from .case import Case, Check, Impl, backend_impls, compile_impl, timed, tolerance

POLICY = dict(clip_eps=0.2, kl_coef=0.04, kl_estimator="k3", agg="token-mean")
ENTROPY_COEF = 0.0
SEQ_LEN = 1024  # T of the [B, T] layout when N allows it


@dataclass
class Inputs:
    logits: list[torch.Tensor]  # copies of [B, T, V] with identical values, leaves requiring grad
    labels: torch.Tensor  # [B, T] int64 in [0, V)
    old_logp: torch.Tensor  # [B, T] float32
    ref_logp: torch.Tensor  # [B, T] float32
    advantages: torch.Tensor  # [B] float32
    mask: torch.Tensor  # [B, T] bool
    g_logp: torch.Tensor | None = None  # [B, T] float32 d loss / d logp (set by the oracle)

    @property
    def masked_labels(self) -> torch.Tensor:
        return torch.where(self.mask, self.labels, reference.IGNORE_INDEX)


@dataclass
class Expected:
    loss: torch.Tensor  # [] float64
    logp: torch.Tensor  # [N] float64, 0 at masked tokens
    entropy: torch.Tensor  # [N] float64
    rows: torch.Tensor  # [R] rows whose logits gradient is checked
    grad: torch.Tensor  # [R, V] float64
    torch_grad_err: float  # PyTorch's own error on that gradient in the logits' dtype


def _eager(logits, labels, old_logp, advantages, mask, ref_logp):
    return reference.fused_policy_loss(
        logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, entropy_coef=ENTROPY_COEF, **POLICY
    )[0]


def _trl(logits, labels, old_logp, advantages, mask, ref_logp):
    logp = reference.selective_log_softmax(logits, labels)
    return reference.policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, **POLICY)[0]


def _ours(name):
    def loss(logits, labels, old_logp, advantages, mask, ref_logp):
        return rlhf_fast.fused_policy_loss(
            logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, entropy_coef=ENTROPY_COEF,
            backend=name, **POLICY,
        )[0]  # fmt: skip

    return loss


def _logprobs_only(name):
    def logp_entropy(logits, labels, old_logp, advantages, mask, ref_logp):
        labels = torch.where(mask, labels, reference.IGNORE_INDEX)
        return rlhf_fast.token_logprobs(logits, labels, return_entropy=True, backend=name)

    return logp_entropy


class Step:
    """One call on copy i. Policy impls return a loss (backward from 1); token_logprobs impls return
    (logp, entropy) and back-propagate the loss's per-token gradient through logp alone."""

    def __init__(self, fn, inputs: Inputs, mode: str):
        self.fn, self.x, self.mode = fn, inputs, mode

    def _call(self, logits):
        x = self.x
        return self.fn(logits, x.labels, x.old_logp, x.advantages, x.mask, x.ref_logp)

    def __call__(self, i: int):
        logits = self.x.logits[i % len(self.x.logits)]
        if self.mode == "fwd":
            with torch.no_grad():
                return self._call(logits)
        logits.grad = None
        out = self._call(logits)
        if isinstance(out, tuple):
            torch.autograd.backward([out[0]], [self.x.g_logp.view_as(out[0]).to(out[0].dtype)])
        else:
            out.backward()
        return None

    def clear(self) -> None:
        for logits in self.x.logits:
            logits.grad = None


class PolicyLossCase(Case):
    op = "policy_loss"
    compile_in_quick = ("cpu",)

    @property
    def bt(self) -> tuple[int, int]:
        return self.dims["B"], self.dims["T"]

    def input_bytes(self):
        b, t = self.bt
        return b * t * (self.dims["V"] * self.dtype.itemsize + 8 + 4 + 4 + 1) + 4 * b

    def implementations(self):
        ours = backend_impls("token_logprobs", self.device, self.dtype, _ours)
        alone = []
        for impl in backend_impls("token_logprobs", self.device, self.dtype, _logprobs_only):
            impl.name = f"token_logprobs/{impl.name}"
            alone.append(impl)
        baselines = [Impl("eager", make=lambda: _eager), compile_impl(_eager), Impl("trl", make=lambda: _trl, slow=True)]
        return baselines + ours + alone

    def make_inputs(self, copies):
        (b, t), vocab, dev = self.bt, self.dims["V"], self.device
        gen = torch.Generator(device=dev).manual_seed(0)
        logits = torch.randn(b, t, vocab, generator=gen, dtype=self.dtype, device=dev).mul_(2.0)
        labels = torch.randint(0, vocab, (b, t), generator=gen, device=dev)
        lengths = torch.randint(max(1, t // 4), t + 1, (b, 1), generator=gen, device=dev)
        mask = torch.arange(t, device=dev) < lengths
        with torch.no_grad():
            logp = rlhf_fast.token_logprobs(logits, labels)
        old_logp = logp + 0.2 * torch.randn(b, t, generator=gen, device=dev)
        ref_logp = logp + 0.2 * torch.randn(b, t, generator=gen, device=dev)
        advantages = torch.randn(b, generator=gen, device=dev)
        copies_ = [logits] + [logits.clone() for _ in range(copies - 1)]
        return Inputs([c.requires_grad_() for c in copies_], labels, old_logp, ref_logp, advantages, mask)

    def oracle(self, x: Inputs) -> Expected:
        (b, t), vocab = self.bt, self.dims["V"]
        logits = x.logits[0].detach().view(b * t, vocab)
        labels = x.masked_labels.view(-1)
        chunk = max(1, bl.CHUNK_ELEMENTS // vocab)
        with torch.no_grad():
            parts = [
                reference.token_logprobs(logits[s : s + chunk].double(), labels[s : s + chunk], return_entropy=True)
                for s in range(0, b * t, chunk)
            ]
        logp = torch.cat([p[0] for p in parts]).requires_grad_()
        entropy = torch.cat([p[1] for p in parts]).requires_grad_()
        loss = reference.policy_loss(
            logp.view(b, t), x.old_logp.double(), x.advantages.double(), x.mask, ref_logp=x.ref_logp.double(), **POLICY
        )[0] - ENTROPY_COEF * reference.aggregate(entropy.view(b, t), x.mask, POLICY["agg"])
        g_logp, g_entropy = torch.autograd.grad(loss, (logp, entropy), allow_unused=True, materialize_grads=True)
        x.g_logp = g_logp.float().view(b, t)
        rows = bl.verification_rows(b * t, logits.device)

        def rows_grad(values):
            leaf = values.clone().requires_grad_()
            lp, ent = reference.token_logprobs(leaf, labels[rows], return_entropy=True)
            ((lp * g_logp[rows].to(lp.dtype)).sum() + (ent * g_entropy[rows].to(ent.dtype)).sum()).backward()
            return leaf.grad

        exact = rows_grad(logits[rows].double())
        torch_err = harness.rel_err(rows_grad(logits[rows]), exact)
        return Expected(loss.detach(), logp.detach(), entropy.detach(), rows, exact, torch_err)

    def check(self, impl, fn, x: Inputs, expected: Expected, eager, with_grad):
        result = Check()
        step = Step(fn, x, "fwd")
        out = step(0)
        if isinstance(out, tuple):
            for name, value, exp in (("logp", out[0], expected.logp), ("entropy", out[1], expected.entropy)):
                result.add(name, harness.rel_err(value.reshape(-1), exp), tolerance(name, value, None), "fwd")
        else:
            result.add("loss", harness.rel_err(out, expected.loss), tolerance("loss", out, eager), "fwd")
        del out
        if with_grad:
            step = Step(fn, x, "fwd+bwd")
            step(0)
            grad = x.logits[0].grad.view(-1, self.dims["V"])[expected.rows]
            step.clear()
            tol = max(tolerance("grad", grad, None), 2 * expected.torch_grad_err + 1e-6)
            result.add("grad", harness.rel_err(grad, expected.grad), tol, "bwd")
        return result

    def step(self, fn, inputs, mode):
        return Step(fn, inputs, mode)

    def annotate(self, rows):
        """loss_math_ratio: backend=b's time over token_logprobs/backend=b's, per mode (issue 3: <= 1.1)."""
        alone = {(r["impl"].removeprefix("token_logprobs/"), r["mode"]): r for r in rows
                 if r["impl"].startswith("token_logprobs/") and timed(r)}  # fmt: skip
        for r in rows:
            other = alone.get((r["impl"], r["mode"]))
            if other is not None and timed(r):
                r["loss_math_ratio"] = r["median_ms"] / other["median_ms"]

    def work(self, mode):
        (b, t), vocab = self.bt, self.dims["V"]
        logits = b * t * vocab * self.dtype.itemsize
        small = b * t * (8 + 4 + 4 + 1)  # labels, old_logp, ref_logp, mask
        return (logits + small if mode == "fwd" else 3 * logits + small + 4 * b * t), 0.0


def _btv(b, t, v, *tags):
    return ({"B": b, "T": t, "V": v}, tags)


VOCABS = (32000, 128256, 151936)
SHAPES = {
    "policy_loss": {
        "tiny": [_btv(2, 16, 1000, "headline")],
        ("cpu", True): [_btv(1, 512, 32000, "headline")],
        ("cpu", False): [_btv(4, 1024, 32000, "headline")] + [_btv(1, 1024, v, "sweep-vocab") for v in VOCABS],
        ("cuda", True): [_btv(16, 1024, 128256, "headline")],
        ("cuda", False): [_btv(16, 1024, 128256, "headline")] + [_btv(4, 1024, v, "sweep-vocab") for v in VOCABS],
    }
}
CASES = {"policy_loss": PolicyLossCase}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
