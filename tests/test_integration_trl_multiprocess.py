"""rlhf_fast.integrations.trl in a 2-process GRPOTrainer (CPU, gloo, DDP): stock and enable() agree on each rank.

Where TRL's loss reduces across processes, ours must too: the top_entropy_quantile threshold is a
quantile of the valid tokens' entropies of *all* processes (``get_high_entropy_mask`` gathers
them), dapo / cispo divide by the token count of all processes (``num_items_in_batch``), and the
gradient is averaged by DDP, which syncs only a graph built inside the wrapper's forward. Each rank
gets its own batch (other prompts, other completion lengths, so a per-process quantile would mask
other tokens: the test checks that it would) and computes the loss and gradient of that batch with
stock TRL and with enable(trainer) through the same DDP wrapper (vespo too: dapo's normaliser). One spawn of 2 workers runs every
case: start-up (importing TRL, building the trainers) is most of the time.

Tolerances: the model is float64 (see test_integration_trl.py for why), but TRL's log-probs and
entropies come from transformers' fused head in float32, so stock and ours differ at float32
rounding: measured up to 2e-6 relative in the loss (vespo, whose weight exponentiates a sum of
log-ratios; 5e-7 for the others), 7e-7 of the largest gradient entry, 3e-6 in the kl metric (a
mean of differences of log-probs). A per-process quantile (what rlhf_fast did before) misses by
6e-2 to 6 relative in the loss and 7e-2 to 1 in the gradient on this batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it; the workers inherit it
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from test_integration_trl import grpo_trainer, tiny_dir  # noqa: E402, F401  (tiny_dir: the fixture)

from rlhf_fast.integrations import trl as rf_trl  # noqa: E402

WORLD = 2
RTOL, ATOL = 1e-5, 1e-9
# case -> GRPOConfig fields; epsilon 0.02 with log-prob noise 0.05 makes some tokens clip
CASES = {
    "grpo-top-entropy": dict(loss_type="grpo", top_entropy_quantile=0.2, epsilon=0.02),
    "dapo-top-entropy": dict(loss_type="dapo", top_entropy_quantile=0.5, epsilon=0.02, epsilon_high=0.03),
    "cispo-no-unused-search": dict(loss_type="cispo", epsilon_high=1.02, ddp_find_unused_parameters=False),
    "bnpo-entropy-bonus": dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.05),
    "vespo-top-entropy": dict(loss_type="vespo", top_entropy_quantile=0.5),
}
B, P, K = 4, 3, 8  # completions per rank, prompt tokens, completion tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(trainer, rank: int) -> dict:
    """This rank's GRPO batch as ``_generate_and_score_completions`` leaves it: other tokens and
    completion lengths on each rank, old and reference log-probs near the model's own, float32
    advantages, and num_items_in_batch summed over the processes as TRL sums it."""
    g = torch.Generator().manual_seed(1000 + rank)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # a left-padded prompt
    completion_ids = torch.randint(4, vocab, (B, K), generator=g)
    lengths = torch.randint(2 + 3 * rank, K + 1, (B,), generator=g)  # rank 1's completions are longer
    completion_mask = (torch.arange(K) < lengths.unsqueeze(1)).long()
    with torch.no_grad():
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, torch.cat([prompt_mask, completion_mask], 1), K
        )
    noise = lambda: 0.05 * torch.randn(B, K, generator=g, dtype=logp.dtype)  # noqa: E731
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": logp + noise(), "ref_per_token_logps": logp + noise(),
        "num_items_in_batch": trainer.accelerator.gather(completion_mask.sum()).sum(),
    }  # fmt: skip


def _loss_and_grad(trainer, ddp, inputs):
    ddp.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(ddp, inputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in ddp.module.parameters()])
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return loss.item(), grad, metrics


def _per_process_mask_differs(trainer, inputs, quantile) -> bool:
    """Whether this rank's own quantile (what rlhf_fast computed before) masks other tokens than TRL's."""
    with torch.no_grad():
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        _, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, K, compute_entropy=True
        )
    mask = inputs["completion_mask"].bool()
    global_mask = trainer.get_high_entropy_mask(entropies, mask, 1 - quantile)
    local_mask = (entropies >= torch.quantile(entropies[mask].float(), 1 - quantile)) & mask
    return bool((global_mask != local_mask).any())


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))  # fmt: skip
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    results = {}
    for case, config in CASES.items():
        trainer = grpo_trainer(model_dir, os.path.join(out_dir, case), steps=1, **config)
        assert trainer.accelerator.num_processes == WORLD
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = _batch(trainer, rank)
        ddp = trainer.accelerator.prepare_model(trainer.model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        stock = _loss_and_grad(trainer, ddp, inputs)
        ours = _loss_and_grad(rf_trl.enable(trainer), ddp, inputs)
        differs = _per_process_mask_differs(trainer, inputs, config["top_entropy_quantile"]) \
            if "top_entropy_quantile" in config else None  # fmt: skip
        results[case] = dict(stock=stock, ours=ours, per_process_mask_differs=differs)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_grpo_loss_and_gradient_equal_stock(tiny_dir, tmp_path):  # noqa: F811
    mp.spawn(_worker, args=(_free_port(), str(tiny_dir), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for case, config in CASES.items():
        for rank, results in enumerate(ranks):
            (stock_loss, stock_grad, stock_metrics), (ours_loss, ours_grad, ours_metrics) = results[case]["stock"], results[case]["ours"]  # fmt: skip
            where = f"{case}, rank {rank}"
            assert ours_loss == pytest.approx(stock_loss, rel=RTOL, abs=ATOL), f"{where}: loss"
            err = (ours_grad - stock_grad).abs().max().item()
            assert err <= ATOL + RTOL * stock_grad.abs().max().item(), f"{where}: max |grad error| {err:.3g}"
            for name, value in stock_metrics.items():
                assert ours_metrics.get(name) == pytest.approx(value, rel=RTOL, abs=ATOL), f"{where}: metric {name}"
        # DDP averaged the gradient: both ranks hold the same one (so ours went through the wrapper's sync)
        assert torch.equal(ranks[0][case]["ours"][1], ranks[1][case]["ours"][1]), f"{case}: gradients not synced"
        if "top_entropy_quantile" in config:
            assert any(r[case]["per_process_mask_differs"] for r in ranks), (
                f"{case}: a per-process quantile masks the same tokens, so the test cannot tell it from TRL's"
            )
        if config["loss_type"] in ("grpo", "dapo"):
            assert any(r[case]["stock"][2]["clip_ratio/region_mean"] > 0 for r in ranks), f"{case}: nothing clipped"
