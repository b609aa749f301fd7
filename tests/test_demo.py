"""`rlhf-fast demo` in miniature (a few steps per stage) and the rl/demo command line."""

from __future__ import annotations

import argparse
import json

import pytest

from rlhf_fast.train.cli import run as run_command
from rlhf_fast.train.rl.cli import add_rl_commands
from rlhf_fast.train.rl.demo import format_table, run_demo


TINY = {
    "sft": {"task.sft_train": 64, "task.sft_eval": 16},
    "rm": {"task.pref_train": 64, "task.pref_eval": 32},
    "rl": {"train.eval_prompts": 16, "rollout.batch_size": 16, "algo.mini_batch_size": 16, "algo.micro_batch_size": 16},
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-fast")
    add_rl_commands(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.slow
def test_tiny_demo_writes_the_table_summary_and_plot(tmp_path, capsys):
    summary = run_demo(tmp_path, algo="grpo", sft_steps=4, rm_steps=4, rl_steps=2, device="cpu", progress=False,
                       overrides=TINY)  # fmt: skip
    for section in ("sft", "rl"):
        assert {"gold", "gold_se", "proxy", "kl", "length"} <= set(summary[section])
    assert {"accuracy", "gold_ceiling", "expected_accuracy"} <= set(summary["rm"])
    assert summary["eval_prompts"] == 16 and summary["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["gold_gain_se"] == pytest.approx(summary["gold_gain_se"])
    assert (tmp_path / "demo.png").is_file()
    out = capsys.readouterr().out
    assert format_table(summary) in out and "gold score (mean +- se)" in out
    # A second run finds every stage done and only evaluates again.
    run_demo(tmp_path, algo="grpo", sft_steps=4, rm_steps=4, rl_steps=2, device="cpu", progress=False,
             overrides=TINY)  # fmt: skip
    assert capsys.readouterr().out.count("exists, skipped") == 3


def test_rl_command_line_errors_exit_2_with_one_line(tmp_path, capsys):
    args = parser().parse_args(["rl", "--out_dir", str(tmp_path), "--rollout.max_new_tokens", "0"])
    assert run_command(args) == 2
    assert "rollout.max_new_tokens must be >= 1, got 0" in capsys.readouterr().err
    args = parser().parse_args(["rl", "--out_dir", str(tmp_path), "--model.path", str(tmp_path / "missing"), "--reward.gold"])
    assert run_command(args) == 2
    assert "model.path" in capsys.readouterr().err


def test_rl_print_config_lists_every_section(tmp_path, capsys):
    args = parser().parse_args(["rl", "--print-config", "--algo.name", "grpo", "--rollout.group_size", "4"])
    assert run_command(args) == 0
    text = capsys.readouterr().out
    for section in ("rollout:", "reward:", "algo:", "optim:", "train:"):
        assert section in text
    assert "name: grpo" in text
