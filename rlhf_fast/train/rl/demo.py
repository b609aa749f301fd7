"""`rlhf-fast demo`: the whole pipeline on the built-in synthetic task in one command, no download.

    SFT (imitate a mediocre demonstrator) -> reward model (Bradley-Terry pairs) -> RL (ppo | grpo | reinforce)

then a table of the SFT policy vs the RL policy on held-out prompts (gold score mean and standard
error, proxy reward-model score, KL to the reference, and the RM's held-out accuracy beside its
ceiling), written as ``summary.json`` (keys in ``SUMMARY_KEYS``) with ``demo.png`` (gold, proxy
score and KL over the RL steps: a rising proxy with a flat or falling gold is over-optimisation).

Each stage writes its own directory under --out and is skipped when its final model is already
there, so an interrupted demo continues where it stopped. Defaults are sized for a 2-core CPU
(a few minutes); the fused ops run through the "auto" backend (host C++ on CPU, Triton/CUDA on GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import dist

# Keys of summary.json; each figure of the table, for the SFT and the RL policy where it applies.
SUMMARY_KEYS = {
    "algo": "RL algorithm",
    "eval_prompts": "held-out prompts of the evaluation",
    "sft.gold / rl.gold": "mean hidden gold score of sampled responses",
    "sft.gold_se / rl.gold_se": "its standard error",
    "sft.proxy / rl.proxy": "mean reward-model score (the proxy RL optimises)",
    "sft.kl / rl.kl": "KL to the reference (the SFT policy), k1 per sequence in nats",
    "sft.length / rl.length": "mean response length in tokens",
    "gold_gain_se": "(rl.gold - sft.gold) / sqrt(sft.gold_se^2 + rl.gold_se^2)",
    "rm.accuracy": "reward model held-out pair accuracy (noisy Bradley-Terry labels)",
    "rm.expected_accuracy": "its accuracy with the label noise integrated out",
    "rm.gold_ceiling": "the best possible (gold) scorer's expected accuracy",
    "rm.gold_scorer_accuracy": "the gold scorer's accuracy on the same noisy labels",
    "best_gold": "gold score of the best responses",
    "seconds": "wall time of each stage",
}

# Per-algorithm RL settings of the demo (on top of RLConfig's defaults).
ALGO_SETTINGS = {
    "ppo": {"rollout.group_size": 1, "algo.epochs": 2, "algo.mini_batch_size": 32, "algo.kl_place": "reward", "algo.kl_estimator": "k1"},
    "grpo": {"rollout.group_size": 4, "algo.epochs": 2, "algo.mini_batch_size": 32, "algo.kl_place": "loss", "algo.kl_estimator": "k3", "algo.group_mode": "grpo"},
    "reinforce": {"rollout.group_size": 4, "algo.mini_batch_size": 64, "optim.lr": 1e-3, "algo.baseline": "rloo", "algo.kl_place": "reward", "algo.kl_estimator": "k1"},
}

MODEL = {"model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.intermediate_size": 256}


def demo_configs(out: Path, *, algo: str = "ppo", seed: int = 0, sft_steps: int = 300, rm_steps: int = 150,
                 rl_steps: int = 30, device: str = "auto", progress: bool = True, overrides: dict | None = None):
    """(SFTConfig, RMConfig, RLConfig) of the demo under ``out``; ``overrides`` = {"sft" | "rm" | "rl": {key: value}}."""
    overrides = overrides or {}
    from ..config import RMConfig, SFTConfig, load_config
    from .config import RLConfig

    common = {"train.seed": seed, "task.seed": seed, "train.device": device, "train.progress": progress}
    sft = load_config(SFTConfig, None, {
        "out_dir": str(out / "sft"), **MODEL, **common, "train.steps": sft_steps, "train.batch_size": 32,
        "train.eval_every": 0, "train.save_every": 100, "task.sft_train": 4000, "task.sft_eval": 256, **overrides.get("sft", {}),
    })  # fmt: skip
    rm = load_config(RMConfig, None, {
        "out_dir": str(out / "rm"), "model.path": str(out / "sft" / "model"), **common, "train.steps": rm_steps,
        "train.batch_size": 32, "train.eval_every": 0, "train.save_every": 50, "task.pref_train": 6000, "task.pref_eval": 512,
        **overrides.get("rm", {}),
    })  # fmt: skip
    rl = load_config(RLConfig, None, {
        "out_dir": str(out / "rl"), "model.path": str(out / "sft" / "model"), "reward.model_path": str(out / "rm" / "reward_model"),
        **common, "algo.name": algo, "rollout.batch_size": 64, "rollout.max_new_tokens": 14, "optim.lr": 3e-4,
        "algo.kl_coef": 0.02, "train.steps": rl_steps, "train.save_every": 10, "train.eval_prompts": 256, **ALGO_SETTINGS[algo],
        **overrides.get("rl", {}),
    })  # fmt: skip
    return sft, rm, rl


def _stage(name: str, done: Path, run) -> float:
    """Run a stage unless its final output exists; resume its checkpoints when a previous try was cut off."""
    start = time.monotonic()
    if done.exists():
        if dist.is_main():
            print(f"[demo] {name}: {done} exists, skipped", flush=True)
        return 0.0
    if dist.is_main():
        print(f"[demo] {name} ...", flush=True)
    run()
    return time.monotonic() - start


def run_demo(out: str | Path = "runs/demo", *, algo: str = "ppo", seed: int = 0, sft_steps: int = 300, rm_steps: int = 150,
             rl_steps: int = 30, device: str = "auto", progress: bool = True, overrides: dict | None = None) -> dict:
    """Run SFT -> RM -> RL -> evaluation; print the table and return the summary (also out/summary.json)."""
    from ..rm import RMTrainer
    from .trainer import RLTrainer
    from ..sft import SFTTrainer

    out = Path(out)
    sft_cfg, rm_cfg, rl_cfg = demo_configs(out, algo=algo, seed=seed, sft_steps=sft_steps, rm_steps=rm_steps,
                                           rl_steps=rl_steps, device=device, progress=progress, overrides=overrides)
    for cfg in (sft_cfg, rm_cfg, rl_cfg):  # continue a stage that was interrupted (before or after a checkpoint)
        cfg.resume = Path(cfg.out_dir).exists()
    seconds = {}
    seconds["sft"] = _stage("SFT", out / "sft" / "model", lambda: SFTTrainer(sft_cfg).train())
    seconds["rm"] = _stage("reward model", out / "rm" / "reward_model", lambda: RMTrainer(rm_cfg).train())
    rl_holder = {}

    def run_rl():
        rl_holder["trainer"] = RLTrainer(rl_cfg)
        rl_holder["trainer"].train()

    seconds["rl"] = _stage(f"RL ({algo})", out / "rl" / "model", run_rl)

    start = time.monotonic()
    if "trainer" in rl_holder:
        trainer = rl_holder["trainer"]
    else:  # RL was done before: evaluate its saved policy
        from ..models import load_policy
        from ..config import ModelConfig

        trainer = RLTrainer(rl_cfg)
        trainer.policy.load_state_dict(load_policy(ModelConfig(path=str(out / "rl" / "model")), trainer.tokenizer).state_dict())
    rl_eval = trainer.evaluate()
    sft_eval = trainer.evaluate(trainer.ref_policy)
    seconds["eval"] = time.monotonic() - start
    rm_eval = json.loads((out / "rm" / "summary.json").read_text())["eval"]
    summary = make_summary(algo, sft_eval, rl_eval, rm_eval, trainer.task.topic_weight, seconds)
    if dist.is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_demo(out / "rl" / "metrics.jsonl", out / "demo.png", algo)
        print(format_table(summary), flush=True)
        print(f"summary: {out / 'summary.json'}   plot: {out / 'demo.png'}", flush=True)
    return summary


def make_summary(algo, sft_eval, rl_eval, rm_eval, best_gold, seconds) -> dict:
    def pick(e):
        return {"gold": e["gold"], "gold_se": e["gold_se"], "proxy": e.get("rm_score"), "proxy_se": e.get("rm_score_se"),
                "kl": e.get("kl", 0.0), "length": e["length"]}  # fmt: skip

    sft, rl = pick(sft_eval), pick(rl_eval)
    gain_se = (rl["gold"] - sft["gold"]) / max((sft["gold_se"] ** 2 + rl["gold_se"] ** 2) ** 0.5, 1e-12)
    rm = {k: rm_eval[k] for k in ("accuracy", "expected_accuracy", "gold_ceiling", "gold_scorer_accuracy") if k in rm_eval}
    return {"algo": algo, "eval_prompts": int(rl_eval["prompts"]), "sft": sft, "rl": rl, "gold_gain_se": gain_se,
            "rm": rm, "best_gold": best_gold, "seconds": {k: round(v, 1) for k, v in seconds.items()}}  # fmt: skip


def format_table(s: dict) -> str:
    sft, rl, rm = s["sft"], s["rl"], s["rm"]
    lines = [
        f"held-out prompts: {s['eval_prompts']}   algorithm: {s['algo']}   (best possible gold: {s['best_gold']:.1f})",
        f"{'':<26}{'SFT policy':>16}{'RL policy':>16}",
        f"{'gold score (mean +- se)':<26}{sft['gold']:>9.3f} +-{sft['gold_se']:.3f}{rl['gold']:>9.3f} +-{rl['gold_se']:.3f}",
        f"{'proxy RM score':<26}{sft['proxy']:>16.3f}{rl['proxy']:>16.3f}",
        f"{'KL to reference (nats)':<26}{sft['kl']:>16.3f}{rl['kl']:>16.3f}",
        f"{'response length':<26}{sft['length']:>16.2f}{rl['length']:>16.2f}",
        f"gold gain: {rl['gold'] - sft['gold']:+.3f} = {s['gold_gain_se']:.1f} standard errors",
    ]
    if rm:
        lines.append(
            f"reward model held-out accuracy {rm['accuracy']:.3f} (noise-free {rm.get('expected_accuracy', float('nan')):.3f}) "
            f"vs gold ceiling {rm.get('gold_ceiling', float('nan')):.3f}"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def plot_demo(metrics_path: Path, path: Path, algo: str) -> Path | None:
    """Gold score and proxy (reward-model) score on one panel, KL on another, over the RL steps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..metrics import read_metrics

    records = [r for r in read_metrics(metrics_path) if r.get("split") == "train"]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("gold", "gold score (hidden)"), ("rm_score", "proxy: reward model")):
        if all(key in r for r in records):
            ax1.plot(steps, [r[key] for r in records], label=label)
    ax1.set_xlabel("RL step")
    ax1.set_title("score")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["kl"] for r in records], color="C3")
    ax2.set_xlabel("RL step")
    ax2.set_title("KL to the reference (nats / sequence)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"demo: {algo} on the synthetic task")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
