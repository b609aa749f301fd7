"""The built-in synthetic instruction-following task: its tokenizer, prompts, hidden gold score and data.

Nothing is downloaded: the vocabulary, the tokenizer and every example are generated here.

    prompt    "write {n} words about {topic} :"             n in 3..8, one of 8 topics
    response  words from a 44-word vocabulary (4 per topic, 12 fillers), then EOS

Gold score (hidden from every model), in Bradley-Terry logit units:

    gold = topic_weight * good / words - length_weight * |words - n|

where ``good`` counts the response words in a hidden set of 8 favourite words (``GOOD_WORDS``, one
per topic, whatever the prompt's topic: the labeller's taste). The best responses are n favourite
words (gold = topic_weight); any other length or word scores less.

1. SFT demonstrations come from a mediocre writer who stays on topic: each word is one of the
   topic's 4 words with probability ``demo_on_topic`` (so a favourite word only a quarter of that
   time), else any other word; the length is n +- ``demo_length_jitter``. An SFT policy that
   imitates it scores far below the best responses, which leaves an RL stage room to improve.
2. Preference pairs: two responses to one prompt from a broader writer (its rate of favourite words
   is drawn uniformly in [0, 1] per response, the length is n +- ``pair_length_jitter``). The first is
   labelled chosen with probability sigmoid(gold_a - gold_b) (Bradley-Terry), so no model can beat
   the ceiling accuracy E[sigmoid(|gold_a - gold_b|)], which is known per pair (``gold_chosen``,
   ``gold_rejected`` fields of each record).

Why a fixed favourite set rather than "words of the prompt's topic": a topic-by-word table is slow
for a small transformer to learn from noisy pairs (a CI-sized reward model stalled near 86% of the
ceiling's margin over chance), while a fixed set is learned in a few hundred steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
INSTRUCTION_WORDS = ("write", "words", "about", ":")
TOPIC_WORDS = {
    "sea": ("wave", "fish", "boat", "salt"),
    "forest": ("tree", "moss", "deer", "leaf"),
    "city": ("road", "tower", "bus", "shop"),
    "space": ("star", "moon", "orbit", "comet"),
    "kitchen": ("pan", "bread", "spoon", "oven"),
    "music": ("drum", "song", "piano", "beat"),
    "winter": ("snow", "ice", "frost", "scarf"),
    "farm": ("cow", "barn", "hay", "goat"),
}
GOOD_WORDS = frozenset(words[0] for words in TOPIC_WORDS.values())
FILLER_WORDS = ("the", "and", "very", "some", "big", "old", "new", "red", "soft", "loud", "warm", "slow")
RESPONSE_WORDS = tuple(w for words in TOPIC_WORDS.values() for w in words) + FILLER_WORDS
SPLITS = ("sft_train", "sft_eval", "pref_train", "pref_eval")
_GOOD = tuple(sorted(GOOD_WORDS))
PROMPT_RE = re.compile(r"write (\d+) words about (\w+) :")

# A user turn renders as the plain prompt and an assistant turn as the plain response, so the chat
# form {"messages": [...]} and the {"prompt", "response"} form give the same tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} {{ m['content'] }} :"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


def vocabulary() -> list[str]:
    """Every token of the task, special tokens first (so <pad> is id 0, <bos> 1, <eos> 2, <unk> 3)."""
    digits = [str(d) for d in range(10)]
    return [*SPECIAL_TOKENS, *INSTRUCTION_WORDS, *digits, *TOPIC_WORDS, *RESPONSE_WORDS]


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast over ``vocabulary()``: BOS added in front, EOS not, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class SyntheticTask:
    """The demo task; every method is deterministic given its ``seed`` or ``rng``."""

    min_words: int = 3
    """Fewest words a prompt asks for."""
    max_words: int = 8
    """Most words a prompt asks for."""
    topic_weight: float = 12.0
    """Weight of the share of favourite words: the gold of a response of n favourite words, the best score."""
    length_weight: float = 1.0
    """Gold penalty per word of distance to the requested length."""
    demo_on_topic: float = 0.6
    """Probability that a demonstration word is one of the prompt topic's 4 words."""
    demo_length_jitter: int = 2
    """Demonstration lengths are n +- this (uniform)."""
    pair_length_jitter: int = 3
    """Preference-pair response lengths are n +- this (uniform)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words <= 9:
            raise ValueError(f"need 1 <= min_words <= max_words <= 9, got {self.min_words}, {self.max_words}")
        if not 0.0 <= self.demo_on_topic <= 1.0:
            raise ValueError(f"demo_on_topic must be in [0, 1], got {self.demo_on_topic}")

    @property
    def max_response_words(self) -> int:
        return self.max_words + max(self.demo_length_jitter, self.pair_length_jitter)

    def prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_words, self.max_words)
        return f"write {n} words about {rng.choice(list(TOPIC_WORDS))} :"

    def prompts(self, count: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self.prompt(rng) for _ in range(count)]

    @staticmethod
    def parse_prompt(prompt: str) -> tuple[int, str]:
        """(requested words, topic) of a task prompt; ValueError for anything else."""
        match = PROMPT_RE.search(prompt)
        if match is None or match.group(2) not in TOPIC_WORDS:
            raise ValueError(f"not a prompt of the synthetic task: {prompt!r}")
        return int(match.group(1)), match.group(2)

    def gold_score(self, prompt: str, response: str) -> float:
        """topic_weight * good / words - length_weight * |words - n|; special tokens in ``response`` are
        ignored, and an empty response has no good words."""
        n, _ = self.parse_prompt(prompt)
        words = [w for w in response.split() if w not in SPECIAL_TOKENS]
        good = sum(w in GOOD_WORDS for w in words)
        return self.topic_weight * good / max(len(words), 1) - self.length_weight * abs(len(words) - n)

    def best_score(self, prompt: str) -> float:
        """The gold of the best responses: n favourite words."""
        self.parse_prompt(prompt)
        return self.topic_weight

    def _response(self, prompt: str, rng: random.Random, rate: float, jitter: int, preferred: tuple[str, ...]) -> str:
        """n +- jitter words, each from ``preferred`` with probability ``rate``, else from the other words."""
        n, _ = self.parse_prompt(prompt)
        length = max(1, n + rng.randint(-jitter, jitter))
        others = [w for w in RESPONSE_WORDS if w not in preferred]
        return " ".join(rng.choice(preferred) if rng.random() < rate else rng.choice(others) for _ in range(length))

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        """A response of the mediocre demonstrator (on topic, unaware of the favourite words)."""
        topic = self.parse_prompt(prompt)[1]
        return self._response(prompt, rng, self.demo_on_topic, self.demo_length_jitter, TOPIC_WORDS[topic])

    def sft_records(self, count: int, seed: int) -> list[dict]:
        """``count`` {"prompt", "response"} demonstrations."""
        rng = random.Random(seed)
        records = []
        for _ in range(count):
            prompt = self.prompt(rng)
            records.append({"prompt": prompt, "response": self.demonstration(prompt, rng)})
        return records

    def preference_records(self, count: int, seed: int) -> list[dict]:
        """``count`` {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"} Bradley-Terry pairs."""
        rng = random.Random(seed)
        records = []
        for _ in range(count):
            prompt = self.prompt(rng)
            a, b = (self._response(prompt, rng, rng.random(), self.pair_length_jitter, _GOOD) for _ in range(2))
            gold_a, gold_b = self.gold_score(prompt, a), self.gold_score(prompt, b)
            if rng.random() >= _sigmoid(gold_a - gold_b):
                (a, gold_a), (b, gold_b) = (b, gold_b), (a, gold_a)
            records.append({"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": gold_a, "gold_rejected": gold_b})
        return records

    def write(self, out_dir: str | Path, *, seed: int, sft_train: int, sft_eval: int, pref_train: int, pref_eval: int) -> dict[str, Path]:
        """Write the tokenizer and the four JSONL files of the task under ``out_dir``; returns their paths.

        Splits use distinct seeds derived from ``seed``, the same ones the trainers use in memory.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        build_tokenizer().save_pretrained(out / "tokenizer")
        paths = {"tokenizer": out / "tokenizer"}
        sizes = {"sft_train": sft_train, "sft_eval": sft_eval, "pref_train": pref_train, "pref_eval": pref_eval}
        for name, count in sizes.items():
            records = self.records(name, count, seed)
            path = out / f"{name}.jsonl"
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, path)
            paths[name] = path
        return paths

    def records(self, split: str, count: int, seed: int) -> list[dict]:
        """``count`` records of one split (one of SPLITS); each split has its own seed derived from ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        make = self.sft_records if split.startswith("sft") else self.preference_records
        return make(count, seed * len(SPLITS) + SPLITS.index(split))


def ceiling_accuracy(gold_pairs) -> float:
    """Expected accuracy of the gold scorer on Bradley-Terry labels: mean of sigmoid(|g_chosen - g_rejected|)."""
    values = [_sigmoid(abs(gc - gr)) for gc, gr in gold_pairs]
    if not values:
        raise ValueError("ceiling_accuracy needs at least one pair")
    return sum(values) / len(values)
