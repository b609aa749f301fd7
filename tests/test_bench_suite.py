"""The benchmark driver (bench/suite.py): end to end on toy shapes, and its verify-before-timing rule.

The end-to-end test runs ``rlhf-fast bench --quick --shapes tiny`` in a subprocess and checks that the rows, the
CSV, the Markdown report and the plots are written and that every row names its device.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from rlhf_fast.bench import bench_fused_linear, bench_policy_loss, harness, merge, suite
from rlhf_fast.bench.bench_pairwise import PairwiseCase
from rlhf_fast.bench.case import Impl
from rlhf_fast.bench.report import objectives_table
from rlhf_fast.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_tiny_run_writes_report_plots_and_device_rows(tmp_path):
    entry = [sys.executable, "-m", "rlhf_fast", "bench"]
    out = tmp_path / "results"
    command = entry + ["--quick", "--shapes", "tiny", "--skip-impls", "compile", "--out", str(out)]
    # One thread: on a loaded 2-core machine, OpenMP barriers make toy-sized ops take milliseconds.
    # No Triton interpreter (conftest.py sets it for the kernel tests): the run benchmarks what
    # serves a CPU for real, and the interpreted kernels would take most of the test's time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    name = harness.device_name("cpu")
    (json_path,) = out.glob("*-suite.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert {r["op"] for r in rows} == set(suite.OPS), "every op family has rows"
    for r in rows:
        assert r["device"] == "cpu" and r["device_name"] == name, f"row without its device: {r['op']} {r['impl']}"
        assert not r["status"].startswith(("FAILED", "OOM")), f"{r['op']} {r['impl']} {r['mode']}: {r['status']}"
        if r["status"] == "ok":
            assert r["verified"] and r["median_ms"] > 0 and any(k.startswith("err_") for k in r)
    assert any(r["impl"] == "eager" and r.get("ratio_vs_eager") == 1.0 for r in rows)

    with (out / "suite.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and all(r["device"] == "cpu" and r["device_name"] == name for r in table)

    (report,) = out.glob(f"*-{harness.device_slug(name)}.md")
    text = report.read_text()
    assert name in text and "## logprobs" in text and "## gae" in text
    plots = sorted((out / "plots").glob("*.png"))
    stems = {p.stem.split(harness.device_slug(name) + "-", 1)[1] for p in plots}
    assert {"logprobs-sweep-vocab", "logprobs-sweep-tokens", "gae-sweep-tokens"} <= stems
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
        assert f"plots/{plot.name}" in text, "the report shows each plot"

    # The rows merge into another results directory (as gpu_check.sh's come home), commit overridden.
    merged = tmp_path / "merged"
    assert merge.main([str(out), "--out", str(merged), "--commit", "abc1234", "--no-readme"]) == 0
    merged_rows = json.loads((merged / json_path.name).read_text())["rows"]
    assert len(merged_rows) == len(rows) and {(r["commit"], r["dirty"]) for r in merged_rows} == {("abc1234", False)}
    assert (merged / report.name).is_file() and len(list((merged / "plots").glob("*.png"))) == len(plots)
    with (merged / "suite.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def _args(**overrides) -> Namespace:
    args = dict(modes=["fwd", "fwd+bwd"], impls=None, skip_impls=["compile"], quick=False, min_reps=2, max_reps=3,
                budget_s=0.0, max_copies=1, no_memory=True, memory_workers=None, deadline_s=None,
                chunk_size=[])  # fmt: skip
    args.update(overrides)
    return Namespace(**args)


class _WithWrongOnes(PairwiseCase):
    """The pairwise case plus a wrong implementation of ours and a wrong peer (loss off by 1%)."""

    def implementations(self):
        wrong = lambda c, r, **kw: ((c.new_tensor(1.01) * self.eager()(c, r, **kw)[0]), {})  # noqa: E731
        return super().implementations() + [Impl("ours-wrong", make=lambda: wrong, ours=True),
                                            Impl("peer-wrong", make=lambda: wrong)]  # fmt: skip


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized ops: OpenMP barriers would dominate on a loaded machine
    yield
    torch.set_num_threads(threads)


def test_wrong_implementations_fail_verification_before_timing(one_thread):
    case = _WithWrongOnes({"B": 64}, torch.float32, torch.device("cpu"), ("headline",))
    env = {"device": "cpu", "device_name": "test"}
    rows = suite.run_case(case, _args(), env, copy_gbps=1.0, deadline=None)
    by = {(r["impl"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert by["eager", mode]["status"] == "ok" and by["eager", mode]["median_ms"] > 0
        assert by["rlhf_fast", mode]["status"] == "ok"
        ours = by["ours-wrong", mode]
        assert ours["status"].startswith("FAILED: loss rel err") and ours["median_ms"] is None and not ours["verified"]
        peer = by["peer-wrong", mode]  # a peer is timed and flagged, never counted as verified
        assert peer["status"].startswith("inexact: loss rel err") and peer["median_ms"] > 0 and not peer["verified"]


def test_policy_loss_rows_per_objective_verified_with_targets(one_thread):
    """Every registered objective, and rollout correction, has eager and backend rows at a toy shape,
    each verified against the float64 oracle, with its ratio to token_logprobs and issue 15's target."""
    case = bench_policy_loss.PolicyLossCase({"B": 2, "T": 16, "V": 1000}, torch.float32, torch.device("cpu"), ("headline",))
    rows = suite.run_case(case, _args(quick=True, shapes="tiny"), {"device": "cpu", "device_name": "test"},
                          copy_gbps=1.0, deadline=None)  # fmt: skip
    by = {(r["impl"], r["mode"]): r for r in rows}
    names = [v.name for v in bench_policy_loss.variants()]
    assert set(OBJECTIVES) - {bench_policy_loss.POLICY["objective"]} <= set(names) and "rollout_is=token" in names
    for name in names:
        eager = by[f"{name}/eager", "fwd+bwd"]
        assert eager["status"] == "ok" and eager["ratio_vs_eager"] == 1.0, eager["status"]
        for backend in ("host", "torch"):
            r = by[f"{name}/backend={backend}", "fwd+bwd"]
            assert r["status"] == "ok" and r["err_loss"] <= r["tol_loss"] and r["err_grad"] <= r["tol_grad"]
            assert r["variant"] == name and r["loss_math_ratio"] > 0 and r["ratio_vs_eager"] > 0
            assert r["target_ratio"] == (1.1 if r["separable"] else 1.3) and "meets_target" not in r  # a GPU target
            assert (f"{name}/backend={backend}", "fwd") not in by
    assert by["gspo/backend=torch", "fwd+bwd"]["separable"] is False and by["gpg/eager", "fwd+bwd"]["separable"]
    table = objectives_table(rows)
    assert all(name in table for name in names), table


