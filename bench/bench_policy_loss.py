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
  backend=<b>    rlhf_fast.fused_policy_loss(..., backend=b); on triton, for the separable objectives,
                 the one-kernel path (kernels/policy_epilogue.py: the logits read once from HBM, the
                 gradient written once)
  backend=triton,three-step
                 the same call with the one-kernel path turned off: the forward kernel, [B, T]
                 autograd, the backward kernel (what backend=triton ran before it), for comparison
  backend=cuda,l2-rows
                 backend=cuda's one kernel launched in its other shape (RLHF_FAST_CUDA_EPILOGUE=l2:
                 one 1024-thread block per multiprocessor, so that a row's second read may hit L2)
  token_logprobs/backend=<b>
                 rlhf_fast.token_logprobs(..., return_entropy=True, backend=b) alone, its backward
                 fed the loss's per-token gradient: the same logits gradient without the loss math.
                 backend=<b> over this row is what the loss math costs (issue 3: at most 1.1x).
  <variant>/eager, <variant>/backend=<b>
                 the same two for every other objective of rlhf_fast.objectives (gspo, cispo, ...:
                 the registry's, objective=<name> with the loss above's clip, KL and agg), and for
                 PPO with rollout importance correction ("rollout_is=token": rollout_logp =
                 old_logp + noise of 0.3, truncated at 2.0). Forward + backward only. "x eager" is
                 the variant's own eager row; loss_math_ratio is over token_logprobs/backend=<b>,
                 with issue 15's target beside it (target_ratio: 1.1 for an objective separable per
                 token, 1.3 for one coupled across the sequence; meets_target on a GPU). The quick
                 CPU run samples them (the registry's first separable and first non-separable
                 objective, and rollout_is); a GPU's quick run and --shapes tiny run them all.

