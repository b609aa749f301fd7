"""The lean core: rlhf_fast's ops, nn, backends and `info` need only torch and numpy; the training
part without its extra fails with one line naming it. And nothing of ours hides an installed
package when Python runs from the repository root (Hugging Face's `kernels`, which transformers
imports, against our kernels/ folder)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_fast.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
TRAIN_MODULES = sorted({module for extra in EXTRAS.values() for module in extra})

# Runs every public op on small random inputs (forward and backward), then the CLI's info.
CORE_USE = textwrap.dedent("""
    import sys
    import torch
    import rlhf_fast
    from rlhf_fast.__main__ import main

    B, T, V, H = 2, 5, 37, 8
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    old, ref, values = torch.randn(B, T) - 3, torch.randn(B, T) - 3, torch.randn(B, T)
    scores = torch.randn(B)
    logp, entropy = rlhf_fast.token_logprobs(logits, labels, return_entropy=True)
    rewards = rlhf_fast.kl_penalized_rewards(logp.detach(), ref, scores, mask, beta=0.1)
    advantages, returns = rlhf_fast.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = rlhf_fast.whiten(advantages, mask)
    group = rlhf_fast.group_advantages(scores, group_size=2, mode="grpo")
    loss, stats = rlhf_fast.fused_policy_loss(logits, labels, old, advantages, mask)
    loss = loss + rlhf_fast.sft_loss(logits, labels) + rlhf_fast.policy_loss(logp, old, advantages, mask)[0]
    loss = loss + rlhf_fast.value_loss(values.requires_grad_(), values.detach() + 0.1, returns, mask)
    hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    loss = loss + rlhf_fast.fused_linear_policy_loss(hidden, weight, labels, old, group, mask)[0]
    loss = loss + rlhf_fast.linear_sft_loss(hidden, weight, labels)
    loss = loss + rlhf_fast.linear_token_logprobs(hidden, weight, labels).sum()
    loss = loss + rlhf_fast.pairwise_reward_loss(torch.randn(4, requires_grad=True), torch.randn(4))[0]
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(weight.grad).all()
    assert main(["info"]) == 0
""")

MISSING_EXTRA = textwrap.dedent(f"""
    from rlhf_fast.extras import MissingExtra
    try:
        import rlhf_fast.train
    except MissingExtra as error:
        print("import error:", error)
    else:
        raise AssertionError("rlhf_fast.train imported without the [train] extra")
    code = main(["sft", "--train.steps", "1"])
    print("sft exit code:", code)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {TRAIN_MODULES!r})
    assert not leaked, leaked
""")


def run_python(code: str, *, cwd: Path, python: str = sys.executable, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def check_core_run(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "backends on cpu" in proc.stdout
    assert re.search(r"import error: rlhf_fast\.train needs the \[train\] extra \(missing: .*transformers", proc.stdout)
    assert "sft exit code: 2" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "rlhf-fast sft needs the [train] extra" in errors[0] and "pip install 'rlhf_fast[train]'" in errors[0], errors


def test_core_works_without_the_training_packages(tmp_path):
    """With torch, numpy and their requirements only on the path (no site-packages): every op,
    forward and backward, `info`, and a one-line error for the training part (import and CLI)."""
    core = tmp_path / "core"
    core.mkdir()
    _core_site(core)
    env = {**os.environ, "PYTHONPATH": f"{core}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-S", "-c", CORE_USE + MISSING_EXTRA], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=600)
    check_core_run(proc)


def test_running_from_the_repository_root_hides_no_installed_package():
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    proc = run_python("from transformers import LlamaConfig; import kernels; print(kernels.__file__)", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not Path(proc.stdout.strip()).resolve().is_relative_to(ROOT), proc.stdout


def test_info_and_collection_from_the_repository_root():
    for args in (["-m", "rlhf_fast", "info"], ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def _core_site(target: Path) -> None:
    """Symlinks to torch, numpy and what they require (nothing else) from this environment."""
    todo, seen = ["torch", "numpy"], set()
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        for requirement in dist.requires or []:
            if ";" not in requirement or "extra" not in requirement.split(";", 1)[1]:
                todo.append(requirement)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (site / top).exists() and not (target / top).exists():
                (target / top).symlink_to(site / top)


@pytest.mark.slow
def test_core_only_venv(tmp_path):
    """A real environment with torch and numpy only: `pip install .` pulls in nothing else, the ops
    and `python -m rlhf_fast info` work, training says which extra to install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = Path(run_python("import site; print(site.getsitepackages()[0])", cwd=tmp_path, python=python).stdout.strip())
    core = tmp_path / "core"
    core.mkdir()
    _core_site(core)
    (site / "core.pth").write_text(str(core) + "\n")
    env = {**os.environ, "RLHF_FAST_SKIP_CUDA": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    listed = run_python("import importlib.metadata as m; print(sorted(d.metadata['Name'].lower() for d in m.distributions()))",
                        cwd=tmp_path, python=python).stdout
    for dist in ("transformers", "tokenizers", "safetensors", "tqdm", "matplotlib", "pyyaml"):
        assert f"'{dist}'" not in listed, listed
    check_core_run(run_python(CORE_USE + MISSING_EXTRA, cwd=tmp_path, python=python, env=env))
