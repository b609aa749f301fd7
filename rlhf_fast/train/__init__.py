"""Training on Hugging Face models with the fused ops: SFT and a Bradley-Terry reward model.

    from rlhf_fast.train import ModelConfig, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    SFTTrainer(SFTConfig(out_dir="runs/sft")).train()
    RewardTrainer(RewardConfig(out_dir="runs/rm", model=ModelConfig(path="runs/sft/model"))).train()

Also on the command line: ``rlhf-fast sft --help`` and ``rlhf-fast rm --help``. With no data paths
both use the built-in synthetic task (``rlhf_fast.train.task``), whose gold preference is known.

Needs the ``[train]`` extra (transformers, tokenizers, ...): without it, importing this package
raises ``rlhf_fast.extras.MissingExtra`` naming the extra. The names below are imported on first
use, so ``rlhf_fast.train.config`` (and the CLI's --help) does not pay for importing transformers.
"""

from importlib import import_module

from rlhf_fast.extras import require

require("train", "rlhf_fast.train")

_EXPORTS = {
    "ConfigError": "config",
    "DataConfig": "config",
    "LoopConfig": "config",
    "ModelConfig": "config",
    "OptimConfig": "config",
    "RewardConfig": "config",
    "RewardLossConfig": "config",
    "SFTConfig": "config",
    "TaskConfig": "config",
    "TokenizerConfig": "config",
    "load_config": "config",
    "DataError": "data",
    "TruncationWarning": "data",
    "Hooks": "loop",
    "Loop": "loop",
    "load_policy": "models",
    "load_tokenizer": "models",
    "RLConfig": "rl.config",
    "RLTrainer": "rl.trainer",
    "RewardTrainer": "reward",
    "load_reward_model": "reward",
    "RewardModel": "reward_model",
    "SFTTrainer": "sft",
    "SyntheticTask": "task",
    "build_tokenizer": "task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
