"""Vocabulary-parallel ops (``vocab_group=``) against the gathered-logits baseline, per rank, under torchrun.

    torchrun --nproc_per_node 2 -m rlhf_fast.bench.bench_vocab_parallel [--tokens 4096] [--vocab 32003] [--hidden 256]
        [--dtype float32] [--backend auto] [--reps 5] [--json PATH]

gloo on CPU, NCCL on GPUs (one per rank, cuda:LOCAL_RANK). Each rank holds a contiguous shard of
the vocabulary (V_r = V / world, the first ranks one more when V does not divide). Steps, each
forward + backward of logp and entropy with random upstream gradients:

  logits   parallel   ``token_logprobs(logits_r, labels, return_entropy=True, vocab_group=group)``
                      on this rank's [N, V_r] shard: two all-reduces of O(N) floats
           gathered   the baseline: all-gather the shards into [N, V] on every rank (Megatron's
                      gather_output=True: the backward keeps this rank's slice of the gradient),
                      then the single-process op on the whole vocabulary
  linear   parallel   ``linear_token_logprobs(hidden, weight_r, labels, vocab_group=group)``: the
                      hidden gradient all-reduced over the group
           gathered   logits_r = hidden @ weight_r.T (a ColumnParallelLinear: the hidden gradient
                      all-reduced in the backward), all-gathered, then ``token_logprobs``

Reported per rank: median time (p10-p90) over ``--reps`` runs after 2 warm-up runs (a fixed count:
every rank must run the same collectives), and peak memory beyond the inputs (CUDA: allocated
bytes; CPU: resident set growth, ``harness.rss_peak_mb``). The parallel results are checked against
the gathered baseline before anything is timed (logp, entropy, the shard's gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script (torchrun bench/bench_vocab_parallel.py) from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlhf_fast
from rlhf_fast.bench import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # parallel vs gathered, norm-wise


def shard_bounds(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous shards in rank order; the first ``vocab % world`` ranks hold one id more."""
    base, extra = divmod(vocab, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class GatherLogits(torch.autograd.Function):
    """[N, V_r] shards -> [N, V] on every rank; the backward keeps this rank's columns (no communication)."""

    @staticmethod
    def forward(ctx, shard, bounds, group):
        world = dist.get_world_size(group)
        widest = max(hi - lo for lo, hi in bounds)
        padded = torch.nn.functional.pad(shard, (0, widest - shard.shape[1]))  # gloo gathers equal sizes
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        ctx.columns = bounds[dist.get_rank(group)]
        return torch.cat([p[:, : hi - lo] for p, (lo, hi) in zip(pieces, bounds)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        lo, hi = ctx.columns
        return grad[:, lo:hi], None, None


class SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient (Megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class Step:
    """``step(i)``: forward + backward of one implementation on its leaves; ``clear()`` drops the gradients."""

    def __init__(self, run, leaves):
        self.run, self.leaves = run, leaves

    def __call__(self, i):
        return self.run()

    def clear(self):
        for t in self.leaves:
            t.grad = None


def build(args, group, device):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    bounds = [shard_bounds(args.vocab, world, r) for r in range(world)]
    lo, hi = bounds[rank]
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)  # the same full inputs on every rank

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    g_logp, g_ent = (torch.randn(args.tokens, generator=gen).to(device) for _ in range(2))
    logits_r = draw(args.tokens, args.vocab, scale=2.0)[:, lo:hi].contiguous().to(device).requires_grad_()
    hidden = draw(args.tokens, args.hidden).to(device).requires_grad_()
    weight_r = draw(args.vocab, args.hidden, scale=2.0 / args.hidden**0.5)[lo:hi].contiguous().to(device)
    weight_r.requires_grad_()
    kw = {"return_entropy": True, "backend": args.backend}

    def backward(logp, ent):
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp.detach(), ent.detach()

    steps = {
        ("logits", "parallel"): Step(lambda: backward(*rlhf_fast.token_logprobs(logits_r, labels, vocab_group=group, **kw)),
                                     [logits_r]),
        ("logits", "gathered"): Step(lambda: backward(*rlhf_fast.token_logprobs(GatherLogits.apply(logits_r, bounds, group),
                                                                                labels, **kw)), [logits_r]),
        ("linear", "parallel"): Step(lambda: backward(*rlhf_fast.linear_token_logprobs(hidden, weight_r, labels,
                                                                                       vocab_group=group, **kw)),
                                     [hidden, weight_r]),
        ("linear", "gathered"): Step(lambda: backward(*rlhf_fast.token_logprobs(
            GatherLogits.apply(SumGradOverGroup.apply(hidden, group) @ weight_r.t(), bounds, group), labels, **kw)),
                                     [hidden, weight_r]),
    }  # fmt: skip
    return steps, dtype


def verify(steps, dtype):
    """The parallel results equal the gathered baseline's (values, and every leaf's gradient)."""
    for op in ("logits", "linear"):
        results = {}
        for impl in ("parallel", "gathered"):
            step = steps[(op, impl)]
            step.clear()
            values = step(0)
            results[impl] = list(values) + [t.grad.clone() for t in step.leaves]
            step.clear()
        names = ["logp", "entropy"] + [f"grad {i}" for i in range(len(results["parallel"]) - 2)]
        for name, a, b in zip(names, results["parallel"], results["gathered"]):
            err = harness.rel_err(a, b)
            if not err <= CHECK_TOL[dtype]:
                raise AssertionError(f"{op} {name}: parallel vs gathered rel err {err:.3g} > {CHECK_TOL[dtype]:g}")


def measure(steps, device, reps):
    rows = []
    for (op, impl), step in steps.items():
        timing = harness.time_step(step, device, warmup=2, min_reps=reps, max_reps=reps)
        step.clear()
        if device.type == "cuda":
            peak = harness.cuda_peak_mb(step, device)
        else:
            peak = harness.rss_peak_mb(step)
        step.clear()
        rows.append({"op": op, "impl": impl, "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                     "peak_mb": peak})  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="token rows N")
    parser.add_argument("--vocab", type=int, default=32003, help="whole vocabulary V (odd: uneven shards)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H of the linear head")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write rank 0's table of every rank's rows here")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("run under torchrun with at least 2 processes: torchrun --nproc_per_node 2 " + __file__)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        harness.pin_malloc_thresholds()  # before any tensor: the resident set then follows the live tensors
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        group = dist.group.WORLD
        steps, dtype = build(args, group, device)
        verify(steps, dtype)
        rows = measure(steps, device, args.reps)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, rows)
        if dist.get_rank() == 0:
            report(args, every, device)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def report(args, every, device):
    world = len(every)
    print(f"vocab-parallel, {world} ranks on {harness.device_name(device)}: N={args.tokens} V={args.vocab} H={args.hidden} "
          f"{args.dtype}, backend={args.backend}; forward+backward, logp and entropy")  # fmt: skip
    print(f"{'rank':>4} {'op':<7} {'impl':<9} {'median ms':>10} {'p10-p90 ms':>15} {'peak MiB':>9}")
    for rank, rows in enumerate(every):
        for row in rows:
            peak = row["peak_mb"]
            peak = f"{peak:9.1f}" if isinstance(peak, float) else str(peak)
            spread = f"{row['p10_ms']:.1f}-{row['p90_ms']:.1f}"
            print(f"{rank:>4} {row['op']:<7} {row['impl']:<9} {row['median_ms']:>10.2f} {spread:>15} {peak}")
    if args.json is not None:
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "world": world, "environment":
               harness.environment(device), "ranks": every}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
