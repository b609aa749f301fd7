"""rlhf_fast._C itself: the host kernels' thread counts, the fused PPO pass against its steps, the
codes and layouts the host side refuses, the build report, that the build compiles every source,
and the CUDA kernels' register budget (nvcc + ptxas, no GPU needed).

What every provider must compute (the host and cuda ones included) is tests/test_providers.py.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.backends.registry import provider

from numerics import IGNORE, bt_case, load_build_script, logits_case, require

ROOT = Path(__file__).resolve().parents[1]


def test_thread_count_does_not_change_results():
    require("host", "cpu", torch.bfloat16)
    from rlhf_fast.backends.extension import dtype_code, extension

    logits, labels = logits_case(64, 3001, torch.bfloat16)
    outputs = []
    for threads in (1, 2, 3):
        logp, entropy, lse = (torch.full((64,), math.nan) for _ in range(3))
        p = extension().TokenLogprobsForwardParams(
            logits=logits.data_ptr(), labels=labels.data_ptr(), logp=logp.data_ptr(), entropy=entropy.data_ptr(),
            lse=lse.data_ptr(), n_rows=64, vocab=3001, logits_row_stride=logits.stride(0),
            dtype=dtype_code(logits.dtype), labels_dtype=dtype_code(labels.dtype), temperature=1.0,
            ignore_index=IGNORE, vocab_offset=0,
        )
        extension().host.token_logprobs_forward(p, num_threads=threads)
        outputs.append(torch.stack([logp, entropy, lse]))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("kl_clamp,unbiased", [(None, True), (0.5, False)])
def test_host_fused_ppo_equals_its_steps(kl_clamp, unbiased):
    """The host's fused pass runs the same per-token functions as its three steps: bitwise equal."""
    require("host", "cpu", torch.float32, "ppo_advantages")
    prov = provider("host")
    mask, logp, ref_logp, scores, values, _, _ = bt_case(9, 777)
    fused = [torch.full(mask.shape, math.nan) for _ in range(3)]
    prov.ppo_advantages_forward(logp, ref_logp, scores, values, mask, *fused, 0.2, "k3", 0.97, 0.9, True, kl_clamp,
                                unbiased)  # fmt: skip
    rewards, advantages, returns = (torch.full(mask.shape, math.nan) for _ in range(3))
    prov.kl_rewards_forward(logp, ref_logp, scores, mask, rewards, 0.2, "k3", kl_clamp)
    prov.gae_forward(rewards, values, mask, advantages, returns, 0.97, 0.9)
    prov.whiten_forward(advantages, mask, advantages, True, unbiased)  # in place
    for a, b in zip(fused, (rewards, advantages, returns)):
        assert torch.equal(a, b)


