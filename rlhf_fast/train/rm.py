"""RMTrainer: a Bradley-Terry reward model on preference pairs, with the fused ``rlhf_fast.pairwise_reward_loss``.

The chosen and rejected sequences of a micro-batch go through the backbone in one forward pass
([2B, T]); the loss is -log sigmoid(r_chosen - r_rejected) averaged over pairs (plus the centring term).

Evaluation reports held-out pair accuracy and loss. When every held-out pair carries gold scores
(the built-in task does), it also reports, all in Bradley-Terry terms where P(label = gold order)
= sigmoid(|g_chosen - g_rejected|):

    gold_ceiling          mean sigmoid(|g_c - g_r|): the expected accuracy of the best possible scorer
    expected_accuracy     the model's accuracy with the label noise integrated out: a pair it orders
                          like the gold counts sigmoid(|g_c - g_r|), one it orders the other way counts
                          1 - sigmoid(|g_c - g_r|), a gold tie counts 1/2. Comparable to gold_ceiling
                          without the sampling noise of the labels.
    ceiling_fraction      (expected_accuracy - 1/2) / (gold_ceiling - 1/2): share of the ceiling's
                          margin over chance that the model reaches
    gold_scorer_accuracy  the gold scorer's accuracy on these very labels (the noisy twin of the ceiling)
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

import rlhf_fast

from . import dist
from .config import ConfigError, ModelConfig, RMConfig
from .data import PreferenceBatch, build_preferences, collate_preferences, eval_batches, idle_eval_batches, load_records
from .loop import Hooks, LossFn
from .models import _require_dir, arch_config, check_vocab, is_reward_model_dir, load_tokenizer, pad_id
from .reward_model import RewardModel
from .run import dataset_loop, plot_run, save_summary, seed_everything, start_run
from .task import SyntheticTask


def load_reward_model(model: ModelConfig, tokenizer) -> RewardModel:
    """model.path: a reward-model directory (continued), a causal LM (its body gets a new head) or a
    config.json alone (random init); unset: a backbone built from model.arch."""
    from transformers import AutoConfig

    if model.path is None:
        rm = RewardModel.from_backbone_config(arch_config(model, tokenizer))
    else:
        directory = _require_dir(model.path, "model.path")
        if is_reward_model_dir(directory):
            rm = RewardModel.from_pretrained(directory)
        elif any(directory.glob("*.safetensors")) or any(directory.glob("*.bin")):
            rm = RewardModel.from_causal_lm(directory)
        else:
            try:
                rm = RewardModel.from_backbone_config(AutoConfig.from_pretrained(str(directory), local_files_only=True))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot build a reward model from model.path={model.path!r}: {exc}") from exc
    rm = rm.float()
    check_vocab(tokenizer, rm.backbone.get_input_embeddings().num_embeddings, where="reward model backbone")
    if model.gradient_checkpointing:
        rm.backbone.gradient_checkpointing_enable()
    return rm


def rm_loss_step(model: torch.nn.Module, batch: PreferenceBatch, *, center_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of one micro-batch; stats: the op's (accuracy, margin = mean c - r) and the mean score."""
    scores = model(batch.input_ids, batch.attention_mask)  # [2B]: chosen then rejected
    chosen, rejected = scores.chunk(2)
    loss, stats = rlhf_fast.pairwise_reward_loss(chosen, rejected, margin=batch.margin, center_coef=center_coef)
    return loss, {**stats, "score_mean": scores.detach().mean()}


