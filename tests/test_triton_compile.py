"""Compile every Triton kernel configuration for sm_80 and sm_90 and fail on register spills.

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline down
to a cubin with Triton's bundled ptxas, and Triton's bundled cuobjdump reads the resource usage.
A kernel that spills (STACK or LOCAL > 0) is slow on the device even when it is correct, which
the interpreter-based tests cannot see.

Each configuration from ``kernels.token_logprobs.compile_targets()`` and
``kernels.policy_epilogue.compile_targets()`` is compiled twice, as the
launcher would specialise it: with no alignment facts (e.g. V = 32003, row stride 32003), and with
every pointer and integer argument marked divisible by 16 (aligned tensors, V = 128256).

The compilation runs in a subprocess without TRITON_INTERPRET: under the interpreter
``triton.jit`` returns interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)


def _compile_all(arch: int) -> list[dict]:
    """Run in the subprocess: compile every target for sm_<arch>; one dict per compiled kernel."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import triton
    from triton.backends.compiler import GPUTarget

    from rlhf_fast.kernels import policy_epilogue, token_logprobs

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", arch, 32)

    def one(job):
        spec, aligned = job
        attrs = {}
        if aligned:
            args = list(spec["signature"])
            attrs = {
                (args.index(name),): [["tt.divisibility", 16]]
                for name, ty in spec["signature"].items()
                if ty.startswith("*") or (ty == "i32" and name != "ignore_index")
            }
        src = triton.compiler.ASTSource(
            fn=spec["kernel"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs
        )
        compiled = triton.compile(src, target=target, options={"num_warps": spec["num_warps"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            dump = subprocess.run(
                [cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
            ).stdout
        usage = {}
        for line in dump.splitlines():
            if "REG:" in line:
                usage = dict(field.split(":", 1) for field in line.split() if ":" in field)
        return {
            "name": spec["name"] + ("_aligned" if aligned else ""),
            "REG": int(usage["REG"]),
            "STACK": int(usage["STACK"]),
            "LOCAL": int(usage["LOCAL"]),
        }

    specs = token_logprobs.compile_targets() + policy_epilogue.compile_targets()
    jobs = [(spec, aligned) for spec in specs for aligned in (False, True)]
    # ptxas and cuobjdump run as child processes, so threads overlap them.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, jobs))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the 3.6 default
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_triton_compile as t; "
        "print(json.dumps(t._compile_all(int(sys.argv[2]))))"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", code, tests_dir, str(arch)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, f"compilation for sm_{arch} failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results, "compile_targets() listed nothing"
    for r in results:
        print(f"sm_{arch} {r['name']}: REG:{r['REG']} STACK:{r['STACK']} LOCAL:{r['LOCAL']}")
    spills = [r for r in results if r["STACK"] or r["LOCAL"]]
    assert not spills, f"kernels spill on sm_{arch}: {spills}"
