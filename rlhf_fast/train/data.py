"""Data: JSONL records validated line by line, tokenized once, cut to length, batched with a resumable order.

SFT records:         {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
Preference records:  {"prompt": str, "chosen": str, "rejected": str}  or  {"chosen": str, "rejected": str}
                     (full texts; chosen/rejected may also be message lists), with optional numbers
                     "margin" and "gold_chosen"/"gold_rejected" (hidden gold scores in Bradley-Terry
                     logit units; with them evaluation reports the ceiling accuracy).
RL prompt records:   {"prompt": str}  or  {"messages": [...]} not ending with an assistant message
                     (rendered by the chat template with the generation prompt: ``chat_prompt``).

Prompt and response are tokenized separately and concatenated (the prompt with the tokenizer's
special tokens, e.g. BOS; the response without, then EOS), so a BPE tokenizer needs any separating
space at the start of the response. In the chat form the prompt is the chat template applied to all
messages but the last, which must be the assistant's; the loss is on that last message only.
A bad line raises DataError "<file>:<line>: field '<name>' ...". Unknown extra fields are ignored.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..reference import IGNORE_INDEX
from .config import DataConfig


class DataError(ValueError):
    """A data file or record is unusable; the message names the file, the line and the field."""


class TruncationWarning(UserWarning):
    """Some examples were longer than data.max_length and were cut (or skipped)."""


class UnknownTokenWarning(UserWarning):
    """More than data.max_unknown_fraction of a file's tokens are the tokenizer's unknown token."""


Record = tuple[str, dict]  # (where: "file:line", the parsed JSON object)


def read_jsonl(path: str | Path, key: str = "data.train_path") -> list[Record]:
    """Every non-blank line of ``path`` as (where, object); DataError for a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file")
    records = []
    with path.open("rb") as f:  # bytes, so that a line that is not UTF-8 is named (text mode raises mid-file)
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
                    "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append((where, obj))
    if not records:
        raise DataError(f"{path}: no examples (the file has no non-blank lines)")
    return records


def in_memory(records: Sequence[dict], name: str) -> list[Record]:
    """Records generated in code (the built-in task), located as "<name>:<index from 1>"."""
    return [(f"<{name}>:{i}", r) for i, r in enumerate(records, start=1)]


def _text(where: str, record: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _number(where: str, record: dict, name: str) -> float:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field '{name}' must be a number, got {type(value).__name__}")
    return float(value)


def _messages(where: str, value, name: str, *, last_role: str | None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{name}[{i}]' must be an object with string 'role' and 'content'")
    if last_role is not None and value[-1]["role"] != last_role:
        raise DataError(f"{where}: field '{name}' must end with a '{last_role}' message, got '{value[-1]['role']}'")
    return value


def _require_chat_template(where: str, tokenizer, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: field '{name}' is in the chat form but the tokenizer has no chat template")


@dataclass
class _Lengths:
    """Applies data.max_length / max_prompt_length / truncation and counts what it changed; counts the
    unknown tokens of the file too (``report`` warns about both)."""

    cfg: DataConfig
    bos_id: int | None
    source: str
    unk_id: int | None = None
    total: int = 0
    changed: int = 0
    first: str = ""
    tokens: int = 0
    unknown: int = 0
    first_unknown: str = ""

    def fit(self, where: str, prompt: list[int], responses: list[list[int]]):
        """(prompt, responses) within max_length, or None to skip; the prompt is shared by all responses."""
        self.total += 1
        if self.unk_id is not None:
            unknown = sum(ids.count(self.unk_id) for ids in (prompt, *responses))
            self.tokens += len(prompt) + sum(len(r) for r in responses)
            self.unknown += unknown
            self.first_unknown = self.first_unknown or (where if unknown else "")
        max_length = self.cfg.max_length
        longest = max(len(r) for r in responses)
        if len(prompt) + longest <= max_length:
            return prompt, responses
        if self.cfg.truncation == "error":
            raise DataError(
                f"{where}: prompt + response is {len(prompt) + longest} tokens, more than "
                f"data.max_length={max_length} (data.truncation=error)"
            )
        self.changed += 1
        self.first = self.first or where
        if self.cfg.truncation == "skip":
            return None
        keep = min(len(prompt), max(self.cfg.prompt_budget, max_length - longest))
        if keep < len(prompt):
            head = [prompt[0]] if self.bos_id is not None and prompt and prompt[0] == self.bos_id else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):]
        room = max_length - len(prompt)
        return prompt, [r[:room] for r in responses]

    def report(self) -> None:
        if self.tokens and self.unknown / self.tokens > self.cfg.max_unknown_fraction:
            warnings.warn(
                f"{self.source}: {self.unknown / self.tokens:.1%} of its {self.tokens} tokens are the tokenizer's unknown "
                f"token (more than data.max_unknown_fraction={self.cfg.max_unknown_fraction}); first at {self.first_unknown}. "
                "The tokenizer's vocabulary does not cover this text: use the model's own tokenizer (tokenizer.path) "
                "or one trained on such text.",
                UnknownTokenWarning,
                stacklevel=3,
            )
        if self.changed:
            action = "skipped" if self.cfg.truncation == "skip" else "truncated (prompt kept from its end, response cut)"
            warnings.warn(
                f"{self.source}: {self.changed} of {self.total} examples ({self.changed / self.total:.1%}) are longer than data.max_length="
                f"{self.cfg.max_length} tokens and were {action}; first at {self.first}. "
                "Set data.truncation=error to reject them, or raise data.max_length.",
                TruncationWarning,
                stacklevel=3,
            )


def _unknown_id(tokenizer) -> int | None:
    """The id of the tokenizer's unknown token, None when it has none or it doubles as a token that
    text legitimately holds (GPT-2's <|endoftext|> is its unk, bos and eos)."""
    unk = tokenizer.unk_token_id
    return None if unk in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) else unk


