"""Configuration of the SFT and reward-model trainers, and the pieces the RL stage's (``rl.config``)
shares: ``RunConfig`` (out_dir, resume, overwrite), ``require_schedule`` (the ``train`` section's
checks). Nested dataclasses, one docstring per field.

Every section validates itself in ``__post_init__`` (values are coerced to the annotated type first,
so a YAML string "1e-3" becomes a float) and raises ``ConfigError`` naming the key and the value.
A run's configuration comes from the defaults, then a YAML/JSON file, then command-line overrides
(``load_config``); an unknown key is an error that lists the valid keys of its section.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

ARCHS = ("llama", "qwen2", "gpt2")
TRUNCATION_MODES = ("truncate", "skip", "error")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp2")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key, the value and what is allowed."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` (int, float, bool, str, X | None), or ConfigError."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (empty when the source is unavailable)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


class Section:
    """Base of every config section: coerce fields to their types, then ``validate``."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                if isinstance(value, Mapping):
                    base = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                    setattr(self, f.name, from_dict(hints[f.name], value, prefix=self._key(f.name) + ".", base=base))
                continue
            setattr(self, f.name, _coerce(self._key(f.name), value, hints[f.name]))
        self.validate()

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def validate(self) -> None:
        """Check the values; raise ConfigError naming the key. Sections override this."""

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)} {message}, got {getattr(self, name)!r}")

    def require_choice(self, name: str, choices: tuple[str, ...]) -> None:
        self.require(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}")


@dataclass
class ModelConfig(Section):
    """Which causal LM to train (SFT) or to put under the reward head (RM)."""

    SECTION: ClassVar[str] = "model"

    path: str | None = None
    """Local directory of a Hugging Face model: config.json and weights (trained from there), or config.json
    alone (random init); a reward-model directory for `rm` continues from it. Nothing is ever downloaded.
    Unset: build `arch` with the sizes below."""
    arch: str = "llama"
    """Architecture built when `path` is unset: llama, qwen2 or gpt2."""
    hidden_size: int = 64
    """Hidden size of a model built from `arch`."""
    num_layers: int = 2
    """Transformer layers of a model built from `arch`."""
    num_heads: int = 4
    """Attention heads of a model built from `arch` (must divide hidden_size)."""
    intermediate_size: int = 256
    """MLP width of a model built from `arch`."""
    max_position_embeddings: int = 128
    """Longest sequence a model built from `arch` accepts (at least data.max_length)."""
    dropout: float = 0.0
    """Dropout of a model built from `arch` (gpt2: embeddings, residuals, attention; llama, qwen2: attention)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def validate(self) -> None:
        self.require_choice("arch", ARCHS)
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.require(self.hidden_size % self.num_heads == 0, "hidden_size", f"must be a multiple of model.num_heads={self.num_heads}")


@dataclass
class TokenizerConfig(Section):
    """Which tokenizer turns text into token ids."""

    SECTION: ClassVar[str] = "tokenizer"

    path: str | None = None
    """Local directory of a Hugging Face tokenizer. Unset: model.path when that is set, else the
    built-in tokenizer of the synthetic task."""


@dataclass
class DataConfig(Section):
    """Where the examples come from and how they are cut to length.

    Over-long examples (prompt + response longer than max_length) are handled by `truncation`:
    "truncate" keeps the end of the prompt (at least max_prompt_length tokens of it, and a leading BOS)
    and cuts the response on the right, with one warning that counts them; "skip" drops them with a
    warning; "error" stops at the first one, naming the file and line. Full-text preference pairs
    (no prompt) are cut on the right.
    """

    SECTION: ClassVar[str] = "data"

    train_path: str | None = None
    """JSONL training file. SFT: {"prompt", "response"} or {"messages": [...]} per line; RM:
    {"prompt", "chosen", "rejected"} or {"chosen", "rejected"} as full texts. Unset: the built-in
    synthetic task's data (see the task section)."""
    eval_path: str | None = None
    """JSONL held-out file in the same format. Unset: the built-in task's held-out split when
    train_path is unset, else the last eval_fraction of the training lines."""
    eval_fraction: float = 0.05
    """Share of the training lines held out when train_path is set and eval_path is not (0: no evaluation)."""
    max_length: int = 64
    """Most tokens per sequence (prompt + response, with BOS/EOS)."""
    max_prompt_length: int | None = None
    """Tokens of the prompt that truncation keeps at least (its end). Unset: max_length // 2."""
    truncation: str = "truncate"
    """What to do with an over-long example: truncate, skip or error (see above)."""
    append_eos: bool = True
    """End each plain-text response with the tokenizer's EOS token (the chat form relies on its template)."""
    max_unknown_fraction: float = 0.01
    """Warn when more than this share of a file's tokens are the tokenizer's unknown token (its
    vocabulary does not cover the text; the model would learn to write <unk>)."""

    def validate(self) -> None:
        self.require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        self.require(0.0 <= self.max_unknown_fraction <= 1.0, "max_unknown_fraction", "must be in [0, 1]")
        self.require(self.max_length >= 2, "max_length", "must be >= 2")
        if self.max_prompt_length is not None:
            self.require(
                1 <= self.max_prompt_length < self.max_length,
                "max_prompt_length",
                f"must be in [1, data.max_length={self.max_length})",
            )
        self.require_choice("truncation", TRUNCATION_MODES)

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