Verification: the float64 oracle runs the reference in row chunks (logp and entropy, then the
loss and its per-token gradient by autograd), and the logits gradient on a sample of rows (as
bench_logprobs.py). Bytes the op must move: those of token_logprobs with entropy (N V e forward,
3 N V e forward + backward, e the logits' element size), plus 6 [B, T] tensors (negligible).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from unittest import mock

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.objectives import OBJECTIVES

from . import bench_logprobs as bl
from . import harness
from .case import Case, Check, Impl, backend_impls, compile_impl, timed, tolerance

POLICY = dict(objective="ppo", clip_eps=0.2, kl_coef=0.04, kl_estimator="k3", agg="token-mean")
ENTROPY_COEF = 0.0
SEQ_LEN = 1024  # T of the [B, T] layout when N allows it
# Clip-Cov cuts the gradient of a random draw among its candidate tokens, from the device's
# generator: the op's draw and the oracle's differ. With cov_ratio 1 every candidate is cut, so
# the row is checked against the oracle; the work (covariance, candidates, permutation) is the same.
OBJECTIVE_OPTIONS = {"clip_cov": dict(cov_ratio=1.0)}
ROLLOUT = dict(rollout_is="token", rollout_is_mode="truncate", rollout_is_threshold=2.0)
TARGET = {True: 1.1, False: 1.3}  # issue 15: fwd+bwd over token_logprobs', separable objective or not


@dataclass(frozen=True)
class Variant:
    """Options of one row family: the base loss (name "", rows without a prefix) or another objective."""

    name: str
    options: dict = field(hash=False)
    separable: bool = True


BASE = Variant("", POLICY, OBJECTIVES[POLICY["objective"]].separable)


def variants() -> list[Variant]:
    """Every registered objective but the base's, then the base with rollout importance correction."""
    out = [
        Variant(name, dict(POLICY, objective=name, **OBJECTIVE_OPTIONS.get(name, {})), objective.separable)
        for name, objective in OBJECTIVES.items()
        if name != POLICY["objective"]
    ]
    return out + [Variant(f"rollout_is={ROLLOUT['rollout_is']}", dict(POLICY, **ROLLOUT), BASE.separable)]


def quick_cpu_variants() -> set[str]:
    """The CPU quick run's sample: the registry's first separable and first non-separable objective, and rollout_is."""
    all_ = variants()
    chosen = {v.name for v in all_ if v.options.get("rollout_is")}
    for separable in (True, False):
        chosen.update([v.name for v in all_ if v.separable is separable and not v.options.get("rollout_is")][:1])
    return chosen


@dataclass
class Inputs:
    logits: list[torch.Tensor]  # copies of [B, T, V] with identical values, leaves requiring grad
    labels: torch.Tensor  # [B, T] int64 in [0, V)
    old_logp: torch.Tensor  # [B, T] float32
    ref_logp: torch.Tensor  # [B, T] float32
    advantages: torch.Tensor  # [B] float32
    mask: torch.Tensor  # [B, T] bool
    rollout_logp: torch.Tensor  # [B, T] float32, the rollout engine's (rollout_is rows)
    g_logp: torch.Tensor | None = None  # [B, T] float32 d loss / d logp of the base loss (set by the oracle)

    @property
    def masked_labels(self) -> torch.Tensor:
        return torch.where(self.mask, self.labels, reference.IGNORE_INDEX)


@dataclass
class Expected:
    loss: torch.Tensor  # [] float64
    rows: torch.Tensor  # [R] rows whose logits gradient is checked
    grad: torch.Tensor  # [R, V] float64
    torch_grad_err: float  # PyTorch's own error on that gradient in the logits' dtype
    g_logp: torch.Tensor  # [B, T] float32 d loss / d logp


@dataclass
class Oracle:
    """The float64 log-probs and entropies, and each variant's Expected, computed when first asked for."""

    logits: torch.Tensor  # [N, V] the first copy, detached
    labels: torch.Tensor  # [N] masked labels
    logp: torch.Tensor  # [N] float64, 0 at masked tokens
    entropy: torch.Tensor  # [N] float64
    rows: torch.Tensor  # [R]
    by_variant: dict = field(default_factory=dict)  # name -> Expected
    eager_checks: dict = field(default_factory=dict)  # name -> the variant's eager Check (its tolerances)


def _rollout(options, rollout_logp):
    return rollout_logp if options.get("rollout_is") else None


def _eager(options):
    def loss(logits, labels, old_logp, advantages, mask, ref_logp, rollout_logp):
        return reference.fused_policy_loss(
            logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=_rollout(options, rollout_logp),
            entropy_coef=ENTROPY_COEF, **options,
        )[0]  # fmt: skip

    return loss


def _trl(logits, labels, old_logp, advantages, mask, ref_logp, rollout_logp):
    logp = reference.selective_log_softmax(logits, labels)
    return reference.policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, **POLICY)[0]


def _ours(options, name):
    def loss(logits, labels, old_logp, advantages, mask, ref_logp, rollout_logp):
        return rlhf_fast.fused_policy_loss(
            logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=_rollout(options, rollout_logp),
            entropy_coef=ENTROPY_COEF, backend=name, **options,
        )[0]  # fmt: skip

    return loss


def _three_step(name):
    """fused_policy_loss with its one-kernel path turned off (the decision is made in the forward)."""
    module = importlib.import_module("rlhf_fast.ops.fused_policy_loss")  # the package re-exports the function
    ours = _ours(POLICY, name)

    def loss(*args):
        with mock.patch.object(module, "_loss_gradient_fits_the_kernel", lambda *a: False):
            return ours(*args)

    return loss


def _l2_rows(name):
    """fused_policy_loss on the CUDA one-kernel path in its L2-resident launch shape (csrc/cuda/policy_epilogue.cu)."""
    ours = _ours(POLICY, name)

    def loss(*args):  # set and unset around the timed call, without patch.dict's copies of the environment
        os.environ["RLHF_FAST_CUDA_EPILOGUE"] = "l2"
        try:
            return ours(*args)
        finally:
            del os.environ["RLHF_FAST_CUDA_EPILOGUE"]

    return loss


