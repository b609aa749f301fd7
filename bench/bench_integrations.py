"""TRL's GRPOTrainer, stock vs ``rlhf_fast.integrations.trl.enable``: one training step, and the loss alone.

    python -m rlhf_fast.bench.bench_integrations [--device cpu|cuda] [--dtype float32|bfloat16]
        [--vocab V] [--hidden H] [--layers L] [--batch B] [--prompt-len P] [--completion-len R]
        [--repeats N] [--out DIR]

The trainer is TRL's own (GRPOConfig: loss_type "dapo", the default, beta 0.04, so a reference
model) on a Qwen2 built from a config (vocab V, hidden H, L layers). Generation is the same code in
both and is left out: the batch is a fixed random one (B completions of R tokens after P prompt
tokens, the last quarter of each completion padded) given to the trainer's own methods.

Implementations: ``trl-stock``; ``trl-liger``, TRL's ``use_liger_kernel=True`` (in TRL 1.16 Liger's
layer kernels only: its fused linear loss is refused there, TRL's own chunked head stays; run when
liger_kernel is installed); ``rlhf_fast``, the stock trainer after ``enable``. Phases:

  loss   ``trainer.compute_loss`` forward + backward: the policy's log-probs and entropies, then the
         loss (stock: TRL's chunked fused head and its loss code; ours: fused_linear_policy_loss)
  step   what a step adds to it on the training side: the reference's and the old policy's
         log-probs (``_get_per_token_logps_and_entropies``, no gradient), the loss forward +
         backward and the optimizer step

Peak memory: CUDA, the allocator's peak beyond what was allocated before the phase; CPU, the
process's RSS high-water mark growth, each implementation measured in a fresh process (spawned),
so neither inherits the other's high-water mark. Rows go to ``<out>/<date>-<device>-integrations.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch

from . import harness

BENCH = "integrations"
KEY_FIELDS = ("peer", "impl", "phase", "dtype", "vocab", "hidden", "layers", "batch", "completion_len")
SIZES = {"vocab": (128256, 32000), "hidden": (1024, 256), "layers": (2, 2), "batch": (16, 8),
         "prompt_len": (64, 16), "completion_len": (512, 64)}  # (CUDA, CPU) fmt: skip
IMPLS = ("trl-stock", "trl-liger", "rlhf_fast")
PHASES = ("loss", "step")


def build_trainer(args, model_dir: str, impl: str):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_fast.integrations import trl as rf_trl
    from rlhf_fast.train.task import build_tokenizer

    dtype = getattr(torch, args.dtype)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_integrations_"), per_device_train_batch_size=args.batch,
        num_generations=4, max_completion_length=args.completion_len, beta=0.04, loss_type="dapo", report_to=[],
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", gradient_checkpointing=False, save_strategy="no",
        disable_tqdm=True, model_init_kwargs={"dtype": dtype}, learning_rate=1e-6, use_liger_kernel=impl == "trl-liger",
    )  # fmt: skip
    prompts = datasets.Dataset.from_dict({"prompt": ["a b c"] * args.batch})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=config, train_dataset=prompts, processing_class=build_tokenizer())  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
    return rf_trl.enable(trainer) if impl == "rlhf_fast" else trainer


def batch(args, device) -> dict:
    g = torch.Generator().manual_seed(0)
    B, P, R, V = args.batch, args.prompt_len, args.completion_len, args.vocab
    completion_mask = torch.ones(B, R, dtype=torch.long)
    completion_mask[:, R - R // 4 :] = 0
    inputs = {
        "prompt_ids": torch.randint(3, V, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, V, (B, R), generator=g), "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g), "ref_per_token_logps": -torch.rand(B, R, generator=g) - 9.0,
        "old_per_token_logps": -torch.rand(B, R, generator=g) - 9.0,
    }  # fmt: skip
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["num_items_in_batch"] = completion_mask.sum().to(device)
    return inputs


def measure(args, model_dir: str, impl: str, phase: str) -> dict:
    """Time and peak of one implementation's phase; run in a fresh process on a CPU (see the module doc)."""
    device = torch.device(args.device)
    trainer = build_trainer(args, model_dir, impl)
    model = trainer.model
    model.train()
    inputs = batch(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)

    def loss():
        value = trainer.compute_loss(model, inputs)
        value.backward()
        return float(value)

    def step():
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, args.completion_len)
            trainer._get_per_token_logps_and_entropies(model, ids, mask, args.completion_len)
        value = loss()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    env, fn = harness.environment(device), {"loss": loss, "step": step}[phase]
    times, peak, value = [], None, None
    for repeat in range(args.repeats + 1):  # the first warms up
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        value = out if value is None else value  # the first run's loss: the optimizer moves the model after it
        elapsed = time.perf_counter() - start
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / harness.MIB
        elif repeat == 0:  # on a CPU the high-water mark only grows: its first run's growth
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024 / harness.MIB
        if repeat:
            times.append(elapsed * 1e3)
    return {
        **env, "peer": "trl", "peer_version": _version("trl"), "impl": impl, "phase": phase, "dtype": args.dtype,
        "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
        "prompt_len": args.prompt_len, "completion_len": args.completion_len, "repeats": len(times),
        "loss_value": value, "ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "peak_mib": peak,
        "peak_note": "allocator peak beyond the phase's start" if device.type == "cuda" else
                     "RSS high-water growth in a fresh process (first run of the phase)",
    }  # fmt: skip