def _encode(tokenizer, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _strip_eos(ids: list[int], tokenizer) -> list[int]:
    """Drop an EOS a tokenizer appends to every encoding (the response adds its own)."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos != tokenizer.bos_token_id and ids and ids[-1] == eos:
        return ids[:-1]
    return ids


def _with_eos(ids: list[int], tokenizer, append: bool) -> list[int]:
    eos = tokenizer.eos_token_id
    if append and eos is not None and (not ids or ids[-1] != eos):
        return ids + [eos]
    return ids


@dataclass(frozen=True)
class SFTExample:
    """One demonstration: ``ids`` = prompt + response tokens; the loss is on ids[prompt_len:]."""

    ids: tuple[int, ...]
    prompt_len: int


@dataclass(frozen=True)
class PreferenceExample:
    """One comparison: full token sequences of the chosen and the rejected text."""

    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float | None = None
    gold: tuple[float, float] | None = None


def _chat_split(where: str, tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt text, response text) of a conversation: the template without and with the last message."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: field 'messages': the chat template does not render the conversation as its prefix plus the last message")
    return prompt, full[len(prompt):]


def chat_prompt(where: str, tokenizer, messages) -> str:
    """A conversation that the policy answers (an RL prompt) as text: the chat template with the
    generation prompt. The rollout encodes prompts with special tokens, so a BOS that the template
    writes is dropped when the tokenizer adds its own."""
    _require_chat_template(where, tokenizer, "messages")
    messages = _messages(where, messages, "messages", last_role=None)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'messages' of a prompt must not end with an 'assistant' message: the policy writes the answer")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer("", add_special_tokens=True)["input_ids"]:
        text = text[len(bos) :]
    return text


def build_sft(records: list[Record], tokenizer, cfg: DataConfig, source: str) -> list[SFTExample]:
    """Validate, tokenize and cut SFT records (see the module docstring for the two forms)."""
    plain: list[tuple[int, str, str]] = []  # (index, prompt, response), tokenized in two batched calls
    chat: list[tuple[int, str, str]] = []
    for i, (where, record) in enumerate(records):
        if "messages" in record:
            _require_chat_template(where, tokenizer, "messages")
            messages = _messages(where, record["messages"], "messages", last_role="assistant")
            chat.append((i, *_chat_split(where, tokenizer, messages)))
        else:
            prompt = _text(where, record, "prompt", allow_empty=True)
            plain.append((i, prompt, _text(where, record, "response")))
    encoded: list[tuple[list[int], list[int]] | None] = [None] * len(records)
    prompts = _encode(tokenizer, [p for _, p, _ in plain], special=True)
    responses = _encode(tokenizer, [r for _, _, r in plain], special=False)
    for (i, _, _), p, r in zip(plain, prompts, responses):
        encoded[i] = (_strip_eos(p, tokenizer), _with_eos(r, tokenizer, cfg.append_eos))
    prompts = _encode(tokenizer, [p for _, p, _ in chat], special=False)
    responses = _encode(tokenizer, [r for _, _, r in chat], special=False)
    for (i, _, _), p, r in zip(chat, prompts, responses):
        encoded[i] = (p, r)

    lengths = _Lengths(cfg, tokenizer.bos_token_id, source, _unknown_id(tokenizer))
    examples = []
    for (where, _), (prompt, response) in zip(records, encoded):
        if not response:
            raise DataError(f"{where}: the response has no tokens")
        fitted = lengths.fit(where, prompt, [response])
        if fitted is not None:
            prompt, (response,) = fitted
            examples.append(SFTExample(tuple(prompt + response), len(prompt)))
    lengths.report()
    if not examples:
        raise DataError(f"{source}: no examples left (all {len(records)} were skipped as too long)")
    return examples


def _preference_text(where: str, tokenizer, record: dict, name: str) -> str:
    value = record.get(name)
    if isinstance(value, list):
        _require_chat_template(where, tokenizer, name)
        return tokenizer.apply_chat_template(_messages(where, value, name, last_role=None), tokenize=False)
    return _text(where, record, name)


def build_preferences(records: list[Record], tokenizer, cfg: DataConfig, source: str, *, use_margin: bool = False) -> list[PreferenceExample]:
    """Validate, tokenize and cut preference records; a pair keeps one shared (possibly truncated) prompt."""
    rows = []
    for where, record in records:
        chosen = _preference_text(where, tokenizer, record, "chosen")
        rejected = _preference_text(where, tokenizer, record, "rejected")
        prompt = _text(where, record, "prompt", allow_empty=True) if "prompt" in record else None
        if prompt is not None and (isinstance(record["chosen"], list) or isinstance(record["rejected"], list)):
            raise DataError(f"{where}: field 'prompt' cannot go with chosen/rejected message lists (they are full conversations)")
        margin = None
        if use_margin:
            if "margin" not in record:
                raise DataError(f"{where}: missing field 'margin' (loss.use_margin is set)")
            margin = _number(where, record, "margin")
        gold = None
        if "gold_chosen" in record or "gold_rejected" in record:
            if not ("gold_chosen" in record and "gold_rejected" in record):
                missing = "gold_rejected" if "gold_chosen" in record else "gold_chosen"
                raise DataError(f"{where}: missing field '{missing}' (gold scores come in pairs)")
            gold = (_number(where, record, "gold_chosen"), _number(where, record, "gold_rejected"))
        rows.append((where, prompt, chosen, rejected, margin, gold))

    # Pairs with a prompt: prompt with special tokens, responses without. Full texts: with.
    encoded: list[tuple[list[int], list[int], list[int]] | None] = [None] * len(rows)
    with_prompt = [i for i, r in enumerate(rows) if r[1] is not None]
    full_text = [i for i, r in enumerate(rows) if r[1] is None]
    prompts = _encode(tokenizer, [rows[i][1] for i in with_prompt], special=True)
    chosen = _encode(tokenizer, [rows[i][2] for i in with_prompt], special=False)
    rejected = _encode(tokenizer, [rows[i][3] for i in with_prompt], special=False)
    for i, p, c, rj in zip(with_prompt, prompts, chosen, rejected):
        encoded[i] = (_strip_eos(p, tokenizer), _with_eos(c, tokenizer, cfg.append_eos), _with_eos(rj, tokenizer, cfg.append_eos))
    chosen = _encode(tokenizer, [rows[i][2] for i in full_text], special=True)
    rejected = _encode(tokenizer, [rows[i][3] for i in full_text], special=True)
    for i, c, rj in zip(full_text, chosen, rejected):
        c, rj = (_with_eos(_strip_eos(x, tokenizer), tokenizer, cfg.append_eos) for x in (c, rj))
        encoded[i] = ([], c, rj)

    lengths = _Lengths(cfg, tokenizer.bos_token_id, source, _unknown_id(tokenizer))
    examples = []
    for (where, _, _, _, margin, gold), (prompt, c, rj) in zip(rows, encoded):
        if not c or not rj:
            raise DataError(f"{where}: field '{'chosen' if not c else 'rejected'}' has no tokens")
        fitted = lengths.fit(where, prompt, [c, rj])
        if fitted is not None:
            prompt, (c, rj) = fitted
            examples.append(PreferenceExample(tuple(prompt + c), tuple(prompt + rj), margin, gold))
    lengths.report()
    if not examples:
        raise DataError(f"{source}: no examples left (all {len(records)} were skipped as too long)")
    return examples


def split_holdout(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, eval): the last ``fraction`` of the records held out (at least one when fraction > 0)."""
    if fraction <= 0:
        return records, []
    n_eval = max(1, int(round(len(records) * fraction)))
    if n_eval >= len(records):
        raise DataError(f"data.eval_fraction={fraction} leaves no training lines out of {len(records)}")
    return records[:-n_eval], records[-n_eval:]


def load_records(cfg: DataConfig, task, task_cfg, kind: str) -> tuple[tuple[list[Record], str], tuple[list[Record], str]]:
    """((train records, name), (eval records, name)) from the JSONL files or the built-in task.

    ``kind`` is "sft" or "pref"; ``task`` is a SyntheticTask, ``task_cfg`` the task config section.
    """
    if cfg.train_path is None:
        train = in_memory(task.records(f"{kind}_train", getattr(task_cfg, f"{kind}_train"), task_cfg.seed), f"built-in {kind}_train")
        train_name = f"built-in {kind}_train"
        if cfg.eval_path is None:
            count = getattr(task_cfg, f"{kind}_eval")
            return (train, train_name), (in_memory(task.records(f"{kind}_eval", count, task_cfg.seed), f"built-in {kind}_eval"), f"built-in {kind}_eval")
    else:
        train = read_jsonl(cfg.train_path, "data.train_path")
        train_name = cfg.train_path
        if cfg.eval_path is None:
            train, held = split_holdout(train, cfg.eval_fraction)
            return (train, train_name), (held, f"{cfg.train_path} (last {len(held)} lines)")
    return (train, train_name), (read_jsonl(cfg.eval_path, "data.eval_path"), cfg.eval_path)


@dataclass
class SFTBatch:
    """input_ids, attention_mask, labels: [B, T]. labels[b, t] is the target of position t (the next
    token when it belongs to the response, else IGNORE_INDEX), so logits [B, T, V] need no shift."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> SFTBatch:
        return SFTBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels)))

    def weight(self) -> int:
        """Tokens the loss averages over."""
        return int((self.labels != IGNORE_INDEX).sum())


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> SFTBatch:
    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
        # position t predicts ids[t + 1]; only response tokens are targets
        first = max(e.prompt_len, 1)
        labels[row, first - 1 : len(ids) - 1] = ids[first:]
    return SFTBatch(input_ids, mask, labels)


@dataclass
class PreferenceBatch:
    """input_ids, attention_mask: [2B, T], the B chosen sequences then the B rejected ones (one forward
    pass for both); margin [B] or None; gold [B, 2] (chosen, rejected) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor | None = None
    gold: torch.Tensor | None = None

    def to(self, device) -> PreferenceBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PreferenceBatch(move(self.input_ids), move(self.attention_mask), move(self.margin), move(self.gold))

    def weight(self) -> int:
        """Pairs the loss averages over."""
        return self.input_ids.shape[0] // 2


def collate_preferences(examples: Sequence[PreferenceExample], pad_id: int) -> PreferenceBatch:
    sequences = [e.chosen for e in examples] + [e.rejected for e in examples]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    margin = None
    if all(e.margin is not None for e in examples):
        margin = torch.tensor([e.margin for e in examples], dtype=torch.float32)
    gold = None
    if all(e.gold is not None for e in examples):
        gold = torch.tensor([e.gold for e in examples], dtype=torch.float32)
    return PreferenceBatch(input_ids, mask, margin, gold)


@dataclass
class BatchStream:
    """Shuffled micro-batches with a resumable position, sharded across processes.

    Epoch e visits the examples in a permutation drawn from (seed, e). Each micro-batch takes the next
    batch_size * world_size positions of it, and process r keeps the r-th slice of batch_size; a
    remainder smaller than that is dropped and the next epoch begins. The position is (epoch, offset),
    saved in checkpoints: a resumed run sees exactly the batches the uninterrupted run would have.
    """

    examples: Sequence
    batch_size: int
    collate: Callable[[Sequence], object]
    seed: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    offset: int = 0
    _order: tuple[int, list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.examples) < self.batch_size * self.world_size:
            raise DataError(
                f"{len(self.examples)} training examples are fewer than one micro-batch of "
                f"train.batch_size={self.batch_size} x {self.world_size} process(es)"
            )

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def next(self):
        span = self.batch_size * self.world_size
        if self.offset + span > len(self.examples):
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.batch_size
        indices = self._permutation()[start : start + self.batch_size]
        self.offset += span
        return self.collate([self.examples[i] for i in indices])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "num_examples": len(self.examples), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != len(self.examples) or state["world_size"] != self.world_size:
            raise DataError(
                f"cannot resume the data position: the checkpoint was taken with {state['num_examples']} examples "
                f"on {state['world_size']} process(es), this run has {len(self.examples)} on {self.world_size}"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def eval_batches(examples: Sequence, batch_size: int, collate, rank: int = 0, world_size: int = 1) -> Iterator:
    """The examples this process evaluates (every world_size-th, from its rank), in batches, in order."""
    mine = examples[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield collate(mine[start : start + batch_size])


def idle_eval_batches(examples: Sequence, batch_size: int, collate, rank: int = 0, world_size: int = 1) -> Iterator:
    """Batches of one example, to be run and their results dropped, so that this process makes as many
    evaluation forwards as the busiest one does with ``eval_batches``: the forward of a model sharded
    with FSDP2 is a collective, which every process must join."""
    busiest, mine = -(-len(examples) // world_size), len(examples[rank::world_size])
    for _ in range(-(-busiest // batch_size) - -(-mine // batch_size)):
        yield collate(examples[:1])
