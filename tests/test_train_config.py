"""Trainer configuration: documented fields, validation messages, files and overrides."""

from __future__ import annotations

import json

import pytest

from rlhf_fast.train.config import (
    ConfigError,
    DataConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    RMConfig,
    SFTConfig,
    iter_fields,
    load_config,
)


@pytest.mark.parametrize("cls", [SFTConfig, RMConfig])
def test_every_field_has_a_docstring(cls):
    keys = [key for key, _, _, doc in iter_fields(cls) if len(doc) > 10]
    assert keys == [key for key, *_ in iter_fields(cls)]
    assert len(keys) > 40


def test_defaults_are_valid_and_sections_keep_their_own_defaults():
    assert RMConfig().optim.lr != SFTConfig().optim.lr
    partial = load_config(RMConfig, None, {"optim.lr": "1e-4"})
    assert partial.optim.lr == 1e-4
    assert partial.optim.warmup_steps == RMConfig().optim.warmup_steps  # untouched key keeps the RM default


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LoopConfig(steps=0), r"train.steps must be >= 1, got 0"),
        (lambda: LoopConfig(steps=5, stop_after=9), r"train.stop_after must be in \[1, train.steps=5\], got 9"),
        (lambda: LoopConfig(precision="fp16"), r"train.precision must be one of auto, fp32, bf16, got 'fp16'"),
        (lambda: LoopConfig(device="tpu"), r"train.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (lambda: OptimConfig(lr=-1), r"optim.lr must be > 0, got -1.0"),
        (lambda: OptimConfig(beta2=1.0), r"optim.beta2 must be in \[0, 1\), got 1.0"),
        (lambda: DataConfig(truncation="cut"), r"data.truncation must be one of truncate, skip, error, got 'cut'"),
        (lambda: DataConfig(max_length=16, max_prompt_length=16), r"data.max_prompt_length must be in \[1, data.max_length=16\), got 16"),
        (lambda: ModelConfig(arch="bert"), r"model.arch must be one of llama, qwen2, gpt2, got 'bert'"),
        (lambda: ModelConfig(hidden_size=30, num_heads=4), r"model.hidden_size must be a multiple of model.num_heads=4, got 30"),
        (lambda: SFTConfig(data=DataConfig(max_length=256)), r"max_position_embeddings=128 is smaller than data.max_length=256"),
    ],
)
def test_invalid_values_name_the_key_and_the_value(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_values_are_coerced_from_strings():
    cfg = load_config(SFTConfig, None, {"train.steps": "7", "train.progress": "false", "optim.lr": "3e-4", "data.max_prompt_length": "none"})
    assert (cfg.train.steps, cfg.train.progress, cfg.optim.lr, cfg.data.max_prompt_length) == (7, False, 3e-4, None)
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got '1.5'"):
        load_config(SFTConfig, None, {"train.steps": "1.5"})
    with pytest.raises(ConfigError, match=r"train.progress must be true or false, got 'maybe'"):
        load_config(SFTConfig, None, {"train.progress": "maybe"})


def test_unknown_keys_list_the_valid_ones(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' in .*rm.yaml; valid keys of optim: lr, weight_decay, beta1, beta2, eps, warmup_steps, min_lr_ratio, grad_clip"):
        load_config(RMConfig, path)
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*valid keys: out_dir, resume, overwrite, model, tokenizer, data, task, optim, train, loss"):
        load_config(RMConfig, path)
    with pytest.raises(ConfigError, match=r"optim must be a mapping"):
        load_config(RMConfig, None, {"optim": 3})


def test_file_then_overrides(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"train": {"steps": 5, "batch_size": 4}, "optim": {"lr": 0.01}}))
    cfg = load_config(SFTConfig, path, {"train.steps": "9"})
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr) == (9, 4, 0.01)
    yaml_path = tmp_path / "sft.yaml"
    yaml_path.write_text("train:\n  steps: 5\noptim:\n  lr: 1e-3\n")  # YAML reads 1e-3 as a string
    assert load_config(SFTConfig, yaml_path).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SFTConfig, tmp_path / "list.yaml")
