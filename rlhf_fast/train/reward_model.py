"""RewardModel: a Hugging Face backbone plus a scalar head on the hidden state of the last non-pad token.

Saved as a directory with two files, so it loads without this package's training code:

    reward_model.json  {"model_type": "rlhf_fast_reward_model", "format_version": 1,
                        "backbone": <the backbone's transformers config as a dict>,
                        "hidden_size": H, "pooling": "last_non_pad"}
    model.safetensors  "backbone.<name>" for the backbone's weights, "head.weight" [1, H], "head.bias" [1]

Plain transformers + safetensors can rebuild it (this is what ``from_pretrained`` does)::

    cfg = json.load(open(f"{d}/reward_model.json"))
    backbone = AutoModel.from_config(AutoConfig.for_model(**cfg["backbone"]))
    weights = safetensors.torch.load_file(f"{d}/model.safetensors")
    backbone.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("backbone.")})
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state  # [B, T, H]
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)                        # last non-pad index
    score = hidden[torch.arange(len(ids)), last] @ weights["head.weight"][0] + weights["head.bias"][0]
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .quiet import quiet_transformers

MODEL_TYPE = "rlhf_fast_reward_model"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
# Not config.json: transformers would take the directory for one of its models (AutoTokenizer reads it).
CONFIG_NAME = "reward_model.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row, for right or left padding. [B, T] -> [B] int64."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class RewardModel(torch.nn.Module):
    """score(input_ids [B, T], attention_mask [B, T]) -> [B] float32 scores, one per sequence."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.head.weight, std=hidden**-0.5)
        torch.nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        """The backbone's transformers config."""
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Positions count real tokens only, so a left-padded sequence (as generation produces) scores
        # like the same sequence right-padded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]
        return self.head(last).squeeze(-1).float()

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """The head read at every position from ``start`` to the last but one (a critic's values of
        the states that emit tokens start + 1 ...). [B, T], [B, T] -> [B, T - 1 - start] in the head's dtype.
        One call, so that a model sharded with FSDP2 runs it as its forward (``register_fsdp_forward_method``)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.head(hidden[:, start:-1]).squeeze(-1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The score of each sequence, read at its last non-pad token. [B, T], [B, T] -> [B] float32."""
        return self(input_ids, attention_mask)

    @classmethod
    def from_backbone_config(cls, config) -> RewardModel:
        """A randomly initialised backbone of ``config`` (a transformers config) with a new head."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config))

    @classmethod
    @quiet_transformers()
    def from_causal_lm(cls, path: str | os.PathLike) -> RewardModel:
        """The body of the causal LM saved in local directory ``path`` (e.g. an SFT policy) with a new head."""
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        return cls(lm.base_model)

    def save_pretrained(self, directory: str | os.PathLike, *, tokenizer=None, state_dict: dict | None = None) -> None:
        """Write reward_model.json and model.safetensors (and the tokenizer's files, if given) into ``directory``,
        via a temporary sibling directory that is then renamed. ``state_dict``: the weights to write
        (default this module's own; a sharded model's gathered ``fsdp.full_state_dict``)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.config.to_dict(),
            "hidden_size": self.backbone.config.hidden_size,
            "pooling": "last_non_pad",
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        weights = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict if state_dict is not None else self.state_dict()).items()}
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> RewardModel:
        """Load a directory written by ``save_pretrained``, in eval mode (as transformers does)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a reward model directory?")
        config = json.loads(config_path.read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{config_path} is not a reward model config (model_type {config.get('model_type')!r})")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path} has format_version {config.get('format_version')}, expected {FORMAT_VERSION}")
        backbone_config = AutoConfig.for_model(**config["backbone"])
        model = cls.from_backbone_config(backbone_config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.to(device).eval()


def replace_dir(tmp: Path, target: Path) -> None:
    """Put directory ``tmp`` at ``target``; an existing ``target`` is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(target.name + f".old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