def _logprobs_only(name):
    def logp_entropy(logits, labels, old_logp, advantages, mask, ref_logp, rollout_logp):
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
        return self.fn(logits, x.labels, x.old_logp, x.advantages, x.mask, x.ref_logp, x.rollout_logp)

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
        return b * t * (self.dims["V"] * self.dtype.itemsize + 8 + 4 + 4 + 4 + 1) + 4 * b

    def implementations(self):
        ours = backend_impls("token_logprobs", self.device, self.dtype, lambda name: _ours(POLICY, name))
        for impl in backend_impls("policy_epilogue", self.device, self.dtype, _three_step):
            if impl.make is not None:  # only the backends with the one-kernel path: triton
                impl.name, impl.modes = f"{impl.name},three-step", ("fwd+bwd",)
                ours.append(impl)
        for impl in backend_impls("policy_epilogue", self.device, self.dtype, _l2_rows):
            if impl.make is not None and impl.name == "backend=cuda":
                impl.name, impl.modes = "backend=cuda,l2-rows", ("fwd+bwd",)
                ours.append(impl)
        alone = []
        for impl in backend_impls("token_logprobs", self.device, self.dtype, _logprobs_only):
            impl.name = f"token_logprobs/{impl.name}"
            alone.append(impl)
        eager = _eager(POLICY)
        baselines = [Impl("eager", make=lambda: eager), compile_impl(eager), Impl("trl", make=lambda: _trl, slow=True)]
        sampled = quick_cpu_variants()
        per_variant = []
        for v in variants():
            quick = None if v.name in sampled else ("cuda",)
            rows = [Impl("eager", make=lambda v=v: _eager(v.options))]
            rows += backend_impls("token_logprobs", self.device, self.dtype, lambda name, v=v: _ours(v.options, name))
            for impl in rows:
                impl.name, impl.modes, impl.quick_devices = f"{v.name}/{impl.name}", ("fwd+bwd",), quick
            per_variant += rows
        return baselines + ours + alone + per_variant

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
        # The rollout engine's log-probs: w = pi_old / pi_rollout of spread 0.3 in log, ~1% above 2.
        rollout_logp = old_logp + 0.3 * torch.randn(b, t, generator=gen, device=dev)
        copies_ = [logits] + [logits.clone() for _ in range(copies - 1)]
        return Inputs([c.requires_grad_() for c in copies_], labels, old_logp, ref_logp, advantages, mask, rollout_logp)

    def oracle(self, x: Inputs) -> Oracle:
        (b, t), vocab = self.bt, self.dims["V"]
        logits = x.logits[0].detach().view(b * t, vocab)
        labels = x.masked_labels.view(-1)
        chunk = max(1, bl.CHUNK_ELEMENTS // vocab)
        with torch.no_grad():
            parts = [
                reference.token_logprobs(logits[s : s + chunk].double(), labels[s : s + chunk], return_entropy=True)
                for s in range(0, b * t, chunk)
            ]
        oracle = Oracle(logits, labels, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                        bl.verification_rows(b * t, logits.device))  # fmt: skip
        x.g_logp = self.expected(x, oracle, BASE).g_logp  # the token_logprobs rows' upstream gradient
        return oracle

    def expected(self, x: Inputs, oracle: Oracle, variant: Variant) -> Expected:
        """The variant's loss and logits gradient (on the oracle's rows) in float64, and PyTorch's error on it."""
        if variant.name in oracle.by_variant:
            return oracle.by_variant[variant.name]
        (b, t), o = self.bt, variant.options
        logp, entropy = oracle.logp.clone().requires_grad_(), oracle.entropy.clone().requires_grad_()
        rollout = _rollout(o, x.rollout_logp)
        loss = reference.policy_loss(
            logp.view(b, t), x.old_logp.double(), x.advantages.double(), x.mask, ref_logp=x.ref_logp.double(),
            rollout_logp=None if rollout is None else rollout.double(), **o,
        )[0] - ENTROPY_COEF * reference.aggregate(entropy.view(b, t), x.mask, o["agg"])  # fmt: skip
        g_logp, g_entropy = torch.autograd.grad(loss, (logp, entropy), allow_unused=True, materialize_grads=True)
        rows, labels = oracle.rows, oracle.labels

        def rows_grad(values):
            leaf = values.clone().requires_grad_()
            lp, ent = reference.token_logprobs(leaf, labels[rows], return_entropy=True)
            ((lp * g_logp[rows].to(lp.dtype)).sum() + (ent * g_entropy[rows].to(ent.dtype)).sum()).backward()
            return leaf.grad

        exact = rows_grad(oracle.logits[rows].double())
        torch_err = harness.rel_err(rows_grad(oracle.logits[rows]), exact)
        result = Expected(loss.detach(), rows, exact, torch_err, g_logp.float().view(b, t))
        oracle.by_variant[variant.name] = result
        return result

    def variant_of(self, impl_name: str) -> tuple[Variant, str]:
        """(variant, the row's name within it): "gspo/backend=cuda" -> (gspo, "backend=cuda"); base rows -> (BASE, name)."""
        prefix, _, rest = impl_name.partition("/")
        chosen = next((v for v in variants() if v.name == prefix), None) if rest else None
        return (BASE, impl_name) if chosen is None else (chosen, rest)

    def _eager_check(self, x: Inputs, oracle: Oracle, variant: Variant) -> Check:
        """The variant's eager error on the loss, which sets its rows' tolerance (checked once, even when not timed)."""
        if variant.name not in oracle.eager_checks:
            impl = Impl(f"{variant.name}/eager", make=lambda: _eager(variant.options))
            oracle.eager_checks[variant.name] = self.check(impl, impl.make(), x, oracle, None, False)
        return oracle.eager_checks[variant.name]

    def check(self, impl, fn, x: Inputs, oracle: Oracle, eager, with_grad):
        variant, within = self.variant_of(impl.name)
        expected = self.expected(x, oracle, variant)
        if variant is not BASE:
            eager = None if within == "eager" else self._eager_check(x, oracle, variant)
        result = Check()
        step = Step(fn, x, "fwd")
        out = step(0)
        if isinstance(out, tuple):
            for name, value, exp in (("logp", out[0], oracle.logp), ("entropy", out[1], oracle.entropy)):
                result.add(name, harness.rel_err(value.reshape(-1), exp), tolerance(name, value, None), "fwd")
        else:
            result.add("loss", harness.rel_err(out, expected.loss), tolerance("loss", out, eager), "fwd")
        del out
        if variant is not BASE and within == "eager":
            oracle.eager_checks[variant.name] = result
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
        """Per row: its objective and whether it is separable. loss_math_ratio: backend=b's time
        (<variant>/backend=b's) over token_logprobs/backend=b's, per mode (issue 3: <= 1.1), with
        issue 15's target for fwd+bwd (target_ratio; meets_target on a GPU, where the target is set).
        A variant's ratio_vs_eager and mem_vs_eager are against its own eager row."""
        alone = {(r["impl"].removeprefix("token_logprobs/"), r["mode"]): r for r in rows
                 if r["impl"].startswith("token_logprobs/") and timed(r)}  # fmt: skip
        timed_by = {(r["impl"], r["mode"]): r for r in rows if timed(r)}
        for r in rows:
            if r["impl"].startswith("token_logprobs/"):
                continue
            variant, within = self.variant_of(r["impl"])
            r["objective"], r["separable"] = variant.options["objective"], variant.separable
            if variant is not BASE:
                r["variant"] = variant.name
                eager = timed_by.get((f"{variant.name}/eager", r["mode"]))
                if timed(r):
                    r["ratio_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
                    r["ratio_vs_compile"] = None  # torch.compile runs the base loss only
                    if eager and eager.get("peak_mb") and r.get("peak_mb") is not None:
                        r["mem_vs_eager"] = r["peak_mb"] / eager["peak_mb"]
                    else:
                        r.pop("mem_vs_eager", None)
            other = alone.get((within.split(",")[0], r["mode"]))
            if other is not None and timed(r):
                r["loss_math_ratio"] = r["median_ms"] / other["median_ms"]
            if r.get("ours") and r["mode"] == "fwd+bwd":
                r["target_ratio"] = TARGET[variant.separable]
                if self.device.type == "cuda" and r.get("loss_math_ratio") is not None:
                    r["meets_target"] = r["loss_math_ratio"] <= r["target_ratio"]

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
