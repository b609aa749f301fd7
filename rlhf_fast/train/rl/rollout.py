"""Rollouts: prompts -> sampled responses (HF ``generate``, KV cache) -> log-probs recomputed with the fused ops.

Layout of a rollout of B sequences, P prompt columns and R response columns::

    input_ids [B, P + R]   prompt left-padded to P, then the response, padded after its first EOS
    response_mask [B, R]   True on response tokens up to and including the first EOS
    log-probs [B, R]       column j is the log-prob of input_ids[:, P + j], read at position P + j - 1

The sampler's own log-probs (from ``generate``'s logits, at the same temperature) are kept beside the
ones recomputed for training (one full forward through ``hidden_and_head`` and the fused linear op):
their difference (``logp_mismatch``) should be float noise; a large one means the two paths disagree
(positions, padding, dropout, precision, top-p) and the "on-policy" ratio is silently off-policy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

import rlhf_fast
from rlhf_fast.reference import IGNORE_INDEX

from ..fsdp import is_sharded
from .config import RolloutConfig


@dataclass
class Rollout:
    """Sampled sequences; see the module docstring for the layout. Rows of a group are contiguous."""

    prompts: list[str]
    responses: list[str]
    input_ids: torch.Tensor  # [B, P + R] int64
    attention_mask: torch.Tensor  # [B, P + R] int64: prompt padding and post-EOS padding are 0
    response_mask: torch.Tensor  # [B, R] bool
    sample_logp: torch.Tensor  # [B, R] float32, the sampler's log-probs (0 where masked)
    prompt_len: int  # P

    @property
    def labels(self) -> torch.Tensor:
        """[B, R] response tokens, IGNORE_INDEX where masked."""
        return torch.where(self.response_mask, self.input_ids[:, self.prompt_len :], IGNORE_INDEX)

    @property
    def lengths(self) -> torch.Tensor:
        """[B] response tokens per row (EOS included)."""
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a 1-D index tensor)."""
        picked = rows.tolist()
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return Rollout(
            prompts=[self.prompts[i] for i in picked], responses=[self.responses[i] for i in picked],
            prompt_len=self.prompt_len, **tensors,
        )  # fmt: skip


def cat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the rows of ``rollouts`` in order: prompts left-padded to the widest P,
    responses right-padded to the widest R (masked: no loss, no attention)."""
    P, R = max(r.prompt_len for r in rollouts), max(r.response_mask.shape[1] for r in rollouts)
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "response_mask": [], "sample_logp": []}
    for r in rollouts:
        left, right = P - r.prompt_len, R - r.response_mask.shape[1]
        parts["input_ids"].append(torch.nn.functional.pad(r.input_ids, (left, right), value=pad_id))
        parts["attention_mask"].append(torch.nn.functional.pad(r.attention_mask, (left, right), value=0))
        parts["response_mask"].append(torch.nn.functional.pad(r.response_mask, (0, right), value=False))
        parts["sample_logp"].append(torch.nn.functional.pad(r.sample_logp, (0, right), value=0.0))
    return Rollout(
        prompts=[p for r in rollouts for p in r.prompts], responses=[s for r in rollouts for s in r.responses],
        prompt_len=P, **{name: torch.cat(tensors) for name, tensors in parts.items()},
    )  # fmt: skip


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (as ``generate`` does for left-padded prompts)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask [B, P]; a prompt over max_prompt_length keeps its end (and BOS)."""
    if not prompts:
        raise ValueError("no prompts to encode")
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    rows = []
    for ids in encoded:
        ids = list(ids)
        if eos is not None and eos != bos and len(ids) > 1 and ids[-1] == eos:
            ids = ids[:-1]  # a tokenizer that appends EOS would end the prompt before the response
        if len(ids) > max_prompt_length:
            head = [ids[0]] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_prompt_length - len(head)) :]
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return input_ids, mask


