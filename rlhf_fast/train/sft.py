"""SFTTrainer: instruction finetuning of a causal LM, with the fused ``rlhf_fast.sft_loss``.

The loss is the mean negative log-prob of the response tokens (prompt and padding are IGNORE_INDEX),
averaged over every response token of the global batch (see ``loop`` on accumulation).

    trainer = SFTTrainer(SFTConfig(out_dir="runs/sft"))
    metrics = trainer.train()          # held-out loss; the policy is saved in runs/sft/model/
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

import rlhf_fast

from . import dist
from .config import SFTConfig
from .data import SFTBatch, build_sft, collate_sft, eval_batches, idle_eval_batches, load_records
from .loop import Hooks, LossFn
from .models import check_vocab, load_policy, load_tokenizer, pad_id
from .run import dataset_loop, plot_run, save_policy, save_summary, seed_everything, start_run
from .task import SyntheticTask


def sft_loss_step(model: torch.nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean NLL of the batch's response tokens (labels are already shifted: no [B, T-1, V] copy)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return rlhf_fast.sft_loss(logits, batch.labels), {}


def sft_evaluate(model: torch.nn.Module, examples, *, batch_size: int, pad: int, device: torch.device) -> dict[str, float]:
    """Token-weighted held-out loss (and perplexity), summed over every process's share."""
    from .fsdp import is_sharded

    sums = torch.zeros(2, dtype=torch.float64, device=device)
    shard = (batch_size, partial(collate_sft, pad_id=pad), dist.rank(), dist.world_size())
    for batch in eval_batches(examples, *shard):
        batch = batch.to(device)
        loss, _ = sft_loss_step(model, batch)
        tokens = batch.weight()
        sums += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64, device=device)
    for batch in idle_eval_batches(examples, *shard) if is_sharded(model) else ():
        sft_loss_step(model, batch.to(device))
    loss_sum, tokens = dist.all_reduce_sum(sums).tolist()
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}


class SFTTrainer:
    """Builds the tokenizer, policy and data from ``config`` (or takes them) and runs the shared loop.

    ``loss_fn`` replaces the loss step (default ``sft_loss_step``); ``hooks`` observe the loop.
    """

    def __init__(
        self,
        config: SFTConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        hooks: Hooks | None = None,
        loss_fn: LossFn = sft_loss_step,
    ):
        self.config = config
        self.out_dir = Path(config.out_dir)
        seed_everything(config.train.seed)
        self.device = dist.resolve_device(config.train.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, config.model)
        self.model = model if model is not None else load_policy(config.model, self.tokenizer)
        check_vocab(self.tokenizer, self.model.get_input_embeddings().num_embeddings)
        self.model.to(self.device)

        (train, train_name), (held, held_name) = load_records(config.data, SyntheticTask(), config.task, "sft")
        self.train_examples = build_sft(train, self.tokenizer, config.data, train_name)
        self.eval_examples = build_sft(held, self.tokenizer, config.data, held_name) if held else []
        self.loop = dataset_loop(
            config, self.model, self.train_examples, self.eval_examples, pad=pad_id(self.tokenizer),
            collate=collate_sft, evaluate=sft_evaluate, loss_fn=loss_fn, hooks=hooks, device=self.device, name="sft",
        )  # fmt: skip

    def train(self) -> dict[str, float]:
        """Run (or resume) training; at the last step save the policy and tokenizer to out_dir/model/."""
        start_run(self.config, self.loop)
        metrics = self.loop.run()
        if self.loop.step == self.config.train.steps:
            self.save_model(self.out_dir / "model")
            plot_run(self.out_dir, "SFT", panels=("loss",))
            save_summary(self.out_dir, {"step": self.loop.step, "eval": metrics})
        dist.barrier()  # every rank returns once rank 0 has written the run's files
        return metrics

    def save_model(self, directory: Path) -> None:
        """The policy and its tokenizer as a transformers directory (written aside, then renamed)."""
        save_policy(self.loop.module, self.tokenizer, directory)  # consolidated when sharded (every rank calls it)
