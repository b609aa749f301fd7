"""FSDP2 for the trainers: shard a causal LM, sharded checkpoints, the consolidated model directory.

``shard_model`` applies torch's ``fully_shard`` (FSDP2) the usual way: each decoder layer is a group
of its own, then the whole model is the root group, which holds the rest (token embedding, final
norm, lm_head; a tied head is the embedding's weight, in the root group once). Parameters become
DTensors sharded on dim 0 over the mesh; every forward all-gathers a group's parameters, every
backward reduce-scatters its gradients (averaged over the ranks, as DDP's all-reduce does).

The lm_head-fused losses run on ``rlhf_fast.hf.hidden_and_head(model, ...)``, which runs the decoder
inside the root's forward hooks and returns FSDP2's own gathered head: the root stays gathered after
its forward (FSDP2's default for the root, kept here), so the head is all-gathered once per step,
with the embedding, and its gradient is reduce-scattered with the rest of the root's.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): ``save_checkpoint`` has every rank
write its own shards of the model and the optimizer, plus a small file of its rank-local state
(``extra``: RNG states, data position, ...), into ``.step_XXXXXXXX.tmp`` beside the final name;
after a barrier (every rank's files written, fsynced, and DCP's metadata written by rank 0 last),
rank 0 renames it ``step_XXXXXXXX``. A run killed before the rename leaves only the ``.tmp``
directory, which ``list_checkpoints`` never returns and ``remove_temporaries`` deletes at the next
start: a half-written checkpoint is never picked up. The directory must be one that every rank
sees (a shared file system across nodes), and a resume must use the same number of processes.
``load_checkpoint`` restores the model's and optimizer's shards in place, exactly.
``ShardedCheckpoints`` is how the trainers (``loop.Loop``, ``rl.trainer.RLTrainer``, with
``dist.strategy=fsdp2``) save and resume through these: every trained model in one DCP state, and each
rank's own rest of the run (step, schedule, its RNG states and data position, config) as ``extra``.

``gathered(model)`` unshards every group of a sharded model for a block (RL's generation): the
forwards inside it make no collective, so processes may run different numbers of them.

``save_hf_model`` writes the consolidated transformers directory from rank 0: the full state dict
is gathered to rank 0's CPU one tensor at a time (``full_state_dict=True, cpu_offload=True``), so no
GPU ever holds the whole model.

The frozen reference policy (RL's KL anchor) is sharded too, with the same ``MixedPrecisionPolicy``
as the policy, and ``reshard_root_after_forward=True`` (``shard_reference``), rather than kept whole
and frozen in bf16 on every rank:
- memory: the issue's case is a model that does not fit one GPU; a whole bf16 copy per rank is
  2 bytes per parameter on every GPU (a 70B reference alone fills an 80 GB GPU and more), a sharded
  one 2 / world_size, plus one layer gathered at a time during its forward;
- numerics: with the policy's own mixed-precision policy the reference's forward at step 0 is the
  policy's, bit for bit, so the KL penalty starts at exactly 0; a bf16 reference beside a float32
  policy starts with a KL that is only rounding noise, and the penalty pushes the policy towards it;
- cost: one all-gather per layer per reference forward, the communication of the policy's forward
  without its backward; the reference runs once per rollout batch, under no_grad.
The root is resharded after forward because a frozen model never runs the backward that reshards
the root otherwise: its embedding and head would stay gathered for the whole run. After the loss op
on its ``hidden_and_head`` is done (``hidden_and_head`` gathers the head again for it), call
``model.reshard()`` to free the head until the next reference forward.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

from . import checkpoint, dist

NAME_RE = re.compile(r"^step_(\d{8})$")
METADATA = ".metadata"  # written by DCP's coordinator (rank 0) once every rank's shards are written


def _fsdp():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return fully_shard, MixedPrecisionPolicy


def default_mesh():
    """A 1-D device mesh over every process: CUDA when available (NCCL), else CPU (gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.world_size(),))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, each to be one FSDP2 group: the modules whose class transformers
    names in ``_no_split_modules`` (LlamaDecoderLayer, GPT2Block, ...; read from every submodule, so
    a reward model or critic around a transformers backbone finds the backbone's), the outermost
    where they nest (an FSDP2 group must not hold another's parameters); else the children of the
    longest ModuleList in the model."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    layers, kept = [], []
    for path, module in model.named_modules():  # parents before children
        if module is not model and type(module).__name__ in names and not any(path.startswith(k + ".") for k in kept):
            layers.append(module)
            kept.append(path)
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise TypeError(
            f"cannot find the decoder layers of {type(model).__name__}: no _no_split_modules and no ModuleList; "
            "pass layers= explicitly"
        )
    return list(max(lists, key=len))


def shard_model(model: torch.nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = None, layers: list[torch.nn.Module] | None = None,
                reshard_root_after_forward: bool | None = None) -> torch.nn.Module:
    """Apply ``fully_shard`` to each of ``layers`` (default ``decoder_layers(model)``), then to ``model``
    as the root; in place, and returned. Call it after torch.distributed is initialised, before the
    optimizer is built (the optimizer must hold the sharded parameters).

    ``param_dtype`` / ``reduce_dtype``: FSDP2's ``MixedPrecisionPolicy`` (the dtype parameters are
    all-gathered and computed in, and the one gradients are reduce-scattered in; None keeps the
    parameters' own, float32 in the trainers). The sharded parameters and the optimizer stay in
    their dtype. ``mesh``: a 1-D DeviceMesh, default ``default_mesh()``.

    ``reshard_root_after_forward``: None (FSDP2's default) keeps the root's parameters (embedding,
    head, final norm) gathered from its forward to its backward, which follows at once in training;
    True frees them after every forward, for a model that never runs backward (``shard_reference``).
    The layers always reshard after forward and are gathered again in the backward.
    """
    fully_shard, MixedPrecisionPolicy = _fsdp()
    mesh = mesh if mesh is not None else default_mesh()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_root_after_forward)
    model._rlhf_fast_reshard_root = bool(reshard_root_after_forward)  # what ``gathered`` restores
    return model


def shard_reference(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """The frozen reference policy, sharded like the policy (pass it the policy's ``mesh``,
    ``param_dtype``, ``reduce_dtype``), without gradients, in eval mode, its root resharded after
    every forward (see the module docstring for why it is sharded rather than kept whole in bf16)."""
    model.requires_grad_(False).eval()
    return shard_model(model, reshard_root_after_forward=True, **kwargs)


def is_sharded(model) -> bool:
    """Whether ``model`` is an FSDP2 root (``shard_model``): its forward is a collective."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def broadcast_from_rank0(model: torch.nn.Module) -> torch.nn.Module:
    """Copy rank 0's parameters and buffers to every process, before ``shard_model`` (each rank keeps
    its slice of its own full tensors: they must be the same everywhere). A no-op in one process."""
    if dist.initialized():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Within the block every FSDP2 group of ``model`` holds its whole parameters, gathered once and
    kept across forwards (no collective per forward: processes may run different numbers of them,
    as generation does, stopping at EOS); on exit they are freed again. FSDP2's own unshard, so the
    whole model exists once more than its shard only inside the block. A no-op for a model that is
    not sharded."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
    handles = [group.unshard(async_op=True) for group in groups]
    for handle in handles:
        if handle is not None:
            handle.wait()
    try:
        yield model
    finally:
        for group in groups:
            layer = group is not model  # the layers reshard after forward, the root as it was built (kept)
            group.set_reshard_after_forward(layer or _root_reshards(group), recurse=False)
            group.reshard()


def _root_reshards(root) -> bool:
    return bool(getattr(root, "_rlhf_fast_reshard_root", False))


# ---- sharded checkpoints ---------------------------------------------------------------------------------


def path_for(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def _tmp_for(directory: Path, step: int) -> Path:
    # The same name on every rank (all of them write into it), marked like checkpoint.py's temporaries.
    return Path(directory) / f".step_{step:08d}{checkpoint.TMP_MARK}"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete sharded checkpoint in ``directory``, oldest first: directories
    named ``step_XXXXXXXX`` (only the final rename gives that name) holding DCP's metadata."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME_RE.match(p.name)) and (p / METADATA).is_file()]
    return sorted(found)


def remove_temporaries(directory: Path) -> None:
    """Rank 0 deletes the ``.step_*.tmp*`` directories that saves killed before their rename left in
    ``directory``, and the ``step_*.old*`` ones a re-save of a step killed mid-replace left (never
    listed: the name is not a checkpoint's); every rank waits. Call it when a run starts, before any
    rank saves there."""
    directory = Path(directory)
    if dist.is_main() and directory.is_dir():
        leftovers = [*directory.glob(f".step_*{checkpoint.TMP_MARK}*"), *directory.glob("step_*.old*")]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    dist.barrier()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """The DCP state: the model's (and optimizer's) sharded state dicts, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, extra: dict | None = None, keep: int | None = None) -> Path:
    """Every rank writes its shards of ``model`` (and ``optimizer``) and its own ``extra`` (a dict that
    ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings, lists, dicts) into a
    temporary directory; rank 0 renames it ``path_for(directory, step)`` once all have written, then
    keeps the ``keep`` newest. Collective: every rank calls it. Returns the final path."""
    import torch.distributed.checkpoint as dcp

    path, tmp = path_for(directory, step), _tmp_for(directory, step)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step killed earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=tmp)
    checkpoint.save({"rank": dist.rank(), "world_size": dist.world_size(), "extra": extra or {}}, tmp / _rank_file(dist.rank()))
    dist.barrier()  # every rank's files are written (and fsynced) before the rename makes them a checkpoint
    if dist.is_main():
        checkpoint._fsync_dir(tmp)
        from .reward_model import replace_dir

        replace_dir(tmp, path)  # a re-save of the same step (after a resume) replaces it
        checkpoint._fsync_dir(path.parent)
        if keep is not None:
            for _, old in [c for c in list_checkpoints(directory) if c[0] <= step][:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` as rank 0 sees it (broadcast, so that every rank
    loads the same one), or None."""
    found = list_checkpoints(directory) if dist.is_main() else None
    chosen = [str(found[-1][1]) if found else None]
    if dist.initialized():
        torch.distributed.broadcast_object_list(chosen, src=0)
    return Path(chosen[0]) if chosen[0] is not None else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore ``model`` (and ``optimizer``) in place from the sharded checkpoint at ``path``, on a
    model sharded as the saved one was (same world size); returns this rank's ``extra``. Collective.
    Raises CheckpointError for a rank file that is damaged or from another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    mine = path / _rank_file(dist.rank())
    if not mine.is_file():
        raise checkpoint.CheckpointError(f"{path} has no {mine.name}: it was not written by {dist.world_size()} processes")
    payload = checkpoint.load(mine)
    if payload["world_size"] != dist.world_size():
        raise checkpoint.CheckpointError(
            f"{path} was written by {payload['world_size']} processes; this run has {dist.world_size()}: resume with "
            f"{payload['world_size']}"
        )
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return payload["extra"]


class ShardedCheckpoints(checkpoint.CheckpointedRun):
    """``checkpoint.CheckpointedRun`` whose checkpoints are sharded when the run's ``sharded`` is true
    (its models are FSDP2 roots; else the one-file checkpoints of DDP and one process).

    The run also provides ``sharded_modules()`` ({name: model}) and ``optimizer``: a checkpoint is
    ``save_checkpoint``'s directory ``step_XXXXXXXX/``, in which every process writes its shards of
    those models and of the optimizer (torch.distributed.checkpoint) and its own ``state_dict()`` (the
    rest: step, schedule, its own RNG states and data position, the config), renamed into place once
    all have written. A resume loads every shard in place, then each process's own rest."""

    sharded = False

    def _root(self) -> torch.nn.Module:
        # One module over every sharded model: DCP names their state (and the optimizer's) "model.…", "critic.…".
        return torch.nn.ModuleDict(self.sharded_modules())

    def write_checkpoint(self) -> Path:
        if not self.sharded:
            return super().write_checkpoint()
        return save_checkpoint(self.checkpoint_dir, self.step, self._root(), self.optimizer, extra=self.state_dict(),
                               keep=self.keep_checkpoints)  # fmt: skip

    def newest_checkpoint(self) -> tuple[Path, dict] | None:
        """As ``CheckpointedRun``'s, sharded or not; a run that finds only checkpoints of the other
        kind is refused (CheckpointError) rather than started again from step 0 over them."""
        if not self.sharded:
            found = super().newest_checkpoint()
            if found is None and list_checkpoints(self.checkpoint_dir):
                raise checkpoint.CheckpointError(
                    f"--resume: {self.checkpoint_dir} holds sharded checkpoints (dist.strategy=fsdp2): resume with "
                    "--dist.strategy fsdp2 under torchrun, with as many processes as wrote them"
                )
            return found
        remove_temporaries(self.checkpoint_dir)  # saves killed before their rename
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            if checkpoint.list_checkpoints(self.checkpoint_dir):
                raise checkpoint.CheckpointError(
                    f"--resume: {self.checkpoint_dir} holds one-file checkpoints (dist.strategy=ddp, or one process), "
                    "not sharded ones: resume with --dist.strategy ddp"
                )
            return None
        return path, load_checkpoint(path, self._root(), self.optimizer)


# ---- the consolidated Hugging Face directory ---------------------------------------------------------------


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (empty on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf_model(model: torch.nn.Module, directory: Path, tokenizer=None) -> None:
    """The sharded causal LM as a transformers directory (and the tokenizer's files, if given), written
    by rank 0 into a temporary sibling directory, then renamed. Collective: every rank calls it."""
    from .quiet import quiet_transformers
    from .reward_model import replace_dir

    state = full_state_dict(model)
    directory = Path(directory)
    if dist.is_main():
        tmp = directory.with_name(directory.name + f"{checkpoint.TMP_MARK}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet_transformers():
            model.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        replace_dir(tmp, directory)
    dist.barrier()