def test_host_thread_count_does_not_change_results():
    require("host", "cpu", torch.float32, "ppo_advantages")
    from rlhf_fast.backends.extension import extension, kl_estimator_code

    mask, logp, ref_logp, scores, values, _, _ = bt_case(40, 3001)
    results = []
    for threads in (1, 2, 3):
        outs = [torch.full(mask.shape, math.nan) for _ in range(3)]
        p = extension().PpoAdvantagesParams(
            logp=logp.data_ptr(), ref_logp=ref_logp.data_ptr(), scores=scores.data_ptr(), values=values.data_ptr(),
            mask=mask.data_ptr(), rewards=outs[0].data_ptr(), advantages=outs[1].data_ptr(),
            returns=outs[2].data_ptr(), moments=0, rows=40, tokens=3001, beta=0.1, estimator=kl_estimator_code("k2"),
            kl_clamp=0.5, gamma=1.0, lam=0.95, whiten=True, whiten_unbiased=False, whiten_eps=reference.WHITEN_EPS,
        )  # fmt: skip
        extension().host.ppo_advantages_forward(p, num_threads=threads)
        results.append(torch.stack(outs))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_host_rejects_unknown_codes_and_layouts():
    require("host", "cpu", torch.float32, "ppo_advantages")
    prov = provider("host")
    from rlhf_fast.backends.extension import extension

    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    kl = extension().KlRewardsParams(
        logp=x.data_ptr(), ref_logp=x.data_ptr(), scores=x.data_ptr(), mask=mask.data_ptr(), rewards=x.data_ptr(),
        rows=2, tokens=3, beta=0.1, estimator=7, kl_clamp=math.inf,
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown KL estimator code 7"):
        extension().host.kl_rewards_forward(kl, num_threads=1)
    group = extension().GroupAdvantagesParams(scores=x.data_ptr(), out=x.data_ptr(), groups=2, group_size=3, mode=5,
                                             eps=1e-6)
    with pytest.raises(ValueError, match="unknown mode code 5"):
        extension().host.group_advantages_forward(group, num_threads=1)
    with pytest.raises(ValueError, match="values must be contiguous"):
        prov.gae_forward(x, torch.zeros(3, 2).t(), mask, x.clone(), x.clone(), 1.0, 0.9)
    with pytest.raises(ValueError, match="mask must be a contiguous"):
        prov.whiten_forward(x, mask.float(), x.clone(), True)


@pytest.mark.parametrize("inplace", [False, True])
def test_host_policy_epilogue_equals_its_steps(inplace):
    """Rows over several L2-sized chunks, on 1 to 3 threads: the host's one-kernel pass is its
    token_logprobs forward, the epilogue's token gradients and its token_logprobs backward, bitwise."""
    require("host", "cpu", torch.bfloat16, "policy_epilogue")
    from rlhf_fast.options import PolicyLossOptions

    prov = provider("host")
    n, vocab = 96, 3001  # 96 rows of 6 KB: 576 KB, three chunks of 256 KB
    logits, labels = logits_case(n, vocab, torch.bfloat16, row_pad=5)
    old_logp, advantages, weight = torch.randn(n) * 0.3 - 8.0, torch.randn(n), torch.rand(n)
    ref_logp = old_logp + 0.1 * torch.randn(n)
    options = PolicyLossOptions(objective="ppo", clip_eps=0.2, kl_coef=0.1, kl_estimator="k3", kl_clamp=0.5)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            x = logits.clone()
            rows = [torch.full((n,), math.nan) for _ in range(5)]
            grad = x if inplace else torch.full(x.shape, math.nan, dtype=x.dtype)
            prov.policy_epilogue_forward(x, labels, old_logp, advantages, weight * 0.5, weight, ref_logp, *rows, grad,
                                         0.9, IGNORE, options, 0.01)  # fmt: skip
            results.append((torch.stack(rows), grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for rows, grad in results[1:]:
        assert torch.equal(rows, results[0][0]) and torch.equal(grad, results[0][1])
    rows, grad = results[0]
    logp, entropy, lse = (torch.full((n,), math.nan) for _ in range(3))
    prov.token_logprobs_forward(logits, labels, logp, entropy, lse, 0.9, IGNORE)
    assert torch.equal(rows[0], logp) and torch.equal(rows[1], entropy)
    kept = labels != IGNORE
    assert torch.equal(rows[2][kept], lse[kept])
    want = torch.empty(logits.shape, dtype=logits.dtype)
    prov.token_logprobs_backward(logits, labels, lse, entropy, rows[3], rows[4], want, 0.9, IGNORE)
    assert torch.equal(grad, want)
    assert (rows[3][~kept] == 0).all() and torch.equal(rows[4], torch.where(kept, weight * -0.01, 0.0))


def test_host_policy_epilogue_rejects_unknown_codes():
    require("host", "cpu", torch.float32, "policy_epilogue")
    from rlhf_fast.backends.extension import extension

    x, labels = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    fields = {name: 0 for name in extension().PolicyEpilogueParams.fields}
    fields.update(logits=x.data_ptr(), labels=labels.data_ptr(), n_rows=2, vocab=3, logits_row_stride=3,
                  grad_row_stride=3, temperature=1.0, ignore_index=IGNORE, kl_clamp=math.inf)  # fmt: skip
    for codes, message in (({"objective": 9, "kl_estimator": -1}, "unknown objective code 9"),
                           ({"objective": 0, "kl_estimator": 7}, "unknown KL estimator code 7")):
        p = extension().PolicyEpilogueParams(**fields | codes)
        with pytest.raises(ValueError, match=message):
            extension().host.policy_epilogue_forward(p, num_threads=1)


def test_build_info():
    require("host", "cpu", torch.float32)
    from rlhf_fast.backends.extension import extension

    info = extension().build_info()
    assert set(info) >= {"version", "cuda_built", "cuda_version", "cuda_archs", "host_compiler", "reason_no_cuda"}
    assert isinstance(info["version"], str) and info["version"]
    assert isinstance(info["host_compiler"], str) and info["host_compiler"]
    if info["cuda_built"]:
        assert info["reason_no_cuda"] is None and info["cuda_version"]
        assert info["cuda_archs"] and all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
        assert hasattr(extension(), "cuda") and hasattr(extension().cuda, "token_logprobs_forward")
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == [] and info["reason_no_cuda"]
        assert not hasattr(extension(), "cuda")
    assert extension().DTYPE_CODES == {
        "float32": 0, "bfloat16": 1, "float16": 2, "float64": 3, "int32": 4, "int64": 5,
    }


def test_ptxas_parser():
    build = load_build_script()
    report = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers
"""
    kernels = build.parse_ptxas_report(report)
    assert [(k.name, k.arch, k.registers, k.spill_stores, k.spill_loads) for k in kernels] == [
        ("_Z3fooPf", "sm_90", 255, 8, 4), ("_Z3barPf", "sm_90", 32, 0, 0)
    ]
    assert [k.name for k in build.spill_problems(kernels)] == ["_Z3fooPf"]
    assert build.gencode_flags(["80", "90"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]"
    ]
    assert build.cuda_archs("9.0;80") == ["80", "90"]


def test_every_source_is_built():
    """setup.py lists its sources by hand: a csrc file missing there would be silently unused."""
    build = load_build_script()
    host = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "host").glob("*.cpp"))
    cuda = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sorted(build.HOST_SOURCES) == sorted(["csrc/bindings.cpp", *host])
    assert sorted(build.CUDA_SOURCES) == cuda


NVCC = shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_kernels_do_not_spill():
    build = load_build_script()
    include = ROOT / "csrc" / "include"

    def compile_arch(arch: str) -> str:
        cmd = [NVCC, *build.NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{include}",
               "--cubin", "-o", "/dev/null"]
        reports = []
        for source in build.CUDA_SOURCES:
            done = subprocess.run(cmd + [str(ROOT / source)], capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            reports.append(done.stdout + done.stderr)
        return "\n".join(reports)

    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(compile_arch, ["80", "90"]))
    for arch, report in zip(["sm_80", "sm_90"], reports):
        kernels = build.parse_ptxas_report(report)
        assert len(kernels) >= 2 and {k.arch for k in kernels} == {arch}
        assert not build.spill_problems(kernels), build.format_ptxas_table(build.spill_problems(kernels))
