"""The training loop of every stage: small named steps and hooks, no subclassing.

``run_steps`` is the schedule SFT, reward-model and RL training share, and so the one place that
says when each hook (``Hooks``) fires. ``Loop`` is the SFT and reward-model run; its optimizer step is

    micro_batches -> forward_backward (loss_fn, per micro-batch) -> clip_gradients -> optimizer_step

What differs between those two trainers is passed in as functions: ``loss_fn(model, batch) -> (mean
loss, stats)`` and ``eval_fn(model) -> metrics``. RL (``rl.trainer.RLTrainer``) has its own step and
shares the rest: ``run_steps``, ``build_optimizer``, ``build_scheduler``, ``clip_gradients`` and
``optimizer_step``.

Non-finite updates are never applied (``guarded_step``): when the loss or the gradient norm of an
optimizer step is NaN or inf on any process, every process drops the gradient and skips AdamW's
step, with a warning and the ``skipped_updates`` metric; the LR schedule still advances, so the
learning rate stays a function of the step count (as torch.amp's GradScaler leaves it when it
skips a step). ``train.max_nonfinite_skips`` consecutive skips stop the run with
``NonFiniteError`` naming the step and the likely source.

Gradient accumulation is normalised by tokens (SFT) or pairs (RM): each micro-batch reports its
weight (``batch.weight()``), and its mean loss is scaled by weight / (sum of weights over the
micro-batches of the step and over all processes), so the gradient is that of the mean over the
whole global batch, however it is split.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..hf import is_dtensor
from . import checkpoint, dist, fsdp
from .config import LoopConfig, OptimConfig
from .data import BatchStream
from .metrics import MetricsLog, ProgressBar
from .threads import fit_to_load

LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class Hooks:
    """Functions ``run_steps`` calls, the same for SFT, RM and RL: ``on_step(run, metrics)`` after every
    step, ``on_eval(run, metrics)`` after every evaluation, ``on_checkpoint(run, path)`` after a
    checkpoint is written, ``on_end(run, metrics)`` (the last evaluation's) when the steps of the run
    (or of this job of it) are done, before the trainer saves its final model.

    ``run`` is the ``Loop`` (SFT, RM) or the ``RLTrainer``; a hook may read, on all three, ``step``,
    ``out_dir``, ``device``, ``module`` (the model being trained: the policy, or the reward model),
    ``optimizer``, ``scheduler``, ``metrics`` (the ``MetricsLog``) and ``last_eval``."""

    on_step: list[Callable] = field(default_factory=list)
    on_eval: list[Callable] = field(default_factory=list)
    on_checkpoint: list[Callable] = field(default_factory=list)
    on_end: list[Callable] = field(default_factory=list)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): (step + 1) / warmup during warmup, then a
    cosine from 1 to ``min_ratio`` reached at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable ones of ``params``; weight decay on matrices and embeddings only (not on
    biases and norm scales). One decay group and one no-decay group, whatever modules they come from."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    schedule = partial(warmup_cosine, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_optim(optimizer: torch.optim.Optimizer, scheduler, cfg: OptimConfig) -> None:
    """Give a restored optimizer (``build_optimizer``'s two groups) and schedule the options of ``cfg``:
    a resumed run with new optimizer options keeps AdamW's moments and its step count, and continues
    the schedule (``build_scheduler``'s, already built from ``cfg``) at that step with the new peak lr,
    betas, eps and weight decay. Unchanged options give back exactly the restored values."""
    decay, _ = optimizer.param_groups
    decay["weight_decay"] = cfg.weight_decay
    for group in optimizer.param_groups:
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, initial_lr=cfg.lr)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lrs = [cfg.lr * schedule(scheduler.last_epoch) for schedule in scheduler.lr_lambdas]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def clip_gradients(params, max_norm: float) -> float:
    """Clip the gradient norm of ``params`` (those with a gradient) to ``max_norm`` when it is > 0;
    returns the norm before clipping (0.0 when no parameter has a gradient), a plain float on every
    process. Under FSDP2 the gradients are DTensor shards: torch computes the global norm over the
    shards (a DTensor), made whole here, so every process sees the same finite or non-finite value."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif is_dtensor(params[0].grad):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    return float(norm.full_tensor() if is_dtensor(norm) else norm)


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler) -> float:
    """Step the optimizer and the LR schedule, then drop the gradients; returns the LR the step used."""
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


class NonFiniteError(RuntimeError):
    """Training stopped: ``train.max_nonfinite_skips`` optimizer updates in a row had a NaN or inf loss
    or gradient norm, or a reward came back NaN or inf. The message names the step and the likely source."""


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process: one all-reduce of a one-element flag (every process
    must call it as often as the others), so that all processes take the same decision."""
    if not dist.initialized():
        return bool(flag)
    total = dist.all_reduce_sum(torch.tensor([float(bool(flag))], dtype=torch.float64, device=dist_device()))
    return float(total.item()) > 0


def all_finite(*values) -> bool:
    """Whether every value (floats, or tensors of any shape) is finite on every process (``any_process``)."""
    bad = any(bool((~torch.isfinite(v.detach())).any()) if isinstance(v, torch.Tensor) else not math.isfinite(v)
              for v in values)  # fmt: skip
    return not any_process(bad)


def dist_device() -> torch.device:
    """The device collectives of the process group take (NCCL: the current GPU; gloo: the CPU)."""
    import torch.distributed

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def nonfinite_source(modules, loss: float, grad_norm: float) -> str:
    """The likely source of a non-finite update, for NonFiniteError's message: weights that hold
    NaN or inf (named), else a NaN/inf loss (inputs, or values the model overflows), else an
    overflowing gradient with a finite loss."""
    for module in modules:
        if module is None:
            continue
        for name, param in module.named_parameters():
            local = param.detach().to_local() if is_dtensor(param) else param.detach()  # this process's shard
            bad = int((~torch.isfinite(local)).sum())
            if bad:
                return (f"the model's weights hold {bad} NaN/inf value(s) (first in {name}): they were loaded or "
                        "initialised that way, or changed outside the optimizer (which applied no non-finite update); "
                        "check the model's checkpoint")
    if not math.isfinite(loss):
        return ("the loss itself is NaN/inf with finite weights: inputs (data, rewards, advantages) that hold NaN/inf, "
                "or activations that overflow (try train.precision=fp32 or a lower optim.lr)")
    return (f"the gradient overflows (norm {grad_norm}) with a finite loss: lower optim.lr, keep optim.grad_clip > 0, "
            "or try train.precision=fp32")


def guarded_step(run, finite: bool, *, loss: float, grad_norm: float, where: str) -> bool:
    """``optimizer_step`` when the update is finite (``all_finite``'s agreed answer); else drop the
    gradient, advance the LR schedule only, warn, and count the skip in ``run.nonfinite_streak``.
    ``run.max_nonfinite_skips`` skips in a row raise NonFiniteError. Returns whether it stepped."""
    if finite:
        run.nonfinite_streak = 0
        optimizer_step(run.optimizer, run.scheduler)
        return True
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns of a schedule stepped before the optimizer's first step
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    run.nonfinite_streak = getattr(run, "nonfinite_streak", 0) + 1
    what = f"non-finite update at {where} (loss {loss}, gradient norm {grad_norm})"
    if run.nonfinite_streak >= run.max_nonfinite_skips:
        raise NonFiniteError(
            f"{what}: {run.nonfinite_streak} optimizer updates in a row skipped (train.max_nonfinite_skips="
            f"{run.max_nonfinite_skips}), stopping; likely source: {nonfinite_source(run.nonfinite_modules(), loss, grad_norm)}"
        )
    if dist.is_main():
        warnings.warn(f"{what}: skipped it (the weights and AdamW's state are unchanged; "
                      f"{run.nonfinite_streak} in a row of at most train.max_nonfinite_skips={run.max_nonfinite_skips})",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    return False


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on CUDA when asked (or "auto" on a GPU with bf16), else no autocast."""
    use_bf16 = device.type == "cuda" and (
        precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
    )
    if use_bf16:
        return partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def run_steps(run, cfg, *, desc: str, shown: tuple[str, ...]) -> dict[str, float]:
    """Train ``run`` until ``cfg.stop_after`` (or ``cfg.steps``) steps are done; returns the last
    evaluation's metrics. ``cfg`` is the run's ``train`` section (steps, stop_after, eval_every,
    save_every, progress); a progress bar named ``desc`` shows the metrics ``shown``.

    Each step: ``run.train_step()`` (its metrics, plus ``elapsed_s``), the on_step hooks,
    ``run.log(metrics)``; every eval_every steps ``run.evaluate()``, recorded (``record_eval``); every
    save_every steps ``run.save_checkpoint()`` (``checkpoint.CheckpointedRun``, which calls the
    on_checkpoint hooks). At the last step an evaluation unless one just ran; a checkpoint when the
    job stops; the on_end hooks last."""
    end = cfg.stop_after or cfg.steps
    progress = ProgressBar(cfg.steps, run.step, cfg.progress, desc, shown)
    start = time.monotonic()
    evaluated = -1
    try:
        while run.step < end:
            fit_to_load()
            metrics = run.train_step()
            run.step += 1
            metrics["elapsed_s"] = time.monotonic() - start
            for hook in [progress, *run.hooks.on_step]:
                hook(run, metrics)
            run.log(metrics)
            if cfg.eval_every and run.step % cfg.eval_every == 0:
                record_eval(run, run.evaluate(), progress)
                evaluated = run.step
            if cfg.save_every and run.step % cfg.save_every == 0:
                run.save_checkpoint()
        if run.step == cfg.steps and evaluated != run.step:
            record_eval(run, run.evaluate(), progress)
        if run.saved_step != run.step:
            run.save_checkpoint()
    finally:
        progress.close()
    for hook in run.hooks.on_end:
        hook(run, run.last_eval)
    return run.last_eval


def record_eval(run, metrics: dict[str, float], progress: ProgressBar) -> None:
    """Keep an evaluation's metrics as ``run.last_eval``, write them to metrics.jsonl and the console,
    call the on_eval hooks; nothing for no metrics (nothing held out)."""
    if not metrics:
        return
    run.last_eval = metrics
    run.metrics.write({"step": run.step, "split": "eval", **metrics})
    progress.write(f"step {run.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    for hook in run.hooks.on_eval:
        hook(run, metrics)


class Loop(fsdp.ShardedCheckpoints):
    """Runs ``cfg.steps`` optimizer steps of ``model`` on ``batches`` (see the module docstring).

    ``model`` must already be on its device; when torch.distributed is initialised it is wrapped in
    DistributedDataParallel here (``strategy`` "ddp"), or sharded in place with FSDP2 ("fsdp2",
    ``fsdp.shard_model``: parameters, gradients and AdamW's state are then DTensor shards, and
    checkpoints are sharded). ``self.module`` is always the model itself (DDP's unwrapped one).
    """

    def __init__(
        self,
        cfg: LoopConfig,
        optim: OptimConfig,
        model: torch.nn.Module,
        batches: BatchStream,
        *,
        loss_fn: LossFn,
        eval_fn: EvalFn | None,
        out_dir: str | Path,
        run_config: dict,
        hooks: Hooks | None = None,
        name: str = "train",
        strategy: str = "ddp",
    ):
        self.cfg = cfg
        self.module = model
        self.device = next(model.parameters()).device
        self.model = model
        self.sharded = dist.initialized() and strategy == "fsdp2"
        if self.sharded:
            fsdp.shard_model(fsdp.broadcast_from_rank0(model))
        elif dist.initialized():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.batches = batches
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.hooks = hooks or Hooks()
        self.name = name
        self.run_config = run_config
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.keep_checkpoints = cfg.keep_checkpoints
        self.grad_clip = optim.grad_clip
        self.max_nonfinite_skips = cfg.max_nonfinite_skips
        self.nonfinite_streak = 0
        self.optimizer = build_optimizer(model.parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, cfg.steps)
        self.autocast = autocast_for(cfg.precision, self.device)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.step = 0
        self.last_eval: dict[str, float] = {}
        self._window: dict[str, float] = {}
        self._window_steps = 0

    # ----------------------------------------------------------------- steps of one optimizer step
    def micro_batches(self) -> list:
        return [self.batches.next().to(self.device) for _ in range(self.cfg.grad_accum)]

    def forward_backward(self, micro_batches: list) -> dict[str, float]:
        """Accumulate the gradient of the global-batch mean loss; return weighted-mean stats."""
        weights = [float(b.weight()) for b in micro_batches]
        total = dist.all_reduce_sum(torch.tensor([sum(weights)], device=self.device, dtype=torch.float64))
        total = max(float(total.item()), 1.0)
        scale = dist.world_size() / total  # DDP and FSDP2 average gradients over processes; undo that
        sums: dict[str, torch.Tensor] = {}
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            last = i == len(micro_batches) - 1
            if self.sharded:  # FSDP2 accumulates the whole gradient and reduce-scatters it at the last
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or self.sharded or not dist.initialized() else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, stats = self.loss_fn(self.model, batch)
                (loss * (weight * scale)).backward()
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double() * weight
        keys = sorted(sums)
        packed = torch.stack([sums[k].reshape(()) for k in keys] + [torch.tensor(sum(weights), device=self.device, dtype=torch.float64)])
        packed = dist.all_reduce_sum(packed).tolist()
        out = {k: v / total for k, v in zip(keys, packed)}
        out["weight"] = packed[-1]
        return out

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics (loss and stats, grad_norm, lr, weight,
        skipped_updates). The global gradient norm is clipped to optim.grad_clip (when > 0); grad_norm
        is the norm before clipping. A NaN or inf loss or gradient norm skips the update (``guarded_step``)."""
        metrics = self.forward_backward(self.micro_batches())
        metrics["grad_norm"] = clip_gradients(self.module.parameters(), self.grad_clip)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        # The loss is already the global one (all-reduced): the flag's all-reduce covers the gradient.
        finite = all_finite(metrics["loss"], metrics["grad_norm"])
        stepped = guarded_step(self, finite, loss=metrics["loss"], grad_norm=metrics["grad_norm"], where=f"step {self.step + 1}")
        metrics["skipped_updates"] = 0.0 if stepped else 1.0
        return metrics

    def nonfinite_modules(self) -> list[torch.nn.Module]:
        """The models whose weights ``nonfinite_source`` inspects."""
        return [self.module]

    # ----------------------------------------------------------------- scheduled work
    def evaluate(self) -> dict[str, float]:
        """eval_fn's held-out metrics ({} without one), in eval mode and without gradients."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.eval_fn(self.module)
        self.model.train()
        return metrics

    def log(self, metrics: dict[str, float]) -> None:
        """Every log_every steps (and at the last), the means of the steps' metrics since the previous
        record; lr and elapsed_s are the last step's."""
        for key, value in metrics.items():
            self._window[key] = self._window.get(key, 0.0) + value
        self._window_steps += 1
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            record = {k: v / self._window_steps for k, v in self._window.items()}
            record["skipped_updates"] = self._window.get("skipped_updates", 0.0)  # a count, not a mean
            record["lr"] = metrics["lr"]
            record["elapsed_s"] = metrics["elapsed_s"]
            self.metrics.write({"step": self.step, "split": "train", **record})
            self._window, self._window_steps = {}, 0

    def sharded_modules(self) -> dict[str, torch.nn.Module]:
        """The models a sharded checkpoint holds (``checkpoint.CheckpointedRun``), by name."""
        return {"model": self.module}

    def state_dict(self) -> dict:
        """What a checkpoint holds; sharded (FSDP2), the model's and optimizer's shards are written
        apart by torch.distributed.checkpoint, and this is every process's own rest."""
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "data": self.batches.state_dict(),
            "config": self.run_config,
        }
        if not self.sharded:
            state.update(model=self.module.state_dict(), optimizer=self.optimizer.state_dict())
        return state

    def load_state_dict(self, payload: dict) -> None:
        if not self.sharded:
            self.module.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.batches.load_state_dict(payload["data"])
        checkpoint.set_rng_state(payload["rng"])

    # ----------------------------------------------------------------- the run
    def run(self) -> dict[str, float]:
        """Train until ``steps`` (or ``stop_after``) steps are done (``run_steps``); returns the last evaluation's metrics."""
        self.model.train()
        return run_steps(self, self.cfg, desc=self.name, shown=("loss", "accuracy"))