def response_mask_of(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """True up to and including the first EOS of each row (everything when there is none). [B, R] -> bool."""
    if eos_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_eos = (responses == eos_id).long()
    after_first = (is_eos.cumsum(-1) - is_eos) > 0
    return ~after_first


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: RolloutConfig, *, greedy: bool = False) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups) with ``model.generate``.

    Sampling: temperature, top-p (no top-k), at most cfg.max_new_tokens tokens, stopping at EOS.
    The model is put in eval mode for the call (dropout would make the sampler differ from the
    trained policy) and restored afterwards.
    """
    if cfg.max_new_tokens <= 0:
        raise ValueError(f"rollout.max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, cfg.max_prompt_length)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    gen_cfg = GenerationConfig(
        do_sample=not greedy, temperature=cfg.temperature if not greedy else None, top_p=cfg.top_p if not greedy else None,
        top_k=0 if not greedy else None, max_new_tokens=cfg.max_new_tokens, min_new_tokens=1,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id, use_cache=True,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    finally:
        model.train(was_training)
    P = prompt_ids.shape[1]
    responses = out.sequences[:, P:]
    mask = response_mask_of(responses, eos)
    responses = torch.where(mask, responses, pad)
    # The sampler's log-probs: its raw logits at the sampling temperature, one column at a time
    # (no [B, R, V] float32 stack).
    temperature = 1.0 if greedy else cfg.temperature
    sample_logp = torch.zeros(responses.shape, dtype=torch.float32, device=device)
    for j, logits in enumerate(out.logits):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        sample_logp[:, j] = logp.gather(-1, responses[:, j : j + 1]).squeeze(-1)
    sample_logp = torch.where(mask, sample_logp, 0.0)
    texts = tokenizer.batch_decode(torch.where(mask, responses, pad).tolist(), skip_special_tokens=True)
    return Rollout(
        prompts=list(prompts), responses=[t.strip() for t in texts],
        input_ids=torch.cat([prompt_ids, responses], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        response_mask=mask, sample_logp=sample_logp, prompt_len=P,
    )  # fmt: skip


def response_hidden(model, rollout: Rollout):
    """(hidden [B, R, H] of the positions that predict the response, lm_head weight, bias)."""
    hidden, weight, bias = rlhf_fast.hf.hidden_and_head(
        model, rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids(rollout.attention_mask)
    )
    P = rollout.prompt_len
    # Under autocast hidden may be bf16 and the weight float32: the linear ops then run the head in
    # autocast's dtype, as the model's own lm_head would.
    return hidden[:, P - 1 : -1], weight, bias


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """[B, R, V] logits of the response positions, for models whose head is not a plain Linear."""
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask), use_cache=False,
    ).logits  # fmt: skip
    return logits[:, rollout.prompt_len - 1 : -1]


def has_linear_head(model) -> bool:
    """Whether ``fused_linear_policy_loss`` applies (the head is a plain Linear, its logit transform known)."""
    try:
        rlhf_fast.hf.head_of(model)
        rlhf_fast.hf.decoder_of(model)
    except (TypeError, ValueError):
        return False
    return True


def sequence_logprobs(model, rollout: Rollout, *, temperature: float = 1.0, backend: str = "auto",
                      return_entropy: bool = False):
    """[B, R] float32 log-probs of the response tokens (0 where masked), through the fused ops:
    ``linear_token_logprobs`` on the hidden states when the head is linear, else ``token_logprobs``."""
    labels = rollout.labels
    if has_linear_head(model):
        hidden, weight, bias = response_hidden(model, rollout)
        out = rlhf_fast.linear_token_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy, backend=backend,
            **rlhf_fast.hf.head_options(model),  # the head's logit scale / soft cap (Cohere, Gemma 2), if any
        )
    else:
        out = rlhf_fast.token_logprobs(
            response_logits(model, rollout), labels, temperature=temperature, return_entropy=return_entropy, backend=backend
        )
    if is_sharded(model) and not torch.is_grad_enabled():
        model.reshard()  # no backward will: free the root's head (and embedding) until the next forward
    if return_entropy:
        logp, entropy = out
        return logp.float(), entropy.float()
    return out.float()
