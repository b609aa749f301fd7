"""--resume with options that differ from the checkpoint's: optimizer options are applied (the schedule
continues at the checkpoint's step with the new values), model/data/algorithm options are refused with
one line; config.yaml records what runs."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf_fast.__main__ import main
from rlhf_fast.train.config import ConfigError
from rlhf_fast.train.loop import warmup_cosine
from rlhf_fast.train.run import check_resume

TINY = [
    "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2", "--model.intermediate_size", "64",
    "--train.batch_size", "8", "--train.progress", "false", "--train.device", "cpu", "--train.eval_every", "0",
    "--task.sft_train", "32", "--task.sft_eval", "8", "--optim.warmup_steps", "1", "--train.log_every", "1",
]  # fmt: skip


def sft(capsys, out_dir, *argv):
    code = main(["sft", "--out_dir", str(out_dir), *TINY, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_lrs(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["split"] == "train"}


def test_new_learning_rate_is_applied_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = sft(capsys, out, "--train.steps", "2")
    assert code == 0, err
    code, stdout, err = sft(capsys, out, "--train.steps", "4", "--optim.lr", "5e-4", "--optim.beta2", "0.99", "--resume")
    assert code == 0, err
    assert "note: --resume from step 2 with changed options: optim.lr 0.001 -> 0.0005, optim.beta2 0.95 -> 0.99" in stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 5e-4 and saved["optim"]["beta2"] == 0.99 and saved["train"]["steps"] == 4
    lrs = train_lrs(out)
    for step in (3, 4):  # the new peak lr on the new 4-step schedule, from the checkpoint's step on
        assert lrs[step] == pytest.approx(5e-4 * warmup_cosine(step - 1, warmup=1, total=4, min_ratio=0.1), rel=1e-12)
    assert lrs[1] == pytest.approx(1e-3)


@pytest.mark.parametrize("option, value, shown", [
    ("--model.hidden_size", "64", "model.hidden_size is 32 there and 64 now"),
    ("--task.sft_train", "40", "task.sft_train is 32 there and 40 now"),
    ("--train.seed", "5", "train.seed is 0 there and 5 now"),
])  # fmt: skip
def test_changed_model_or_data_is_refused(tmp_path, capsys, option, value, shown):
    out = tmp_path / "run"
    code, _, err = sft(capsys, out, "--train.steps", "2")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = sft(capsys, out, "--train.steps", "4", option, value, "--resume")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert shown in err and "a resumed run keeps its model, data and algorithm" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "a refused resume wrote something"


def test_check_resume_classifies_options():
    saved = {"out_dir": "a", "train": {"steps": 2, "batch_size": 8}, "optim": {"lr": 1.0}, "algo": {"kl_coef": 0.1}}
    assert check_resume({**saved, "out_dir": "b", "train": {"steps": 9, "batch_size": 8}}, saved, None) == []
    notes = check_resume({**saved, "train": {"steps": 2, "batch_size": 4}, "optim": {"lr": 2.0}}, saved, None)
    assert notes == ["train.batch_size 8 -> 4", "optim.lr 1.0 -> 2.0"]
    with pytest.raises(ConfigError, match="algo.kl_coef is 0.1 there and 0.2 now"):
        check_resume({**saved, "algo": {"kl_coef": 0.2}}, saved, None)
    # An option only the newer config knows is not compared.
    assert check_resume({**saved, "algo": {"kl_coef": 0.1, "new_option": 1}}, saved, None) == []