def pair_outcomes(chosen: torch.Tensor, rejected: torch.Tensor, gold: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-pair accuracy terms [B] (see the module docstring); gold [B, 2] adds the gold-based ones."""
    half = torch.full_like(chosen, 0.5)
    out = {"accuracy": torch.where(chosen == rejected, half, (chosen > rejected).float())}
    if gold is not None:
        gold_gap = gold[:, 0] - gold[:, 1]
        ceiling = torch.sigmoid(gold_gap.abs())
        agrees = torch.sign(chosen - rejected) * torch.sign(gold_gap)
        out["gold_ceiling"] = ceiling
        out["expected_accuracy"] = torch.where(agrees > 0, ceiling, torch.where(agrees < 0, 1 - ceiling, half))
        out["gold_scorer_accuracy"] = torch.where(gold_gap == 0, half, (gold_gap > 0).float())
    return out


def rm_evaluate(model: torch.nn.Module, examples, *, batch_size: int, pad: int, device: torch.device) -> dict[str, float]:
    """Held-out pair accuracy and loss (and the gold-based metrics when every pair has gold scores)."""
    has_gold = all(e.gold is not None for e in examples)
    keys = ["loss", "accuracy"] + (["gold_ceiling", "expected_accuracy", "gold_scorer_accuracy"] if has_gold else [])
    from .fsdp import is_sharded

    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
    shard = (batch_size, partial(collate_preferences, pad_id=pad), dist.rank(), dist.world_size())
    for batch in idle_eval_batches(examples, *shard) if is_sharded(model) else ():  # lockstep (a collective forward)
        model(batch.input_ids.to(device), batch.attention_mask.to(device))
    for batch in eval_batches(examples, *shard):
        batch = batch.to(device)
        chosen, rejected = model(batch.input_ids, batch.attention_mask).float().chunk(2)
        loss, _ = rlhf_fast.pairwise_reward_loss(chosen, rejected, margin=batch.margin, center_coef=0.0)
        outcomes = pair_outcomes(chosen, rejected, batch.gold)
        n = chosen.shape[0]
        values = [float(loss) * n] + [float(outcomes[k].sum()) for k in keys[1:]] + [n]
        sums += torch.tensor(values, dtype=torch.float64, device=device)
    *totals, count = dist.all_reduce_sum(sums).tolist()
    metrics = {k: v / max(count, 1.0) for k, v in zip(keys, totals)}
    if has_gold and metrics["gold_ceiling"] > 0.5:
        metrics["ceiling_fraction"] = (metrics["expected_accuracy"] - 0.5) / (metrics["gold_ceiling"] - 0.5)
    metrics["pairs"] = count
    return metrics


def describe(metrics: dict[str, float]) -> str:
    """One line: held-out accuracy beside the gold ceiling when it is known."""
    text = f"held-out pair accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.4f} ({int(metrics['pairs'])} pairs)"
    if "gold_ceiling" in metrics:
        text += (
            f"; gold scorer on the same labels {metrics['gold_scorer_accuracy']:.3f}"
            f"; without label noise {metrics['expected_accuracy']:.3f} vs gold ceiling {metrics['gold_ceiling']:.3f}"
        )
        if "ceiling_fraction" in metrics:
            text += f" = {100 * metrics['ceiling_fraction']:.0f}% of the ceiling's margin over chance"
    return text


class RMTrainer:
    """Builds the tokenizer, reward model and pairs from ``config`` (or takes them) and runs the shared loop.

    ``loss_fn(model, batch)`` replaces the loss step (default: ``rm_loss_step`` with loss.center_coef).
    """

    def __init__(
        self,
        config: RMConfig,
        *,
        model: RewardModel | None = None,
        tokenizer=None,
        hooks: Hooks | None = None,
        loss_fn: LossFn | None = None,
    ):
        self.config = config
        self.out_dir = Path(config.out_dir)
        seed_everything(config.train.seed)
        self.device = dist.resolve_device(config.train.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, config.model)
        self.model = model if model is not None else load_reward_model(config.model, self.tokenizer)
        check_vocab(self.tokenizer, self.model.backbone.get_input_embeddings().num_embeddings, where="reward model backbone")
        self.model.to(self.device)

        (train, train_name), (held, held_name) = load_records(config.data, SyntheticTask(), config.task, "pref")
        use_margin = config.loss.use_margin
        self.train_examples = build_preferences(train, self.tokenizer, config.data, train_name, use_margin=use_margin)
        self.eval_examples = build_preferences(held, self.tokenizer, config.data, held_name, use_margin=use_margin) if held else []
        self.loop = dataset_loop(
            config, self.model, self.train_examples, self.eval_examples, pad=pad_id(self.tokenizer),
            collate=collate_preferences, evaluate=rm_evaluate,
            loss_fn=loss_fn or partial(rm_loss_step, center_coef=config.loss.center_coef), hooks=hooks,
            device=self.device, name="rm",
        )  # fmt: skip

    def train(self) -> dict[str, float]:
        """Run (or resume) training; at the last step save the reward model (and tokenizer) to out_dir/reward_model/."""
        start_run(self.config, self.loop)
        metrics = self.loop.run()
        if self.loop.step == self.config.train.steps:
            self.save_model(self.out_dir / "reward_model")
            hlines = None
            if "gold_ceiling" in metrics:
                ceiling = ("gold ceiling", metrics["gold_ceiling"])
                hlines = {"accuracy": ceiling, "expected_accuracy": ceiling}
            plot_run(self.out_dir, "Reward model", panels=("loss", "accuracy", "expected_accuracy"), hlines=hlines)
            save_summary(self.out_dir, {"step": self.loop.step, "eval": metrics})
            if metrics and dist.is_main():
                print(describe(metrics), flush=True)
        dist.barrier()  # every rank returns once rank 0 has written the run's files
        return metrics

    def save_model(self, directory: Path) -> None:
        """The reward model and its tokenizer (``RewardModel.save_pretrained``), from rank 0; sharded
        with FSDP2, its whole state is gathered to rank 0's CPU first (every rank calls this)."""
        from . import fsdp

        state = fsdp.full_state_dict(self.loop.module) if fsdp.is_sharded(self.loop.module) else None
        if dist.is_main():
            self.loop.module.save_pretrained(directory, tokenizer=self.tokenizer, state_dict=state)
