"""Policies and tokenizers: Hugging Face causal LMs from a local directory or built from a config.

Nothing is downloaded: every ``from_pretrained`` here passes ``local_files_only=True``, and a
missing directory is an error that names the config key. The tokenizer/model vocabulary check runs
at start-up, before any data is tokenized or any step is taken.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, ModelConfig, TokenizerConfig
from .quiet import quiet_transformers

def _require_dir(path: str, key: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{key}={path!r} is not a directory (nothing is downloaded: give a local path)")
    return directory


def is_reward_model_dir(path: str | Path) -> bool:
    from .reward_model import CONFIG_NAME

    return (Path(path) / CONFIG_NAME).is_file()


def load_tokenizer(tokenizer: TokenizerConfig, model: ModelConfig):
    """The tokenizer of ``tokenizer.path``, else of ``model.path``, else the synthetic task's built-in one.

    A tokenizer without a pad token pads with its EOS token (padding is masked, never learned).
    """
    from .task import build_tokenizer

    if tokenizer.path is not None:
        path, key = tokenizer.path, "tokenizer.path"
    elif model.path is not None:
        path, key = model.path, "model.path"
    else:
        return build_tokenizer()
    directory = _require_dir(path, key)
    try:
        tok = read_tokenizer(directory)
    except Exception as exc:
        raise ConfigError(f"cannot load a tokenizer from {key}={path!r}: {type(exc).__name__}: {exc}") from exc
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


# Classes that hold a whole tokenizer in tokenizer.json, with no model of their own (the built-in task's, a
# user's own): AutoTokenizer, given a directory whose config.json names a model type (qwen2, llama), would
# load that model's tokenizer class instead, which adds its own special tokens (one more id) and rules.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def read_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory``, as the class it was saved as: a generic tokenizer.json one
    loads as itself (same vocabulary, special tokens and template), any other through AutoTokenizer."""
    import json

    import transformers

    directory = Path(directory)
    config = directory / "tokenizer_config.json"
    saved_class = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.is_file() else None
    if saved_class in GENERIC_TOKENIZER_CLASSES and (directory / "tokenizer.json").is_file():
        return getattr(transformers, saved_class).from_pretrained(str(directory), local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def tokenizer_vocab_size(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def check_vocab(tokenizer, model_vocab_size: int, *, where: str = "model") -> None:
    """Every id the tokenizer can emit must index the model's embedding; a larger model vocabulary is
    fine (padded embedding rows, as in Qwen2)."""
    need = tokenizer_vocab_size(tokenizer)
    if need > model_vocab_size:
        raise ConfigError(
            f"tokenizer/model vocabulary mismatch: the tokenizer produces ids up to {need - 1} "
            f"({len(tokenizer)} tokens, {type(tokenizer).__name__}) but the {where} has an embedding of {model_vocab_size} rows: "
            f"{need} ids against {model_vocab_size}. Pass tokenizer.path= the tokenizer the {where} was trained with "
            "(a directory rlhf-fast wrote holds it, saved beside the weights), or build the model for this tokenizer"
        )


def arch_config(model: ModelConfig, tokenizer):
    """A transformers config of ``model.arch`` with the sizes of ``model`` and the tokenizer's vocabulary."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    vocab = tokenizer_vocab_size(tokenizer)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=model.hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_heads,
            n_inner=model.intermediate_size,
            n_positions=model.max_position_embeddings,
            resid_pdrop=model.dropout,
            embd_pdrop=model.dropout,
            attn_pdrop=model.dropout,
            **special,
        )
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model.arch]
    return config_class(
        vocab_size=vocab,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_heads,
        max_position_embeddings=model.max_position_embeddings,
        attention_dropout=model.dropout,
        tie_word_embeddings=False,
        **special,
    )


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin")) or any(directory.glob("*.safetensors.index.json"))


@quiet_transformers()
def load_policy(model: ModelConfig, tokenizer) -> torch.nn.Module:
    """A causal LM (float32): from ``model.path`` (weights, or random init from its config.json alone)
    or built from ``model.arch``. Raises ConfigError when the tokenizer's ids do not fit its vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.path is None:
        lm = AutoModelForCausalLM.from_config(arch_config(model, tokenizer))
    else:
        directory = _require_dir(model.path, "model.path")
        if is_reward_model_dir(directory):
            raise ConfigError(f"model.path={model.path!r} is a reward model, not a causal LM")
        try:
            if _has_weights(directory):
                lm = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
            else:
                config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
                lm = AutoModelForCausalLM.from_config(config)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a causal LM from model.path={model.path!r}: {exc}") from exc
    lm = lm.float()
    check_vocab(tokenizer, lm.get_input_embeddings().num_embeddings)
    if model.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    return lm