def test_linear_policy_loss_rows_softcap_and_coupled_objective(one_thread):
    """fused_linear_policy_loss with a soft-capped head and with a non-separable objective (the two-sweep
    path): rows verified against their own oracle, set against their own eager row."""
    case = bench_fused_linear.LinearPolicyCase({"N": 32, "H": 64, "V": 1000}, torch.float32, torch.device("cpu"), ("headline",))
    rows = suite.run_case(case, _args(impls=["*/*"]), {"device": "cpu", "device_name": "test"}, copy_gbps=1.0,
                          deadline=None)  # fmt: skip
    names = [v.name for v in bench_fused_linear.variants("policy")]
    assert "softcap=30" in names and not OBJECTIVES[names[1]].separable
    ran = [r for r in rows if not r["status"].startswith("skipped")]
    ran_names = {(r["variant"], r["impl"].split("/")[1]) for r in ran}
    assert ran_names >= {(n, i) for n in names for i in ("eager", "backend=host", "backend=torch")}
    for r in ran:
        assert r["mode"] == "fwd+bwd" and r["status"] == "ok" and r["ratio_vs_eager"] > 0, (r["impl"], r["status"])


def test_quick_cpu_run_samples_the_objectives():
    case = bench_policy_loss.PolicyLossCase({"B": 1, "T": 512, "V": 32000}, torch.float32, torch.device("cpu"), ("headline",))
    chosen = {i.name.split("/")[0] for i in case.implementations() if "/" in i.name and not i.name.startswith("token_")
              and suite.selected(case, i, _args(quick=True, shapes=None))}  # fmt: skip
    assert chosen == bench_policy_loss.quick_cpu_variants() and len(chosen) == 3
    cuda = bench_policy_loss.PolicyLossCase(case.dims, torch.bfloat16, torch.device("cuda"), ("headline",))
    assert all(suite.selected(cuda, i, _args(quick=True, shapes=None)) for i in cuda.implementations()
               if "/" in i.name and not i.name.startswith("token_"))  # fmt: skip


def test_shapes_filter_and_explicit_shapes():
    args = _args(ops=["logprobs", "gae"], shapes="sweep-vocab,gae:8x32", quick=True, dtype=None)
    cases = suite.build_cases(args, torch.device("cpu"))
    assert all(c.op == "logprobs" and "sweep-vocab" in c.tags for c in cases if c.op == "logprobs")
    assert [c.dims for c in cases if c.op == "gae"] == [{"B": 8, "T": 32}]
    with pytest.raises(SystemExit, match="gae takes BxT"):
        suite.build_cases(_args(ops=["gae"], shapes="gae:8x32x4", quick=True, dtype=None), torch.device("cpu"))
