"""rlhf-fast sft / rm / demo-data: documented options, config files with overrides, errors, smoke runs."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf_fast.__main__ import main
from rlhf_fast.train.config import RMConfig, SFTConfig, iter_fields
from rlhf_fast.train.reward_model import RewardModel

TINY = [
    "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
    "--train.batch_size", "8", "--train.steps", "3", "--train.progress", "false", "--train.eval_batch_size", "16",
]  # fmt: skip


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command, cls", [("sft", SFTConfig), ("rm", RMConfig)])
def test_help_documents_every_option(capsys, command, cls):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key, _, default, doc in iter_fields(cls):
        assert f"--{key}" in text, key
        assert " ".join(doc.split()[:6]) in text, key
        assert f"(default: {default})" in text
    for option in ("--config FILE", "--print-config"):
        assert option in text


def test_config_file_with_command_line_overrides(tmp_path, capsys):
    path = tmp_path / "rm.yaml"
    path.write_text("train:\n  steps: 5\n  batch_size: 4\noptim:\n  lr: 1e-4\n")
    code, out, _ = run_cli(capsys, "rm", "--config", str(path), "--train.steps", "9", "--resume", "--print-config")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["train"]["steps"] == 9 and resolved["train"]["batch_size"] == 4
    assert resolved["optim"]["lr"] == 1e-4 and resolved["resume"] is True
    assert resolved["optim"]["warmup_steps"] == RMConfig().optim.warmup_steps


def test_configuration_and_data_errors_exit_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  max_lenght: 10\n")
    code, _, err = run_cli(capsys, "sft", "--config", str(path))
    assert code == 2
    assert "unknown key 'data.max_lenght'" in err and "valid keys of data: train_path, eval_path" in err
    assert "Traceback" not in err

    code, _, err = run_cli(capsys, "sft", "--out_dir", str(tmp_path / "o"), "--data.train_path", str(tmp_path / "none.jsonl"), *TINY)
    assert code == 2 and "data.train_path=" in err and "no such file" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "write 3 words about sea :", "response": "wave"}\n{"prompt": "x"}\n')
    code, _, err = run_cli(capsys, "sft", "--out_dir", str(tmp_path / "o"), "--data.train_path", str(bad), *TINY)
    assert code == 2 and f"{bad}:2: missing field 'response'" in err

    code, _, err = run_cli(capsys, "sft", "--train.steps", "0")
    assert code == 2 and "train.steps must be >= 1, got 0" in err

    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--train.stepz", "3"])
    assert exit_info.value.code == 2


def test_sft_then_rm_from_the_sft_policy(tmp_path, capsys):
    sft_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
    sizes = ["--task.sft_train", "64", "--task.sft_eval", "16", "--task.pref_train", "64", "--task.pref_eval", "32"]
    code, out, err = run_cli(capsys, "sft", "--out_dir", str(sft_dir), *TINY, *sizes)
    assert code == 0, err
    assert "held-out loss" in out and (sft_dir / "model" / "config.json").is_file()

    code, out, err = run_cli(capsys, "rm", "--out_dir", str(rm_dir), "--model.path", str(sft_dir / "model"), *TINY, *sizes)
    assert code == 0, err
    assert "held-out pair accuracy" in out and "gold ceiling" in out
    rm = RewardModel.from_pretrained(rm_dir / "reward_model")
    assert rm.config.hidden_size == 32
    records = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert (rm_dir / "metrics.png").is_file()


def test_rm_on_files_written_by_demo_data(tmp_path, capsys):
    data = tmp_path / "data"
    code, out, _ = run_cli(capsys, "demo-data", "--out", str(data), "--sft-train", "8", "--sft-eval", "4", "--pref-train", "32", "--pref-eval", "16")
    assert code == 0 and "gold ceiling accuracy on pref_eval" in out
    code, out, err = run_cli(
        capsys,
        "rm",
        "--out_dir", str(tmp_path / "rm"),
        "--tokenizer.path", str(data / "tokenizer"),
        "--data.train_path", str(data / "pref_train.jsonl"),
        "--data.eval_path", str(data / "pref_eval.jsonl"),
        *TINY,
    )  # fmt: skip
    assert code == 0, err
    assert "(16 pairs)" in out and "gold ceiling" in out


def test_info_still_works(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and "backends on cpu" in out
