"""Command line of the RL stage and the demo: ``rlhf-fast rl`` and ``rlhf-fast demo``.

``add_rl_commands(subparsers)`` registers both; each sets ``handler``, so ``cli.run`` dispatches
them like sft and rm, with the same error handling (exit status 2 and a one-line message for
configuration and data errors).
"""

from __future__ import annotations

import argparse

from ...objectives import OBJECTIVES
from ..cli import add_config_options, run_trainer, training_session
from .config import ALGOS, RLConfig


def run_rl(args: argparse.Namespace) -> int:
    from .trainer import RLTrainer

    def report(trainer, metrics):
        if metrics:
            print("held-out: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        else:
            print("no held-out evaluation (no data.eval_path, or train.eval_prompts 0)")
        print(f"policy saved to {trainer.out_dir / 'model'}")

    return run_trainer(args, RLConfig, RLTrainer, lambda trainer: trainer.step, report)


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with training_session():
        summary = run_demo(
            args.out, algo=args.algo, seed=args.seed, sft_steps=args.sft_steps, rm_steps=args.rm_steps,
            rl_steps=args.rl_steps, device=args.device, progress=not args.no_progress,
            overrides={"rl": {"algo.objective": args.objective}},
        )  # fmt: skip
    return 0 if summary["gold_gain_se"] >= 3.0 or not args.check else 1


RL_EPILOG = """Algorithms: ppo (critic, GAE, KL penalty in the reward, fixed or adaptive beta), grpo (G samples per
prompt, group advantages, KL as a loss term), reinforce (Monte Carlo policy gradient, optional baseline).
Rewards: a reward model (--reward.model_path) and/or a function (--reward.fn module:name; --reward.gold true: the
built-in task's gold score), also scored on the
held-out prompts (score, rm_score, fn_score). Prompts: JSONL {"prompt": str} or {"messages": [...]} (chat template).
Exit status 2 and a one-line message for configuration, data, reward-function and output-directory errors,
and for training that turns NaN/inf (a NaN/inf reward, or train.max_nonfinite_skips updates in a row);
Ctrl-C exits 130 naming the last checkpoint, from which --resume continues."""


def add_rl_commands(commands) -> None:
    """Register ``rl`` and ``demo`` on an argparse subparsers object."""
    rl = commands.add_parser(
        "rl",
        help="RL finetuning (PPO, GRPO, REINFORCE) of a policy against its frozen starting point",
        description="RL on prompts: sample with generate (KV cache), score with a reward model or the task's gold, "
        "update with the fused policy loss. Writes checkpoints/, metrics.jsonl, metrics.png, config.yaml, "
        "summary.json and model/ to --out_dir.",
        epilog=RL_EPILOG,
    )
    add_config_options(rl, RLConfig)
    rl.set_defaults(handler=run_rl)

    demo = commands.add_parser(
        "demo",
        help="the whole pipeline on the built-in task: SFT -> reward model -> RL, then SFT vs RL on held-out prompts",
        description="Synthetic instruction-following task (no download) with a hidden gold score. Writes sft/, rm/, rl/, "
        "summary.json and demo.png to --out; a stage whose final model exists is skipped (rerun to continue).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory")
    demo.add_argument("--algo", choices=ALGOS, default="ppo", help="RL algorithm")
    demo.add_argument("--algo.objective", dest="objective", choices=tuple(OBJECTIVES), default="ppo",
                      help="policy objective of the RL stage (rlhf_fast.objectives)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the models and sampling")
    demo.add_argument("--sft-steps", type=int, default=300, help="SFT optimizer steps")
    demo.add_argument("--rm-steps", type=int, default=150, help="reward model optimizer steps")
    demo.add_argument("--rl-steps", type=int, default=30, help="RL steps")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--check", action="store_true", help="exit 1 unless the RL gold score beats SFT's by 3 standard errors")
    demo.set_defaults(handler=run_demo_command)
