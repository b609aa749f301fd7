"""The linear-head ops: lm_head + loss without the [N, V] logits.

    python -m rlhf_fast.bench --ops linear_logprobs,linear_sft,linear_policy_loss [--chunk-size C ...]

Ops (hidden [N, H], lm_head weight [V, H]; forward, and forward + backward w.r.t. both):
  linear_logprobs     logp = linear_token_logprobs(hidden, weight, labels); backward of sum(g * logp)
  linear_sft          mean -logp (cross-entropy), every label valid
  linear_policy_loss  fused_linear_policy_loss: the loss of bench_policy_loss.py on a [B, T = 1024]
                      layout (T = N when N is not a multiple of 1024)
Implementations:
  eager          the reference on hidden @ weight.T: plain PyTorch, logits materialised
  compile        torch.compile of it
  backend=<b>    rlhf_fast.linear_token_logprobs / linear_sft_loss / fused_linear_policy_loss with
                 the token kernels of backend b
  fused-logits   rlhf_fast.token_logprobs / sft_loss / fused_policy_loss on hidden @ weight.T
  auto-bf16acc   the linear ops with accum_dtype=None (bf16/fp16 inputs): the weight gradient summed
                 in its own dtype, as Liger's default, instead of float32 (half that sum's memory)
  auto-c<C>      the linear ops with chunk_size=C (the driver's --chunk-size, repeatable): the
                 memory / time trade of the chunk
  liger          Liger-Kernel (CUDA): liger_fused_linear_cross_entropy (sft; its default bf16 sum of the
                 weight gradient over chunks), LigerFusedLinearGRPOLoss (policy, loss_type "dapo" =
                 token-mean, torch.compile'd chunks as by default); it has no per-token log-prob form
  liger-fp32acc  liger_fused_linear_cross_entropy with accum_dtype=float32, as our weight gradient
  cce, cce-compile  Cut Cross-Entropy's linear_cross_entropy (impl "cce", CUDA; impl
                 "torch_compile", any device): logp = -loss with reduction="none", sft = the mean
  <variant>/eager, <variant>/backend=<b>
                 linear_policy_loss only, forward + backward: "softcap=30", the head's logits
                 soft-capped as Gemma 2's (LinearOptions.logit_softcap = 30); and the registry's
                 first objective coupled across the sequence (gspo: the two-sweep path). "x eager" is
                 the variant's own eager row.
"x liger" is Liger's time over this one (same op and mode). The oracle is the reference in
float64 (CPU) / float32 (CUDA), two passes over row chunks so that it fits. The work is the three
matmuls of forward + backward, 6 N H V FLOPs (2 N H V forward), set against the measured rate of
hidden @ weight.T at the same shape and dtype (the "6NHV floor"). For the policy loss N counts the
tokens of the mask only (right padding leaves about 2/3 of the batch): the rest have no loss and
no gradient, and our op skips them; eager and Liger compute all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import rlhf_fast
from rlhf_fast import reference
from rlhf_fast.objectives import OBJECTIVES

from . import harness
from .bench_policy_loss import POLICY
from .case import Case, Check, Impl, backend_impls, cce_problem, liger_problem, timed, tolerance

SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16"}

SEQ_LEN = 1024
CHUNK_ROWS = 2048  # rows per oracle chunk
KINDS = {"linear_logprobs": "logprobs", "linear_sft": "sft", "linear_policy_loss": "policy"}


@dataclass(frozen=True)
class Variant:
    """Options of one row family of linear_policy_loss: the base (name "", rows without a prefix) or another."""

    name: str
    policy: dict = field(hash=False)  # PolicyLossOptions fields
    linear: dict = field(hash=False, default_factory=dict)  # the head's logit transform (logit_scale, logit_softcap)


BASE = Variant("", POLICY)


def variants(kind: str) -> list[Variant]:
    """linear_policy_loss: a soft-capped head (Gemma 2's 30), and the first non-separable objective."""
    if kind != "policy":
        return []
    coupled = next(name for name, objective in OBJECTIVES.items() if not objective.separable)
    return [Variant("softcap=30", POLICY, dict(logit_softcap=30.0)), Variant(coupled, dict(POLICY, objective=coupled))]


@dataclass
class Inputs:
    hidden: list[torch.Tensor]  # copies of [N, H], leaves requiring grad
    weight: list[torch.Tensor]  # copies of [V, H], leaves requiring grad
    labels: torch.Tensor  # [N] int64 in [0, V)
    g: torch.Tensor  # [N] float32 upstream gradient of logp (linear_logprobs)
    mask: torch.Tensor  # [B, T] bool, right padding
    old_logp: torch.Tensor  # [B, T] float32
    ref_logp: torch.Tensor  # [B, T] float32
    advantages: torch.Tensor  # [B] float32

    @property
    def bt(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def clear(self) -> None:
        for t in self.hidden + self.weight:
            t.grad = None


def _eager(kind, variant: Variant = BASE):
    if kind == "logprobs":
        return lambda h, w, x: reference.linear_token_logprobs(h, w, x.labels)
    if kind == "sft":
        return lambda h, w, x: reference.linear_sft_loss(h, w, x.labels)
    return lambda h, w, x: reference.fused_linear_policy_loss(
        h.view(*x.bt, -1), w, x.labels.view(x.bt), x.old_logp, x.advantages, x.mask, ref_logp=x.ref_logp,
        **variant.linear, **variant.policy,
    )[0]  # fmt: skip


def _compiled(kind):
    # Compile a function of tensors only (the inputs object would be guarded field by field).
    if kind == "logprobs":
        graph = torch.compile(lambda h, w, labels: reference.linear_token_logprobs(h, w, labels), dynamic=False)
        return lambda h, w, x: graph(h, w, x.labels)
    if kind == "sft":
        graph = torch.compile(lambda h, w, labels: reference.linear_sft_loss(h, w, labels), dynamic=False)
        return lambda h, w, x: graph(h, w, x.labels)

    def policy(h, w, labels, old_logp, advantages, mask, ref_logp):
        return reference.fused_linear_policy_loss(h, w, labels, old_logp, advantages, mask, ref_logp=ref_logp, **POLICY)[0]

    graph = torch.compile(policy, dynamic=False)
    return lambda h, w, x: graph(h.view(*x.bt, -1), w, x.labels.view(x.bt), x.old_logp, x.advantages, x.mask, x.ref_logp)


def _ours(kind, backend, accum_dtype=torch.float32, chunk_size=None, variant: Variant = BASE):
    opts = dict(backend=backend, accum_dtype=accum_dtype, chunk_size=chunk_size)
    if kind == "logprobs":
        return lambda h, w, x: rlhf_fast.linear_token_logprobs(h, w, x.labels, **opts)
    if kind == "sft":
        return lambda h, w, x: rlhf_fast.linear_sft_loss(h, w, x.labels, **opts)
    return lambda h, w, x: rlhf_fast.fused_linear_policy_loss(
        h.view(*x.bt, -1), w, x.labels.view(x.bt), x.old_logp, x.advantages, x.mask, ref_logp=x.ref_logp,
        **opts, **variant.linear, **variant.policy,
    )[0]  # fmt: skip


def _fused_logits(kind):
    if kind == "logprobs":
        return lambda h, w, x: rlhf_fast.token_logprobs(h @ w.T, x.labels)
    if kind == "sft":
        return lambda h, w, x: rlhf_fast.sft_loss(h @ w.T, x.labels)
    return lambda h, w, x: rlhf_fast.fused_policy_loss(
        (h @ w.T).view(*x.bt, -1), x.labels.view(x.bt), x.old_logp, x.advantages, x.mask, ref_logp=x.ref_logp, **POLICY
    )[0]


def _liger(kind, accum_dtype=None):
    if kind == "sft":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, x: liger_fused_linear_cross_entropy(h, w, x.labels, accum_dtype=accum_dtype)
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    grpo = LigerFusedLinearGRPOLoss(
        beta=POLICY["kl_coef"], epsilon_low=POLICY["clip_eps"], epsilon_high=POLICY["clip_eps"],
        loss_type="dapo", use_ref_model=True,  # compiled=True: Liger's default, what its users get
    )  # fmt: skip

    def policy(h, w, x):
        out = grpo(h.view(*x.bt, -1), w, x.labels.view(x.bt), x.mask.float(), x.advantages,
                   ref_per_token_logps=x.ref_logp, old_per_token_logps=x.old_logp)  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return policy


def _cce(kind, impl):
    from cut_cross_entropy import linear_cross_entropy

    if kind == "logprobs":
        return lambda h, w, x: -linear_cross_entropy(h, w, x.labels, reduction="none", impl=impl)
    return lambda h, w, x: linear_cross_entropy(h, w, x.labels, reduction="mean", impl=impl)


class Step:
    """One call on copy i: the forward under no_grad, or forward + backward (of sum(g * logp) for logprobs)."""

    def __init__(self, fn, x: Inputs, mode: str):
        self.fn, self.x, self.mode = fn, x, mode

    def __call__(self, i: int):
        k = i % len(self.x.hidden)
        h, w = self.x.hidden[k], self.x.weight[k]
        if self.mode == "fwd":
            with torch.no_grad():
                return self.fn(h, w, self.x)
        h.grad = w.grad = None
        out = self.fn(h, w, self.x)
        out.backward(self.x.g.to(out.dtype) if out.dim() else None)
        return None

    def clear(self) -> None:
        self.x.clear()


class LinearCase(Case):
    op = "linear_logprobs"
    ratio_to = ("eager", "compile", "liger")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = KINDS[self.op]
        self._tflops: float | None = None
        self.rows_needed = self.dims["N"]  # the policy loss: the mask's tokens (make_inputs)

    @property
    def nhv(self) -> tuple[int, int, int]:
        return self.dims["N"], self.dims["H"], self.dims["V"]

    def input_bytes(self):
        n, h, v = self.nhv
        return (n * h + v * h) * self.dtype.itemsize + n * 12

    def implementations(self):
        kind, dev = self.kind, self.device
        impls = [Impl("eager", make=lambda: _eager(kind)), Impl("compile", make=lambda: _compiled(kind), slow=True)]
        impls += backend_impls("token_logprobs", dev, self.dtype, lambda name: _ours(kind, name))
        impls.append(Impl("fused-logits", make=lambda: _fused_logits(kind), ours=True))
        if self.dtype.itemsize == 2:  # like for like with Liger's default: the weight gradient summed in bf16
            short = SHORT_DTYPE[self.dtype]
            impls.append(Impl(f"auto-{short}acc", make=lambda: _ours(kind, "auto", accum_dtype=None), ours=True))
        for c in self.chunk_sizes:
            impls.append(Impl(f"auto-c{c}", make=lambda c=c: _ours(kind, "auto", chunk_size=c), ours=True))
        reason = liger_problem(dev) or ("Liger-Kernel has no per-token log-prob form of the fused linear head"
                                        if kind == "logprobs" else None)  # fmt: skip
        impls.append(Impl("liger", skip=reason) if reason else Impl("liger", make=lambda: _liger(kind)))
        if kind == "sft":  # like for like with our float32 weight-gradient sum
            fp32 = "liger-fp32acc"
            impls.append(Impl(fp32, skip=reason) if reason else Impl(fp32, make=lambda: _liger(kind, torch.float32)))
        for name, impl in (("cce", "cce"), ("cce-compile", "torch_compile")):
            reason = cce_problem(dev, impl) or ("Cut Cross-Entropy has no policy loss" if kind == "policy" else None)
            impls.append(Impl(name, skip=reason) if reason else Impl(name, make=lambda impl=impl: _cce(kind, impl)))
        for v in variants(kind):
            rows = [Impl("eager", make=lambda v=v: _eager(kind, v))]
            rows += backend_impls("token_logprobs", dev, self.dtype, lambda name, v=v: _ours(kind, name, variant=v))
            for impl in rows:
                impl.name, impl.modes = f"{v.name}/{impl.name}", ("fwd+bwd",)
            impls += rows
        return impls

    def variant_of(self, impl_name: str) -> tuple[Variant, str]:
        """(variant, the row's name within it): "softcap=30/backend=cuda" -> (softcap=30, "backend=cuda")."""
        prefix, _, rest = impl_name.partition("/")
        chosen = next((v for v in variants(self.kind) if v.name == prefix), None) if rest else None
        return (BASE, impl_name) if chosen is None else (chosen, rest)

    def make_inputs(self, copies):
        n, h, v = self.nhv
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(n, h, generator=gen, device=dev).to(self.dtype)
        # Logits of spread ~2.5, as a trained LM's.
        weight = torch.randn(v, h, generator=gen, device=dev).mul_(2.5 / h**0.5).to(self.dtype)
        labels = torch.randint(0, v, (n,), generator=gen, device=dev)
        g = torch.randn(n, generator=gen, device=dev)
        t = SEQ_LEN if n % SEQ_LEN == 0 else n
        b = n // t
        lengths = torch.randint(max(1, t // 4), t + 1, (b, 1), generator=gen, device=dev)
        mask = torch.arange(t, device=dev) < lengths
        if self.kind == "policy":
            self.rows_needed = int(mask.sum())
        with torch.no_grad():
            logp = rlhf_fast.linear_token_logprobs(hidden, weight, labels).view(b, t)
        old_logp = logp + 0.2 * torch.randn(b, t, generator=gen, device=dev)
        ref_logp = logp + 0.2 * torch.randn(b, t, generator=gen, device=dev)
        advantages = torch.randn(b, generator=gen, device=dev)
        hs = [hidden] + [hidden.clone() for _ in range(copies - 1)]
        ws = [weight] + [weight.clone() for _ in range(copies - 1)]
        return Inputs([t.requires_grad_() for t in hs], [t.requires_grad_() for t in ws], labels, g, mask, old_logp,
                      ref_logp, advantages)  # fmt: skip

    def _per_token_loss(self, x: Inputs, logp: torch.Tensor, variant: Variant) -> torch.Tensor:
        if self.kind == "logprobs":
            return (logp * x.g.to(logp.dtype)).sum()
        if self.kind == "sft":
            return -logp.mean()
        cast = lambda t: t.to(logp.dtype)  # noqa: E731
        return reference.policy_loss(
            logp.view(x.bt), cast(x.old_logp), cast(x.advantages), x.mask, ref_logp=cast(x.ref_logp), **variant.policy
        )[0]

    def oracle(self, x: Inputs) -> dict:
        """Variant name -> (forward value, grad hidden, grad weight), each computed when first asked for (``expected``)."""
        return {}

    def expected(self, x: Inputs, oracle: dict, variant: Variant):
        """(forward value, grad hidden, grad weight) of ``variant``: float64 on CPU, float32 on CUDA, in row chunks."""
        if variant.name in oracle:
            return oracle[variant.name]
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        h, w = x.hidden[0].detach().to(dtype), x.weight[0].detach().to(dtype)
        labels = x.labels if self.kind != "policy" else torch.where(x.mask.view(-1), x.labels, reference.IGNORE_INDEX)
        chunks = [(s, min(s + CHUNK_ROWS, h.shape[0])) for s in range(0, h.shape[0], CHUNK_ROWS)]
        logits = lambda rows, w: reference.linear_logits(rows, w, **variant.linear)  # noqa: E731
        with torch.no_grad():
            logp = torch.cat([reference.token_logprobs(logits(h[s:e], w), labels[s:e]) for s, e in chunks])
        logp.requires_grad_()
        loss = self._per_token_loss(x, logp, variant)
        (g_logp,) = torch.autograd.grad(loss, logp)
        grad_h, w = torch.empty_like(h), w.requires_grad_()
        for s, e in chunks:
            hc = h[s:e].clone().requires_grad_()
            (reference.token_logprobs(logits(hc, w), labels[s:e]) * g_logp[s:e]).sum().backward()
            grad_h[s:e] = hc.grad
        value = logp.detach() if self.kind == "logprobs" else loss.detach()
        oracle[variant.name] = (value, grad_h, w.grad)
        return oracle[variant.name]

    def check(self, impl, fn, x: Inputs, oracle, eager, with_grad):
        variant, within = self.variant_of(impl.name)
        value, grad_h, grad_w = self.expected(x, oracle, variant)
        if variant is not BASE and within != "eager":  # the variant's eager error sets its tolerances
            key = f"{variant.name}/eager-check"
            if key not in oracle:
                oracle[key] = self.check(Impl(f"{variant.name}/eager"), _eager(self.kind, variant), x, oracle, None, True)
            eager = oracle[key]
        result = Check()
        name = "logp" if self.kind == "logprobs" else "loss"
        # Eager itself is held to its logits' dtype (it rounds them to it); everyone else to 2x eager.
        rounded_to = self.dtype if within == "eager" else None
        with torch.no_grad():
            out = fn(x.hidden[0], x.weight[0], x)
        result.add(name, harness.rel_err(out, value), tolerance(name, out, eager, rounded_to), "fwd")
        if with_grad:
            step = Step(fn, x, "fwd+bwd")
            step(0)
            for key, got, exp in (("grad_hidden", x.hidden[0].grad, grad_h), ("grad_weight", x.weight[0].grad, grad_w)):
                result.add(key, harness.rel_err(got, exp), tolerance(key, got, eager, rounded_to), "bwd")
            step.clear()
        if variant is not BASE and within == "eager" and with_grad:
            oracle[f"{variant.name}/eager-check"] = result
        return result

    def step(self, fn, inputs, mode):
        return Step(fn, inputs, mode)

    def annotate(self, rows):
        """A variant's rows: its name, and ratio_vs_eager / mem_vs_eager against its own eager row."""
        timed_by = {(r["impl"], r["mode"]): r for r in rows if timed(r)}
        for r in rows:
            variant, _ = self.variant_of(r["impl"])
            if variant is BASE:
                continue
            r["variant"] = variant.name
            if not timed(r):
                continue
            eager = timed_by.get((f"{variant.name}/eager", r["mode"]))
            for key in [k for k in r if k.startswith("ratio_vs_")]:
                r[key] = None  # the other baselines run the base loss
            r["ratio_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
            r.pop("mem_vs_eager", None)
            if eager and eager.get("peak_mb") and r.get("peak_mb") is not None:
                r["mem_vs_eager"] = r["peak_mb"] / eager["peak_mb"]

    def work(self, mode):
        _, h, v = self.nhv
        n, e = self.rows_needed, self.dtype.itemsize
        if mode == "fwd":
            return (n * h + v * h) * e, 2.0 * n * h * v
        return 3 * (n * h + v * h) * e, 6.0 * n * h * v

    def flop_ceiling_tflops(self):
        """Rate of hidden @ weight.T at this shape and dtype: what the three matmuls can reach."""
        if self._tflops is None:
            n, h, v = self.nhv
            gen = torch.Generator(device=self.device).manual_seed(1)
            a = torch.randn(n, h, generator=gen, device=self.device).to(self.dtype)
            b = torch.randn(v, h, generator=gen, device=self.device).to(self.dtype)
            out = torch.empty(n, v, dtype=self.dtype, device=self.device)
            timing = harness.time_step(
                lambda i: torch.mm(a, b.t(), out=out), self.device, warmup=2, min_reps=5, budget_s=0.3
            )
            self._tflops = 2.0 * n * h * v / (timing.median_ms * 1e-3) / 1e12
            del a, b, out
        return self._tflops


class LinearSFTCase(LinearCase):
    op = "linear_sft"


class LinearPolicyCase(LinearCase):
    op = "linear_policy_loss"


def _nhv(n, h, v, *tags):
    return ({"N": n, "H": h, "V": v}, tags)


VOCABS = (32000, 128256, 151936)
_TABLE = {
    "tiny": [_nhv(32, 64, 1000, "headline")],
    ("cpu", True): [_nhv(256, 512, 32000, "headline")],
    ("cpu", False): [_nhv(1024, 1024, 32000, "headline")] + [_nhv(256, 512, v, "sweep-vocab") for v in VOCABS],
    ("cuda", True): [_nhv(16384, 4096, 128256, "headline", "sweep-tokens")],
    ("cuda", False): [_nhv(16384, 4096, 128256, "headline", "sweep-tokens")]
    + [_nhv(4096, 4096, v, "sweep-vocab") for v in VOCABS]
    + [_nhv(n, 4096, 128256, "sweep-tokens") for n in (1024, 4096)],
}
SHAPES = {op: _TABLE for op in KINDS}
CASES = {"linear_logprobs": LinearCase, "linear_sft": LinearSFTCase, "linear_policy_loss": LinearPolicyCase}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
