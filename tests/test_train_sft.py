"""SFTTrainer and the shared loop: a tiny local model trains; accumulation, resume and checkpoints are exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import rlhf_fast
from rlhf_fast.train import checkpoint
from rlhf_fast.train.config import SFTConfig, load_config
from rlhf_fast.train.metrics import read_metrics
from rlhf_fast.train.sft import SFTTrainer, sft_evaluate


def tiny(out_dir, **overrides) -> SFTConfig:
    options = {
        "out_dir": str(out_dir),
        "model.hidden_size": 32,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.intermediate_size": 64,
        "task.sft_train": 96,
        "task.sft_eval": 32,
        "train.batch_size": 8,
        "train.steps": 12,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.progress": False,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
    }
    options.update(overrides)
    return load_config(SFTConfig, None, options)


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_model_trains_every_parameter_and_the_loss_falls(tmp_path, arch):
    trainer = SFTTrainer(tiny(tmp_path, **{"model.arch": arch}))
    before = params(trainer.model)
    evaluate = trainer.loop.eval_fn
    with torch.no_grad():
        initial = evaluate(trainer.model)["loss"]
    final = trainer.train()

    train_losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(train_losses) == 12 and all(math.isfinite(x) for x in train_losses)
    assert sum(train_losses[-3:]) < sum(train_losses[:3])
    assert final["loss"] < initial - 0.1
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert unchanged == []

    # outputs: a transformers directory with the trained weights and the tokenizer, the curves, the config
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    for name, p in saved.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[name]), name
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["eval"]["loss"] == final["loss"]
    assert load_config(SFTConfig, tmp_path / "config.yaml") == trainer.config


def test_loss_goes_through_the_fused_sft_loss(tmp_path, monkeypatch):
    calls = []
    fused = rlhf_fast.sft_loss

    def spy(logits, labels, **kw):
        calls.append(tuple(logits.shape))
        return fused(logits, labels, **kw)

    monkeypatch.setattr(rlhf_fast, "sft_loss", spy)
    SFTTrainer(tiny(tmp_path, **{"train.steps": 1})).train()
    assert calls and len(calls[0]) == 3  # [B, T, V] logits, unshifted (labels carry the shift)


def _first_step_grads(out_dir, batch_size, grad_accum):
    options = {"train.batch_size": batch_size, "train.grad_accum": grad_accum, "train.device": "cpu"}
    trainer = SFTTrainer(tiny(out_dir, **options))
    micro = trainer.loop.micro_batches()
    trainer.loop.forward_backward(micro)
    return trainer, micro, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_normalises_by_tokens(tmp_path):
    """8 examples in one micro-batch or in 2 x 4 give the same gradient: the mean over all response
    tokens, not the mean of per-micro-batch means."""
    _, _, whole = _first_step_grads(tmp_path / "a", 8, 1)
    trainer, micro, split = _first_step_grads(tmp_path / "b", 4, 2)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)

    # The naive average of micro-batch means differs, so the check above has teeth.
    assert micro[0].weight() != micro[1].weight()
    trainer.model.zero_grad()
    for batch in micro:
        (trainer.loop.loss_fn(trainer.model, batch)[0] / 2).backward()
    naive = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert max(float((naive[n] - whole[n]).abs().max()) for n in whole) > 1e-4


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """3 + 3 steps with a resume give bit-identical parameters to 6 straight on CPU (dropout on, so the
    RNG state must be restored too)."""
    options = {"model.arch": "gpt2", "model.dropout": 0.1, "train.steps": 6, "train.grad_accum": 2, "train.save_every": 2, "train.device": "cpu"}
    straight = SFTTrainer(tiny(tmp_path / "straight", **options))
    straight.train()

    first = SFTTrainer(tiny(tmp_path / "split", **options, **{"train.stop_after": 3}))
    first.train()
    assert first.loop.step == 3 and not (tmp_path / "split" / "model").exists()
    second = SFTTrainer(tiny(tmp_path / "split", **options, resume=True))
    second.train()
    assert second.loop.step == 6

    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    records = [r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["split"] == "train"]
    expected = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    options = {"train.steps": 4, "train.save_every": 2}
    SFTTrainer(tiny(tmp_path, **options, **{"train.stop_after": 2})).train()
    ckpt_dir = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)] == [2]

    real_save = torch.save

    def dies_mid_write(obj, f):
        real_save({"half": torch.zeros(1000)}, f)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space left"):
        SFTTrainer(tiny(tmp_path, **options, resume=True)).train()
    monkeypatch.undo()
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)] == [2]
    assert [p.name for p in ckpt_dir.iterdir()] == ["step_00000002.pt"]  # the temporary file is gone

    # A writer killed outright leaves its temporary file: it is ignored, then cleaned up.
    (ckpt_dir / ".step_00000004.pt.tmp999").write_bytes(b"\x80garbage")
    path, payload = checkpoint.load_latest(ckpt_dir)
    assert path.name == "step_00000002.pt" and payload["step"] == 2
    resumed = SFTTrainer(tiny(tmp_path, **options, resume=True))
    resumed.train()
    assert resumed.loop.step == 4
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000002.pt", "step_00000004.pt"]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    SFTTrainer(tiny(tmp_path, **{"train.steps": 2, "train.save_every": 1})).train()
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step_00000002.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, payload = checkpoint.load_latest(ckpt_dir)
    assert payload["step"] == 1


def test_existing_run_needs_resume(tmp_path, capsys):
    SFTTrainer(tiny(tmp_path / "run", **{"train.steps": 1})).train()
    with pytest.raises(FileExistsError, match="is not empty .*pass --resume"):
        SFTTrainer(tiny(tmp_path / "run", **{"train.steps": 1})).train()
    SFTTrainer(tiny(tmp_path / "fresh", **{"train.steps": 1}, resume=True)).train()
    assert "found no checkpoint" in capsys.readouterr().out


def test_sft_evaluate_is_the_token_weighted_mean(tmp_path):
    trainer = SFTTrainer(tiny(tmp_path, **{"task.sft_eval": 10, "train.device": "cpu"}))
    with torch.no_grad():
        by_one = [sft_evaluate(trainer.model, [e], batch_size=1, pad=0, device=torch.device("cpu")) for e in trainer.eval_examples]
        together = sft_evaluate(trainer.model, trainer.eval_examples, batch_size=4, pad=0, device=torch.device("cpu"))
    expected = sum(m["loss"] * m["tokens"] for m in by_one) / sum(m["tokens"] for m in by_one)
    assert together["loss"] == pytest.approx(expected, rel=1e-5)
