"""Command line of the trainers: ``rlhf-fast sft``, ``rlhf-fast rm`` and ``rlhf-fast demo-data``.

Every config field is an option ``--section.field VALUE`` whose help is the field's docstring;
``--config FILE`` (YAML or JSON) is read first, then the options on the command line override it.
Under torchrun (WORLD_SIZE > 1) the process group is initialised here (NCCL on CUDA, else gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from pathlib import Path

from .config import ConfigError, RMConfig, SFTConfig, TaskConfig, iter_fields, load_config


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(base, "VALUE")


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """--config FILE, --print-config, and one --<key> option per config field (help = its docstring)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (nested sections); command-line options override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, annotation, default, doc in iter_fields(cls):
        section = key.split(".")[0] if "." in key else "run"
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        kind = _type_name(annotation)
        extra = {"nargs": "?", "const": "true"} if kind == "BOOL" else {}
        help_text = f"{doc} (default: {default})".replace("%", "%%")
        group.add_argument(f"--{key}", dest=key, metavar=kind, default=argparse.SUPPRESS, help=help_text, **extra)


def config_from_args(cls: type, args: argparse.Namespace):
    keys = {key for key, *_ in iter_fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    return load_config(cls, args.config, overrides)


def _print_config(config) -> None:
    import yaml

    print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")


def _quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and info messages (our own bar shows progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def training_session():
    """The context every training command runs in: quiet transformers, torch.distributed under
    torchrun, intra-op threads fitted to the CPUs other processes leave free (``threads``)."""
    from .dist import process_group
    from .threads import fitted_threads

    _quiet_transformers()
    with process_group(), fitted_threads():
        yield


def run_trainer(args: argparse.Namespace, config_class: type, make_trainer, steps_done, report) -> int:
    """The body of a training command: the config from the options (only printed with
    --print-config), ``make_trainer(config).train()`` in the training session, then on rank 0, once
    ``steps_done(trainer)`` reaches train.steps (not a ``stop_after`` pause), ``report(trainer, metrics)``."""
    config = config_from_args(config_class, args)
    if args.print_config:
        _print_config(config)
        return 0
    from . import dist

    with training_session():
        try:
            trainer = make_trainer(config)
            metrics = trainer.train()
        except KeyboardInterrupt:
            raise Interrupted(_resume_hint(Path(config.out_dir))) from None
        if steps_done(trainer) == config.train.steps and dist.is_main():
            report(trainer, metrics)
    return 0


class Interrupted(Exception):
    """Ctrl-C during a training command; the message says where the run can be resumed from."""


def _resume_hint(out_dir: Path) -> str:
    """Where an interrupted run stands: its newest checkpoint and the option that continues from it.
    Every file of a run is written aside and renamed (checkpoint.write_atomically), so a write cut
    short leaves only a temporary file, which the next start removes."""
    from . import fsdp
    from .checkpoint import list_checkpoints

    found = sorted(list_checkpoints(out_dir / "checkpoints") + fsdp.list_checkpoints(out_dir / "checkpoints"))
    if not found:
        return f"interrupted before the first checkpoint; nothing to resume in {out_dir} (train.save_every sets how often one is written)"
    step, path = found[-1]
    return f"interrupted; the last checkpoint is {path} (step {step}): run the same command with --resume to continue from it"


def run_sft(args: argparse.Namespace) -> int:
    from .sft import SFTTrainer

    def report(trainer, metrics):
        if metrics:  # no evaluation came back (a finished run resumed): nothing to report
            loss, ppl = metrics["loss"], metrics["ppl"]
            print(f"held-out loss {loss:.4f} (perplexity {ppl:.3g}); policy saved to {trainer.out_dir / 'model'}")

    return run_trainer(args, SFTConfig, SFTTrainer, lambda trainer: trainer.loop.step, report)


def run_rm(args: argparse.Namespace) -> int:
    from .rm import RMTrainer

    def report(trainer, metrics):
        print(f"reward model saved to {trainer.out_dir / 'reward_model'}")

    return run_trainer(args, RMConfig, RMTrainer, lambda trainer: trainer.loop.step, report)


def run_demo_data(args: argparse.Namespace) -> int:
    from .task import SyntheticTask, ceiling_accuracy

    _quiet_transformers()
    task = SyntheticTask()
    paths = task.write(
        args.out, seed=args.seed, sft_train=args.sft_train, sft_eval=args.sft_eval, pref_train=args.pref_train, pref_eval=args.pref_eval
    )
    for name, path in paths.items():
        print(f"{name:<10} {path}")
    held = task.records("pref_eval", args.pref_eval, args.seed)
    if held:
        print(f"gold ceiling accuracy on pref_eval: {ceiling_accuracy([(r['gold_chosen'], r['gold_rejected']) for r in held]):.4f}")
    return 0


EPILOG = """Without data paths, the built-in synthetic task is used (no download): a word-level tokenizer,
prompts "write N words about TOPIC :" and a hidden gold score (see rlhf_fast.train.task).
A fresh run needs an empty --out_dir (or --overwrite); --resume continues the run there.
Exit status 2 and a one-line message for configuration, data, reward-function and output-directory errors,
and for training that turns NaN/inf (train.max_nonfinite_skips updates in a row, or a NaN/inf reward);
Ctrl-C exits 130 naming the last checkpoint, from which --resume continues."""


def add_commands(commands) -> None:
    """Register sft, rm and demo-data on an argparse subparsers object."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    sft = commands.add_parser(
        "sft",
        help="instruction finetuning (SFT) of a Hugging Face causal LM",
        description="Instruction finetuning: loss on response tokens only, with the fused rlhf_fast.sft_loss. "
        "Writes checkpoints/, metrics.jsonl, metrics.png, config.yaml and model/ to --out_dir.",
        epilog=EPILOG,
    )
    add_config_options(sft, SFTConfig)
    sft.set_defaults(handler=run_sft)
    rm = commands.add_parser(
        "rm",
        help="train a Bradley-Terry reward model on preference pairs",
        description="Reward model: a backbone plus a scalar head on the last non-pad token, trained with the fused "
        "rlhf_fast.pairwise_reward_loss. Writes checkpoints/, metrics.jsonl, metrics.png, config.yaml and reward_model/ to --out_dir.",
        epilog=EPILOG,
    )
    add_config_options(rm, RMConfig)
    rm.set_defaults(handler=run_rm)
    demo = commands.add_parser(
        "demo-data",
        help="write the built-in synthetic task's tokenizer and JSONL files",
        description="Write tokenizer/, sft_train.jsonl, sft_eval.jsonl, pref_train.jsonl and pref_eval.jsonl of the built-in task.",
        formatter_class=formatter,
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="output directory")
    sizes = TaskConfig()
    demo.add_argument("--seed", type=int, default=sizes.seed, help="seed of the generated examples (the trainers' task.seed)")
    demo.add_argument("--sft-train", type=int, default=sizes.sft_train, help="SFT demonstrations to train on")
    demo.add_argument("--sft-eval", type=int, default=sizes.sft_eval, help="held-out SFT demonstrations")
    demo.add_argument("--pref-train", type=int, default=sizes.pref_train, help="preference pairs to train on")
    demo.add_argument("--pref-eval", type=int, default=sizes.pref_eval, help="held-out preference pairs")
    demo.set_defaults(handler=run_demo_data)


def run(args: argparse.Namespace) -> int:
    """Run a training command; configuration, data, file, checkpoint and non-finite-training errors
    (``loop.NonFiniteError``) exit with status 2 and one line."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import NonFiniteError
    from .run import OutDirError

    try:
        return args.handler(args)
    except (ConfigError, DataError, CheckpointError, OutDirError, NonFiniteError, FileNotFoundError, FileExistsError) as exc:
        print(f"rlhf-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a file of the run that cannot be written (or read) midway
        print(f"rlhf-fast {args.command}: error: {exc.filename}: {exc.strerror}; check its permissions or choose another --out_dir", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"rlhf-fast {args.command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"rlhf-fast {args.command}: interrupted", file=sys.stderr)
        return 130