def _version(name):
    import importlib.metadata

    return importlib.metadata.version(name)


def save_model(args, directory: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.prompt_len + args.completion_len + 8, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).to(getattr(torch, args.dtype)).save_pretrained(directory)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on a CPU")
    for name in SIZES:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="default: %d on CUDA, %d on a CPU" % SIZES[name])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", action="append", default=None, help="results directory (repeatable; default bench/results)")
    args = p.parse_args(argv)
    for name, (on_cuda, on_cpu) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if args.device == "cuda" else on_cpu)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench_integrations: trl is not installed (pip install trl==1.16.0); nothing measured", file=sys.stderr)
        return 2
    out_dirs = args.out or [str(harness.RESULTS_DIR)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_integrations_model_") as model_dir:
        save_model(args, model_dir)
        for phase in PHASES:
            for impl in IMPLS:
                if impl == "trl-liger" and importlib.util.find_spec("liger_kernel") is None:
                    print(f"{impl} {phase}: not run, liger_kernel is not installed")
                    continue
                if args.device == "cpu":  # a fresh process each, for its own RSS high-water mark
                    with multiprocessing.get_context("spawn").Pool(1) as pool:
                        rows.append(pool.apply(measure, (args, model_dir, impl, phase)))
                else:
                    rows.append(measure(args, model_dir, impl, phase))
                    torch.cuda.empty_cache()
    stock = {r["phase"]: r for r in rows if r["impl"] == "trl-stock"}
    # Never time a wrong answer as a win: each loss against stock TRL's on the same batch and weights.
    rtol = 2e-2 if args.dtype == "bfloat16" else 1e-3
    for r in rows:
        r["x_stock"] = stock[r["phase"]]["ms"] / r["ms"]
        reference = stock[r["phase"]]["loss_value"]
        r["check"] = "ok" if abs(r["loss_value"] - reference) <= rtol * abs(reference) + 1e-6 else "MISMATCH"
    paths = [harness.write_results(rows, out, bench=BENCH, key_fields=KEY_FIELDS) for out in out_dirs]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['peer']} {r['impl']:<10} {r['phase']:<5} {r['dtype']:<9} V={r['vocab']} H={r['hidden']} "
              f"B={r['batch']}x{r['prompt_len']}+{r['completion_len']}  {r['ms']:9.1f} ms  x{r['x_stock']:.2f} vs stock  "
              f"peak {peak} MiB  loss {r['loss_value']:.6g} {r['check']}")  # fmt: skip
    print("results:", ", ".join(map(str, paths)))
    return 0 if all(r["check"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
