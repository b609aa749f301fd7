"""One RL step, fused ops vs the same loop on plain PyTorch ops: same model, same batch.

    python -m rlhf_fast.bench --rl-step [--device cpu|cuda] [--vocab V] [--hidden H] [--layers L]
                              [--batch B] [--prompt-len P] [--new-tokens R] [--repeats N] [--out DIR]

The policy is a Llama built from a config (vocab V, hidden H, L layers); the step is GRPO-style
(group advantages, k3 KL to a frozen reference as a loss term, clip 0.2, token-mean), run by the
trainer's own steps (``rlhf_fast.train.rl.steps``) with ``RLTrainer``. Timed separately:

  rollout   generate (HF, KV cache; identical in both) + the recomputation of the policy's and the
            reference's log-probs: fused = ``linear_token_logprobs`` on the hidden states (no [N, V]
            logits); eager = ``model(...).logits`` then log_softmax/gather (rlhf_fast.reference)
  update    one optimizer step on the batch: fused = ``loss_step`` (fused_linear_policy_loss);
            eager = the same loop with ``loss_fn`` replaced by the plain-PyTorch reference loss on the
            logits (the hook a user would use)

Tokens per second count every token of the batch (prompt + response) that goes through the model.
Peak memory: CUDA allocator peak during the phase (CPU: not measured). The driver (bench/suite.py,
``--rl-step``) merges the rows into ``<out>/<date>-<device>-rl_step.json``.
"""

from __future__ import annotations

import time

import torch

from rlhf_fast import reference

from . import harness

BENCH = "rl_step"
KEY_FIELDS = ("impl", "vocab", "hidden", "layers", "batch", "response_len")
# The sizes the driver's options leave open, by device: (CUDA, CPU).
SIZES = {"vocab": (128256, 32000), "hidden": (1024, 256), "batch": (64, 16), "new_tokens": (256, 32)}


class IdTokenizer:
    """A tokenizer over V ids whose text is the ids themselves ("5 17 9"): no vocabulary file needed."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.chat_template = None

    def __len__(self) -> int:
        return self.vocab

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.vocab)}

    def __call__(self, texts, add_special_tokens=True):
        head = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": [head + [int(x) for x in t.split()] for t in texts]}

    def batch_decode(self, rows, skip_special_tokens=True):
        special = {0, 1, 2} if skip_special_tokens else set()
        return [" ".join(str(i) for i in row if i not in special) for row in rows]

    def save_pretrained(self, path):
        pass


def eager_logprobs(model, rollout, temperature: float) -> torch.Tensor:
    from rlhf_fast.train.rl.rollout import response_logits

    logits = response_logits(model, rollout)
    return torch.where(rollout.response_mask, reference.token_logprobs(logits.float(), rollout.labels, temperature=temperature), 0.0)


def eager_loss_step(trainer, micro, normalizer):
    """The loss of ``rl_steps.loss_step`` on materialised logits with plain PyTorch (rlhf_fast.reference)."""
    from rlhf_fast.train.rl.rollout import response_logits
    from rlhf_fast.train.rl.steps import policy_loss_options

    logits = response_logits(trainer.policy, micro.rollout)
    loss, stats = reference.fused_policy_loss(
        logits, micro.rollout.labels, micro.old_logp, micro.advantages, micro.mask,
        temperature=trainer.config.rollout.temperature, entropy_coef=trainer.config.algo.entropy_coef,
        ref_logp=micro.ref_logp, options=policy_loss_options(trainer),
    )  # fmt: skip
    # reference.aggregate divides by this micro-batch's count; rescale to the minibatch's normaliser.
    return loss * micro.mask.sum() / normalizer, stats


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.train.config import load_config
    from rlhf_fast.train.rl.trainer import RLTrainer
    from rlhf_fast.train.rl.config import RLConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    policy = LlamaForCausalLM(config).to(device)
    tokenizer = IdTokenizer(args.vocab)
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(str(int(x)) for x in torch.randint(3, args.vocab, (args.prompt_len - 1,), generator=g)) for _ in range(args.batch // 4)]
    cfg = load_config(RLConfig, None, {
        "out_dir": "/tmp/bench_rl_step", "algo.name": "grpo", "rollout.group_size": 4, "rollout.batch_size": args.batch,
        "rollout.max_new_tokens": args.new_tokens, "rollout.max_prompt_length": args.prompt_len, "algo.kl_place": "loss",
        "algo.kl_estimator": "k3", "algo.mini_batch_size": args.batch, "algo.micro_batch_size": args.micro_batch or args.batch,
        "train.device": str(device), "train.progress": False, "optim.lr": 1e-5,
    })  # fmt: skip
    return RLTrainer(cfg, policy=policy, tokenizer=tokenizer, reward_fn=lambda p, r: [float(len(x.split()) % 3) for x in r],
                     prompts=prompts, eval_prompts=[])  # fmt: skip


def peak(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, None


def run(args) -> list[dict]:
    from rlhf_fast.train.rl.rollout import sequence_logprobs
    from rlhf_fast.train.rl.steps import Experience, loss_step, update_step

    device = torch.device(args.device)
    trainer = build(args, device)
    T = trainer.config.rollout.temperature
    rows = []
    env = harness.environment(device)
    for repeat in range(args.repeats + 1):  # the first round warms up (kernels, allocator)
        prompts = trainer.next_prompts()
        rollout, gen_s, _ = peak(device, lambda: trainer.rollout_fn(trainer, prompts))
        scores, _ = trainer.score_fn(trainer, rollout)
        tokens = float(rollout.attention_mask.numel())
        for impl in ("fused", "eager"):
            def recompute():
                with torch.no_grad(), trainer.autocast():
                    if impl == "fused":
                        return sequence_logprobs(trainer.policy, rollout, temperature=T), sequence_logprobs(trainer.ref_policy, rollout, temperature=T)
                    return eager_logprobs(trainer.policy, rollout, T), eager_logprobs(trainer.ref_policy, rollout, T)

            (old, ref), logp_s, logp_mb = peak(device, recompute)
            exp = Experience(rollout, scores, old.float(), ref.float())
            exp.advantages, exp.returns = trainer.advantage_fn(trainer, exp)
            trainer.loss_fn = loss_step if impl == "fused" else eager_loss_step
            _, update_s, update_mb = peak(device, lambda: update_step(trainer, exp))
            if repeat == 0:
                continue
            rows.append({
                **env, "impl": impl, "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
                "prompt_len": rollout.prompt_len, "response_len": rollout.response_mask.shape[1], "repeat": repeat,
                "generate_s": gen_s, "logprobs_s": logp_s, "update_s": update_s,
                "rollout_tokens_per_s": tokens / (gen_s + logp_s), "update_tokens_per_s": tokens / update_s,
                "logprobs_peak_mb": logp_mb, "update_peak_mb": update_mb,
            })  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for impl in ("fused", "eager"):
        mine = [r for r in rows if r["impl"] == impl]
        med = lambda key: sorted(r[key] for r in mine)[len(mine) // 2] if mine and mine[0][key] is not None else None  # noqa: E731
        out.append({**{k: v for k, v in mine[0].items() if k != "repeat"}, **{k: med(k) for k in (
            "generate_s", "logprobs_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s", "logprobs_peak_mb", "update_peak_mb")}})
    fused, eager = out
    fused["update_speedup_vs_eager"] = eager["update_s"] / fused["update_s"]
    fused["logprobs_speedup_vs_eager"] = eager["logprobs_s"] / fused["logprobs_s"]
    return out