@dataclass
class TaskConfig(Section):
    """Sizes of the built-in synthetic task's data (used when data.train_path is unset)."""

    SECTION: ClassVar[str] = "task"

    seed: int = 0
    """Seed of the generated examples (independent of train.seed)."""
    sft_train: int = 4000
    """SFT demonstrations to train on."""
    sft_eval: int = 256
    """Held-out SFT demonstrations."""
    pref_train: int = 6000
    """Preference pairs to train the reward model on."""
    pref_eval: int = 1000
    """Held-out preference pairs (the ceiling accuracy is computed on these)."""

    def validate(self) -> None:
        for name in ("sft_train", "pref_train"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("sft_eval", "pref_eval"):
            self.require(getattr(self, name) >= 0, name, "must be >= 0")


@dataclass
class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay, and gradient clipping."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay of matrices and embeddings (never of biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 10
    """Steps of linear warmup from lr / warmup_steps to lr."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def validate(self) -> None:
        self.require(self.lr > 0, "lr", "must be > 0")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        self.require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        self.require(self.eps > 0, "eps", "must be > 0")
        self.require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        self.require(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass
class LoopConfig(Section):
    """The shared training loop: steps, batches, evaluation, checkpoints, precision."""

    SECTION: ClassVar[str] = "train"

    steps: int = 300
    """Optimizer steps of the whole run (the learning-rate schedule spans them)."""
    stop_after: int | None = None
    """Stop once this many steps are done (a checkpoint is written) to split a run into jobs; continue
    with --resume. Unset: run all `steps`."""
    batch_size: int = 32
    """Examples (SFT) or pairs (RM) per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all their tokens (SFT) or pairs (RM)."""
    eval_every: int = 100
    """Evaluate on the held-out data every this many steps, and at the end (0: only at the end)."""
    eval_batch_size: int = 128
    """Examples or pairs per evaluation batch."""
    log_every: int = 10
    """Write mean training metrics to metrics.jsonl every this many steps."""
    save_every: int = 100
    """Write a checkpoint every this many steps, and at the end (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    seed: int = 0
    """Seed of model initialisation, data order and dropout."""
    precision: str = "auto"
    """fp32, bf16 (autocast on CUDA; weights stay float32) or auto (bf16 on CUDA GPUs that support it)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    max_nonfinite_skips: int = 3
    """An optimizer step whose loss or gradient norm is NaN or inf is skipped (weights and AdamW's state
    unchanged, the LR schedule advances) with a warning and the skipped_updates metric; this many
    skipped in a row stop the run with an error naming the step and the likely source."""

    def validate(self) -> None:
        require_schedule(self)
        for name in ("batch_size", "grad_accum"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")


def require_schedule(section) -> None:
    """Check the fields every stage's ``train`` section has (LoopConfig, RLLoopConfig): what
    ``loop.run_steps`` reads, plus eval_batch_size, keep_checkpoints, max_nonfinite_skips, precision
    and device."""
    section.require(section.steps >= 1, "steps", "must be >= 1")
    if section.stop_after is not None:
        section.require(1 <= section.stop_after <= section.steps, "stop_after", f"must be in [1, train.steps={section.steps}]")
    for name in ("eval_batch_size", "log_every", "keep_checkpoints", "max_nonfinite_skips"):
        section.require(getattr(section, name) >= 1, name, "must be >= 1")
    for name in ("eval_every", "save_every"):
        section.require(getattr(section, name) >= 0, name, "must be >= 0")
    section.require_choice("precision", PRECISIONS)
    section.require(
        section.device in ("auto", "cpu", "cuda") or section.device.startswith("cuda:"),
        "device",
        "must be auto, cpu, cuda or cuda:N",
    )


@dataclass
class DistConfig(Section):
    """How a run under torchrun (WORLD_SIZE > 1) spreads the models over its processes; one process
    trains the whole model with either strategy."""

    SECTION: ClassVar[str] = "dist"

    strategy: str = "ddp"
    """ddp: every process holds the whole model, gradients are all-reduced (DistributedDataParallel);
    fsdp2: parameters, gradients and AdamW's state are sharded over the processes (torch's
    fully_shard, each decoder layer a group), for models that do not fit one GPU; the trained models
    and RL's frozen reference and reward model are all sharded, checkpoints are sharded
    (torch.distributed.checkpoint; --resume needs the same number of processes), the final model
    directory is consolidated by rank 0."""

    def validate(self) -> None:
        self.require_choice("strategy", STRATEGIES)


@dataclass
class RMLossConfig(Section):
    """Options of the Bradley-Terry loss, passed to rlhf_fast.pairwise_reward_loss."""

    SECTION: ClassVar[str] = "loss"

    center_coef: float = 0.001
    """Weight of the centring penalty on the squared sum of a pair's scores, which keeps the reward
    model's scores near 0 (useful when RL adds them to other scores)."""
    use_margin: bool = False
    """Pass each pair's "margin" field (required on every line) as the loss margin."""

    def validate(self) -> None:
        self.require(self.center_coef >= 0, "center_coef", "must be >= 0")


@dataclass
class RunConfig(Section):
    """What every stage's configuration starts with: where the run goes, and whether it continues or
    replaces a run there. Each stage sets its own out_dir default."""

    out_dir: str = ""
    """Output directory."""
    resume: bool = False
    """Continue the run in out_dir from its newest checkpoint that loads (starts at step 0, with a note,
    when there is none; an error when there are checkpoints and none loads)."""
    overwrite: bool = False
    """Start a fresh run in an out_dir that holds one: delete its files (checkpoints/, metrics, the saved
    model) first; an out_dir holding other files is still refused. Without this or resume, a non-empty
    out_dir is an error."""

    def validate(self) -> None:
        self.require(bool(self.out_dir), "out_dir", "must be a directory path")
        self.require(not (self.resume and self.overwrite), "overwrite",
                     "must be false with resume=true (resume continues the run in out_dir, overwrite deletes it)")


@dataclass
class SFTConfig(RunConfig):
    """`rlhf-fast sft`: instruction finetuning of a causal LM on (prompt, response) pairs."""

    out_dir: str = "runs/sft"
    """Output directory: checkpoints/, metrics.jsonl, metrics.png, config.yaml and the final model/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> None:
        super().validate()
        _check_positions(self.model, self.data)


@dataclass
class RMConfig(RunConfig):
    """`rlhf-fast rm`: a reward model (backbone + scalar head) trained on preference pairs."""

    out_dir: str = "runs/rm"
    """Output directory: checkpoints/, metrics.jsonl, metrics.png, config.yaml and the final reward_model/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=20))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=64))
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> None:
        super().validate()
        _check_positions(self.model, self.data)


