"""The chunk engine of the linear-head ops: logits for a few token rows at a time, never [N, V].

Every op of the ``linear_*`` family is ``token_logprobs(hidden @ weight.T + bias, labels)`` followed
by something per token. ``sweep`` walks the N token rows in chunks of C rows; for each chunk it
1. computes logits = hidden[chunk] @ weight.T (+ bias) into one reused [C, V] buffer (torch's
   matmul: cuBLAS on CUDA, oneDNN/MKL on CPU; float32 accumulation inside the GEMM),
2. runs the token_logprobs provider kernels on that buffer (``registry.resolve``): forward writes
   logp, entropy and lse of the chunk's rows; backward writes d loss / d logits over the logits
   in place (G), given the upstream gradients of logp and entropy of those rows,
3. pushes G through the linear layer at once:
       grad_hidden[chunk] = G @ weight           (K = V, accumulated inside one GEMM)
       grad_weight       += G.T @ hidden[chunk]  (float32 sum by default, ``WeightGradAccumulator``)
       grad_bias         += G.sum(0)             (float32)
Peak extra memory: the [C, V] buffer, the [V, H] weight-gradient sum and grad_hidden [N, H];
nothing of size N x V.

Rows whose label is ignored (ignore_index, or masked out of the policy loss) have logp, entropy
and gradient 0 whatever their logits, so the ops hand ``sweep`` the index of the kept rows
(``kept_rows``) and it gathers C of those per chunk: prompt tokens and padding cost no FLOPs.

Heads whose logits are transformed (``LinearOptions``: logit_scale s, logit_softcap c) cost no
extra matmul and no [N, V] tensor either (``SoftCap``, ``LinearSpec.kernel_temperature``):
- a scale alone is folded into the kernels' temperature, T / s (no pass over the logits);
- a soft cap y = c tanh(s z / c) is applied to the chunk's logits in place before the kernels,
  and in the backward its derivative s (1 - tanh^2(s z / c)) multiplies the kernel's d loss / d y
  before the matmuls of step 3; step 2 then runs a slab of the chunk's rows at a time, so that
  the derivative of a slab waits in a small scratch while the kernels overwrite its logits.

Two autograd shapes use it (FLOPs counted as 2 N H V per matmul pass):
- ``linear_token_logprobs``: the upstream gradient of logp is unknown in the forward, so the
  forward saves lse (and entropy) and the backward sweeps again, recomputing each chunk's logits:
  forward 2 N H V, backward 6 N H V.
- ``linear_loss``: a scalar loss whose d loss / d logp_t is known as soon as logp_t is (the policy
  loss and the SFT loss: per-token functions summed with weights fixed by the mask). One sweep
  does steps 1-3, so the gradient is ready at the end of the forward (6 N H V, as Liger's fused
  linear cross-entropy); the backward only scales it by the upstream scalar.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends import registry

# Rows per chunk, C. The weight-gradient GEMM of a chunk has K = C and reads and writes the [V, H]
# accumulator (a bytes per element: 4 for the default float32 sum, 2 for ``accum_dtype=None`` on a
# bf16/fp16 weight) once: 2 C V H FLOPs for 2 a V H bytes, C / a FLOPs per byte. Below C ~ 256 a
# that traffic, not the tensor cores, bounds it (an H100 does ~300 bf16 FLOPs per byte of HBM
# bandwidth), and CPU GEMMs (oneDNN/MKL) also lose rate on thin operands. Above it, C only costs
# memory: the [C, V] buffer, C V e bytes (e = 2 in bf16). C = max(256 a, a H / 16): from H = 4096
# on that buffer is an eighth of the accumulator's a V H bytes (1024 rows at H = 4096 for a float32
# sum, 512 for a bf16 one: Liger's chunk at that shape).
ROWS_PER_ACCUM_BYTE = 256
CHUNK_ALIGN = 64  # chunk rows rounded up to this (tensor-core tiles, cache lines)
NARROW_TILE_ELEMENTS = 1 << 23  # float32 elements converted per step when the accumulator narrows
UPCAST_ROWS = 4096  # accumulator rows per GEMM where the operands must be upcast to its dtype
SOFTCAP_SLABS = 8  # a soft-capped chunk's rows are processed in this many slabs (``SoftCap``)

_MIXED_ADDMM = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"  # addmm(out_dtype=) on CUDA


def chunk_rows(n_rows: int, hidden_size: int, requested: int | None = None, accum_bytes: int = 4) -> int:
    """Rows per chunk: ``requested`` if given, else about max(256 a, a H / 16) rows (a =
    ``accum_bytes``, the weight-gradient sum's bytes per element) in balanced chunks.

    The chunk count is fixed first (N / target, rounded up) and the rows spread evenly over it, so
    the last chunk is not a sliver: N = 4100 with a target of 1024 gives 5 chunks of 832 rows
    (820 rounded up to a multiple of 64; the last one 772), not 4 x 1024 + 4.
    """
    if requested is not None:
        return max(1, min(int(requested), n_rows))
    target = accum_bytes * max(ROWS_PER_ACCUM_BYTE, hidden_size // 16)
    if n_rows <= target:
        return max(n_rows, 1)
    n_chunks = math.ceil(n_rows / target)
    rows = math.ceil(n_rows / n_chunks)
    return min(n_rows, math.ceil(rows / CHUNK_ALIGN) * CHUNK_ALIGN)


@dataclass(frozen=True)
class LinearSpec:
    """Static options of a sweep."""

    temperature: float
    ignore_index: int
    backend: str
    chunk_size: int | None  # rows per chunk; None: ``chunk_rows`` picks from the shape
    compute_dtype: torch.dtype  # of the logits and the matmuls: the inputs' own, or autocast's
    weight_grad_dtype: torch.dtype  # the weight gradient's sum over chunks (``weight_grad_sum_dtype``)
    logit_scale: float = 1.0  # the head's logits are logit_scale * (hidden @ weight.T + bias) ...
    logit_softcap: float | None = None  # ... then soft-capped at this (None: not), then over temperature

    @property
    def kernel_temperature(self) -> float:
        """The temperature the token_logprobs kernels get with the chunk's logits.

        Without a soft cap the scale s folds into it: the kernels compute softmax(x / T') of the
        logits x they are given, and with x = z (the head's output) and T' = T / s,
            x / T' = z s / T    exactly, for any s > 0,
        the scaled logits over the temperature. So logp, entropy and lse are those of
        softmax(s z / T), and the kernel's backward, d loss / d x at x = z and temperature T', is
        d loss(s z / T) / d z: the chain rule's factor s / T is its 1 / T'. With a cap the scale
        sits inside the tanh (``SoftCap``) and the kernels get T itself.
        """
        if self.logit_softcap is not None:
            return self.temperature
        return self.temperature / self.logit_scale


@dataclass
class RowStats:
    """Per-token results of the forward kernel, [N] each (float32; float64 for float64 inputs);
    ``log_mass``: a vocabulary shard's log share of the softmax (vocab_parallel.combine), else None."""

    logp: torch.Tensor | None
    entropy: torch.Tensor | None
    lse: torch.Tensor
    log_mass: torch.Tensor | None = None

    @staticmethod
    def empty(n_rows: int, with_entropy: bool, dtype: torch.dtype, device: torch.device) -> RowStats:
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        def new():
            return torch.empty(n_rows, dtype=out_dtype, device=device)

        return RowStats(new(), new() if with_entropy else None, new())


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with the sum kept in acc's dtype (float32 or float64) whatever a and b are."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _MIXED_ADDMM:
        # bf16/fp16 operands, float32 accumulation and output inside one cuBLAS call.
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        # No mixed-precision addmm here (CPU, or torch < 2.8): upcast the operands, a slab of acc's
        # rows at a time (the whole of a, G.T of one chunk, would be a float32 copy twice the size
        # of the chunk's logits; CPU bf16 linear_sft_loss at N, H, V = 4096, 512, 32000: peak 194 ->
        # 147 MiB, same time).
        b = b.to(acc.dtype)
        for r0 in range(0, a.shape[0], UPCAST_ROWS):
            acc[r0 : r0 + UPCAST_ROWS].addmm_(a[r0 : r0 + UPCAST_ROWS].to(acc.dtype), b)


class WeightGradAccumulator:
    """sum over chunks of G.T @ h [V, H] in ``sum_dtype``, returned in the weight's dtype.

    In the weight's own dtype (float32 weights, or ``accum_dtype=None``) the sum is the gradient.
    A float32 sum of a 2-byte weight's gradient would need a [V, H] float32 buffer *and* the final
    2-byte [V, H] copy: 6 V H bytes at the end. Here the float32 sum lives in two halves of V / 2
    rows, and the 2-byte result (2 V H bytes) is written into the first half's storage (which holds
    4 (V / 2) H bytes), tile by tile front to back: result row r takes bytes [2rH, 2(r+1)H), never
    ahead of the float32 rows still to read (from byte 4rH on). Then the second half is copied in
    and freed. Peak: the 4 V H bytes of the float32 sum, and the gradient owns exactly its storage.
    """

    def __init__(self, vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device, sum_dtype: torch.dtype):
        self.shape = (vocab, hidden_size)
        self.dtype = dtype
        bounds = (0, (vocab + 1) // 2, vocab) if sum_dtype != dtype else (0, vocab)
        self.parts = [
            (lo, hi, torch.zeros(hi - lo, hidden_size, dtype=sum_dtype, device=device))
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]

    def add(self, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        """Add G.T @ h for one chunk: G [C, V], h [C, H]."""
        for lo, hi, acc in self.parts:
            _add_product(acc, grad_logits[:, lo:hi].t(), h)

    def result(self) -> torch.Tensor:
        """The summed gradient [V, H] in the weight's dtype (call once)."""
        parts, self.parts = self.parts, None
        if len(parts) == 1:  # summed in the weight's dtype: the sum is the gradient
            return parts[0][2]
        vocab, hidden_size = self.shape
        (_, top, first), (_, _, second) = parts
        # A plain tensor on the first half's storage (not a view: the gradient has no float32 _base).
        out = first.new_empty(0, dtype=self.dtype).set_(first.untyped_storage(), 0, self.shape)
        step = max(1, NARROW_TILE_ELEMENTS // max(hidden_size, 1))
        for r0 in range(0, top, step):
            r1 = min(r0 + step, top)
            # The tile's own bytes overlap (rows r0..r1 in both dtypes), hence the temporary.
            out[r0:r1].copy_(first[r0:r1].to(self.dtype))
        out[top:].copy_(second)
        return out


def kept_rows(keep: torch.Tensor) -> torch.Tensor | None:
    """Index of the True rows of ``keep`` [N], or None when every row is kept (one host sync)."""
    index = keep.nonzero().squeeze(1)
    return None if index.numel() == keep.numel() else index


def gather_rows(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[N, ...] -> the kept rows [M, ...] (``values`` itself when every row is kept)."""
    return values if index is None else values.index_select(0, index)


def scatter_rows(values: torch.Tensor, index: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """[M] values of the kept rows -> [N] with 0 at the others."""
    return values if index is None else values.new_zeros(n_rows).index_copy_(0, index, values)


@dataclass
class LinearGrads:
    """Where a sweep writes the gradients of hidden, weight and bias (None: not wanted)."""

    hidden: torch.Tensor | None  # [N, H], hidden's dtype, written chunk by chunk
    weight: WeightGradAccumulator | None
    bias: torch.Tensor | None  # [V] float32 (float64) sum

    @staticmethod
    def allocate(hidden, weight, bias, spec: LinearSpec, need_hidden: bool, need_weight: bool, need_bias: bool, *,
                 every_row=True):  # fmt: skip
        """``every_row``: the sweep writes every row of grad_hidden; else the rows it skips are 0."""
        new_hidden = torch.empty_like if every_row else torch.zeros_like
        bias_sum_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return LinearGrads(
            new_hidden(hidden, memory_format=torch.contiguous_format) if need_hidden else None,
            WeightGradAccumulator(*weight.shape, weight.dtype, weight.device, spec.weight_grad_dtype)
            if need_weight
            else None,
            torch.zeros(len(weight), dtype=bias_sum_dtype, device=weight.device) if need_bias and bias is not None else None,
        )

    def add(self, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rows: slice | torch.Tensor) -> None:
        """One chunk's G [C, V] into the sums; ``rows``: the chunk's rows of hidden (slice or index)."""
        if self.hidden is not None:
            if isinstance(rows, torch.Tensor):
                self.hidden.index_copy_(0, rows, (grad_logits @ weight).to(self.hidden.dtype))
            elif self.hidden.dtype == grad_logits.dtype:
                torch.mm(grad_logits, weight, out=self.hidden[rows])
            else:  # autocast: float32 hidden states, bf16 head
                self.hidden[rows].copy_(grad_logits @ weight)
        if self.weight is not None:
            self.weight.add(grad_logits, h)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def results(self, bias: torch.Tensor | None):
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, None where not wanted."""
        grad_weight = self.weight.result() if self.weight is not None else None
        grad_bias = self.bias.to(bias.dtype) if self.bias is not None else None
        return self.hidden, grad_weight, grad_bias


Upstream = Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]


class SoftCap:
    """The soft cap of a chunk's logits: y = c tanh(s z / c), the scale s inside, in place.

    A slab of ceil(C / SOFTCAP_SLABS) rows at a time goes through one reused [rows, V] scratch in
    float32 (float64 for float64 logits): t = tanh(s z / c) is computed there from the exact z and
    y rounded once into the logits (eager bf16 rounds after each of / c, tanh and * c). With a
    gradient to come, the scratch then keeps the slab's d y / d z = s (1 - t^2), from that t, while
    the kernels turn y into d loss / d y in place; ``chain_`` multiplies it in. Deriving it from y
    instead (as torch's tanh backward does from its output) would cost bf16 logits 2^-8 of
    absolute error in 1 - t^2. Extra memory: the scratch, C V / SOFTCAP_SLABS x 4 bytes (a
    quarter of a bf16 chunk's logits at 8 slabs); a float32 forward without a gradient caps the
    logits in place and allocates nothing.

    Memory traffic per logit (bf16 logits, float32 scratch): the cap 28 bytes (upcast 2 + 4,
    scale 8, tanh 8, scale-and-round 4 + 2), its derivative 8, the chain rule 8 (2 + 4 + 2),
    against the kernels' 2 (forward) and 4 (backward). The cap inside the token_logprobs kernels
    (as Liger's cross-entropy kernel has it) would need none of it.
    """

    def __init__(self, cap: float, scale: float, chunk: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.cap, self.scale = cap, scale
        self.rows = max(1, math.ceil(chunk / SOFTCAP_SLABS))
        self.work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.shape, self.device = (min(self.rows, chunk), vocab), device
        self.buffer = None  # allocated on first use
        self.slope = torch.tensor(scale, dtype=self.work_dtype, device=device)  # 0-dim s for addcmul

    def slabs(self, n_rows: int):
        for r0 in range(0, n_rows, self.rows):
            yield slice(r0, min(r0 + self.rows, n_rows))

    def apply_(self, logits: torch.Tensor, with_grad: bool) -> torch.Tensor | None:
        """One slab's logits [rows, V] z -> y = c tanh(s z / c), in place; with ``with_grad``
        returns d y / d z [rows, V] (in the scratch, valid until the next call)."""
        if logits.dtype == self.work_dtype and not with_grad:
            work = logits
        else:
            if self.buffer is None:
                self.buffer = torch.empty(self.shape, dtype=self.work_dtype, device=self.device)
            work = self.buffer[: logits.shape[0]].copy_(logits)
        torch.tanh(work.mul_(self.scale / self.cap), out=work)  # t
        torch.mul(work, self.cap, out=logits)  # computed in the work dtype, rounded once into the logits
        if not with_grad:
            return None
        return torch.addcmul(self.slope, work, work, value=-self.scale, out=work)  # s - s t^2

    @staticmethod
    def chain_(grad_logits: torch.Tensor, slope: torch.Tensor) -> None:
        """d loss / d y -> d loss / d z = d loss / d y * d y / d z, in place, rounded once."""
        grad_logits.mul_(slope)


def sweep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spec: LinearSpec,
    rows: RowStats,
    *,
    forward: bool,
    upstream: Upstream | None = None,
    grads: LinearGrads | None = None,
    index: torch.Tensor | None = None,
    provider=None,
) -> None:
    """One pass over the token chunks (see the module docstring); the only loop of the linear ops.

    hidden [N, H], weight [V, H], bias [V] or None (validated upstream). ``index`` [M]: the rows
    of hidden to compute (``kept_rows``; None: all, M = N); labels [M] contiguous and ``rows`` are
    those rows', in that order. ``forward``: run the forward kernel and write ``rows``; otherwise
    ``rows`` holds lse (and entropy) from an earlier sweep. ``grads``: also run the backward kernel
    with the upstream gradients ``upstream(start, end)`` returns for rows start..end of the M
    (called after the forward of those rows, so it may read rows.logp[start:end]; once per chunk,
    or per slab of one under a soft cap) and accumulate the
    linear layer's gradients (rows of grad_hidden not in ``index`` are left as they are).
    ``provider``: the token_logprobs provider to call instead of the backend's own (the
    vocabulary-parallel ops pass ``vocab_parallel.ShardProvider``).
    """
    n_rows, vocab = labels.shape[0], weight.shape[0]
    if n_rows == 0:
        return
    # Autocast: the head in its dtype (one cast of the weight per sweep, as autocast's F.linear);
    # ``grads`` keeps the inputs' own dtypes.
    hidden, weight = hidden.to(spec.compute_dtype), weight.to(spec.compute_dtype)
    bias = bias.to(spec.compute_dtype) if bias is not None else None
    prov = provider if provider is not None else registry.resolve(spec.backend, hidden.device, hidden.dtype)
    step = chunk_rows(n_rows, hidden.shape[1], spec.chunk_size, spec.weight_grad_dtype.itemsize)
    buffer = torch.empty(min(step, n_rows), vocab, dtype=hidden.dtype, device=hidden.device)
    softcap = None
    if spec.logit_softcap is not None:
        softcap = SoftCap(spec.logit_softcap, spec.logit_scale, buffer.shape[0], vocab, hidden.dtype, hidden.device)
    temperature = spec.kernel_temperature
    weight_t = weight.t()
    with torch.autocast(hidden.device.type, enabled=False):  # the logits keep the inputs' dtype
        for start in range(0, n_rows, step):
            end = min(start + step, n_rows)
            chunk = slice(start, end) if index is None else index[start:end]
            h = hidden[chunk]  # a view, or the kept rows gathered
            logits = buffer[: end - start]
            if bias is None:
                torch.mm(h, weight_t, out=logits)
            else:
                torch.addmm(bias, h, weight_t, out=logits)
            # Step 2 on the whole chunk, or slab by slab under a soft cap (``SoftCap``).
            for part in softcap.slabs(end - start) if softcap is not None else (slice(0, end - start),):
                lo, hi = start + part.start, start + part.stop
                part_logits, part_labels = logits[part], labels[lo:hi]
                slope = softcap.apply_(part_logits, grads is not None) if softcap is not None else None
                entropy = rows.entropy[lo:hi] if rows.entropy is not None else None
                lse = rows.lse[lo:hi]
                if forward:
                    prov.token_logprobs_forward(
                        part_logits, part_labels, rows.logp[lo:hi], entropy, lse, temperature, spec.ignore_index
                    )
                if grads is None:
                    continue
                grad_logp, grad_entropy = upstream(lo, hi)
                shard = {} if rows.log_mass is None else {"log_mass": rows.log_mass[lo:hi]}
                prov.token_logprobs_backward(
                    part_logits, part_labels, lse, entropy if grad_entropy is not None else None,
                    grad_logp, grad_entropy, part_logits, temperature, spec.ignore_index, **shard,
                )  # fmt: skip
                if slope is not None:
                    SoftCap.chain_(part_logits, slope)
            if grads is not None:
                grads.add(logits, h, weight, chunk)


class TokenObjective:
    """A scalar loss of the per-token logp (and entropy) with a per-token gradient known in the forward.

    It sees the kept rows only (``kept_rows``: index [M] into the N rows, or None for all), in
    their order: ``token_grads(rows, start, end)`` returns d loss / d logp and d loss / d entropy
    (or None) of kept rows start..end, from those rows' values only; ``value(rows)`` the loss.
    """

    with_entropy: bool = False

    def token_grads(self, rows: RowStats, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def value(self, rows: RowStats) -> torch.Tensor:
        raise NotImplementedError


def _loss_sweep(hidden, weight, bias, labels, index, spec: LinearSpec, objective: TokenObjective, need):
    """One sweep: the rows' logp (and entropy) and, for the inputs in ``need``, the loss's gradients."""
    rows = RowStats.empty(labels.shape[0], objective.with_entropy, spec.compute_dtype, hidden.device)
    grads = LinearGrads.allocate(hidden, weight, bias, spec, *need, every_row=index is None) if any(need) else None
    upstream = (lambda start, end: objective.token_grads(rows, start, end)) if grads is not None else None
    sweep(hidden, weight, bias, labels, spec, rows, forward=True, upstream=upstream, grads=grads, index=index)
    return rows, grads.results(bias) if grads is not None else (None, None, None)


class _LinearLoss(torch.autograd.Function):
    """Loss value and, in the same sweep, its gradients w.r.t. hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, spec: LinearSpec, objective: TokenObjective, need_grads):
        need = ctx.needs_input_grad[:3] if need_grads else (False, False, False)
        rows, ctx.grads = _loss_sweep(hidden, weight, bias, labels, index, spec, objective, need)
        # The inputs are saved (no copy) so that autograd's version check catches an in-place
        # change between forward and backward, as eager's F.linear would, and so that a second
        # backward can recompute the gradients handed over by the first.
        ctx.save_for_backward(hidden, weight, bias)
        ctx.sweep_args = (labels, index, spec, objective, need)
        return objective.value(rows)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias = ctx.saved_tensors  # raises if one was modified in place since the forward
        grads = ctx.grads
        if grads is None:  # a later backward (retain_graph=True): the first one handed them over
            _, grads = _loss_sweep(hidden, weight, bias, *ctx.sweep_args)
        if bool(grad_loss == 1):
            # loss.backward(): hand the gradients over as they are and keep no reference, so that
            # .grad takes them without a copy (a [V, H] product would double the weight gradient's
            # memory at the peak) and nothing of ours aliases what the caller may change in place.
            ctx.grads = None
            return tuple(grads) + (None,) * 5
        ctx.grads = grads
        return tuple(None if g is None else g * grad_loss for g in grads) + (None,) * 5


def linear_loss(hidden, weight, bias, labels, index, spec: LinearSpec, objective: TokenObjective) -> torch.Tensor:
    """``objective`` of token_logprobs(hidden @ weight.T + bias, labels) over the kept rows ``index``
    (None: all), on validated 2-D inputs; labels [N]."""
    tensors = (hidden, weight) + ((bias,) if bias is not None else ())
    need_grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _LinearLoss.apply(hidden, weight, bias, gather_rows(labels, index), index, spec, objective, need_grads)


def logprobs_backward_sweep(ctx, grad_logp, grad_entropy, provider=None, log_mass=None):
    """The backward of the linear log-prob ops (``ctx`` saved hidden, weight, bias, kept labels,
    index, lse, entropy; ``ctx.spec``): the upstream gradients of the kept rows through a second
    sweep; returns (grad hidden, grad weight, grad bias), None where not needed. A vocabulary
    shard's ``provider`` and ``log_mass`` come from the vocabulary-parallel op."""
    hidden, weight, bias, labels, index, lse, entropy = ctx.saved_tensors
    grads = LinearGrads.allocate(hidden, weight, bias, ctx.spec, *ctx.needs_input_grad[:3], every_row=index is None)

    def kept(grad):
        return gather_rows(grad.to(lse.dtype), index).contiguous()

    grad_logp = torch.zeros_like(lse) if grad_logp is None else kept(grad_logp)
    with_entropy = entropy.numel() > 0 and grad_entropy is not None
    if with_entropy:
        grad_entropy = kept(grad_entropy)
    rows = RowStats(None, entropy if with_entropy else None, lse, log_mass)

    def upstream(start, end):
        return grad_logp[start:end], grad_entropy[start:end] if with_entropy else None

    sweep(hidden, weight, bias, labels, ctx.spec, rows, forward=False, upstream=upstream, grads=grads, index=index,
          provider=provider)  # fmt: skip
    return grads.results(bias)
