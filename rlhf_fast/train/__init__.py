"""Training on Hugging Face models with the fused ops: SFT (``sft``), a Bradley-Terry reward model
(``rm``) and RL against it (``rl``), on one loop (``loop``).

    from rlhf_fast.train import ModelConfig, RMConfig, RMTrainer, SFTConfig, SFTTrainer
    SFTTrainer(SFTConfig(out_dir="runs/sft")).train()
    RMTrainer(RMConfig(out_dir="runs/rm", model=ModelConfig(path="runs/sft/model"))).train()

Also on the command line: ``rlhf-fast sft --help``, ``rlhf-fast rm --help`` and ``rlhf-fast rl --help``.
With no data paths they use the built-in synthetic task (``rlhf_fast.train.task``), whose gold
preference is known.

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
    "RMConfig": "config",
    "RMLossConfig": "config",
    "SFTConfig": "config",
    "TaskConfig": "config",
    "TokenizerConfig": "config",
    "load_config": "config",
    "DataError": "data",
    "TruncationWarning": "data",
    "UnknownTokenWarning": "data",
    "Hooks": "loop",
    "Loop": "loop",
    "load_policy": "models",
    "load_tokenizer": "models",
    "RLConfig": "rl.config",
    "RLTrainer": "rl.trainer",
    "RMTrainer": "rm",
    "load_reward_model": "rm",
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