def _check_positions(model: ModelConfig, data: DataConfig) -> None:
    if model.path is None and model.max_position_embeddings < data.max_length:
        raise ConfigError(
            f"model.max_position_embeddings={model.max_position_embeddings} is smaller than "
            f"data.max_length={data.max_length}"
        )


def from_dict(cls: type, data: Mapping[str, Any], *, prefix: str = "", source: str = "", base=None):
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise ConfigError listing the valid ones.

    Keys that ``data`` leaves out keep their value in ``base`` (default: ``cls()``), so a partial section
    in a file changes only the keys it names.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'the configuration'} must be a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f" in {source}" if source else ""
            section = f" of {prefix.rstrip('.')}" if prefix else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{where}; valid keys{section}: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    base = cls() if base is None else base
    kwargs = {}
    for name in names:
        value = data.get(name, getattr(base, name))
        if dataclasses.is_dataclass(hints[name]) and name in data:
            value = from_dict(hints[name], value, prefix=f"{prefix}{name}.", source=source, base=getattr(base, name))
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON configuration file as a dict (``.json`` is parsed as JSON, anything else as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse configuration file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b" (creating the inner mapping)."""
    *parents, leaf = key.split(".")
    for part in parents:
        inner = data.setdefault(part, {})
        if not isinstance(inner, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        data = inner
    data[leaf] = value


def load_config(cls: type, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None):
    """Defaults, then the file at ``path`` (YAML/JSON), then ``overrides`` ({"optim.lr": "3e-4"})."""
    data = read_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return from_dict(cls, data, source=str(path) if path is not None else "")


def iter_fields(cls: type, prefix: str = "", defaults=None):
    """(dotted key, field type, default, doc) of every leaf option of ``cls``, sections in order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], f"{prefix}{f.name}.", getattr(defaults, f.name))
        else:
            yield f"{prefix}{f.name}", hints[f.name], getattr(defaults, f.name), docs.get(f.name, "")
