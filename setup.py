"""Build of rlhf_fast: the Python packages and the rlhf_fast._C extension (host C++, CUDA when nvcc is found).

rlhf_fast._C is one pybind11 module without libtorch: kernels take raw pointers, sizes, strides, a
dtype code and (CUDA) a stream. The host C++ part is always built; the CUDA part whenever nvcc is
found, and then a CUDA build failure fails the whole build (no silent CPU-only fallback). The
compile is driven by ninja (a build.ninja in the build directory) when ninja is installed, else
by parallel subprocesses.

Environment:
  RLHF_FAST_SKIP_CUDA=1          build the host part only
  RLHF_FAST_CUDA_ARCHS="80;90"   SM versions to emit cubins for; the highest also gets PTX, for
                                 newer GPUs (default "80;90": sm_80, sm_90 and compute_90 PTX)
  CUDA_HOME / CUDA_PATH          toolkit to use (else nvcc on PATH)
  CXX                            host compiler (default c++), also nvcc's -ccbin
  MAX_JOBS                       parallel compile jobs

CUDA kernels are compiled with `-Xptxas -v`; the register/spill report is printed, and any spill
(or stack frame) in a kernel fails the build: a spilling memory-bound kernel loses its bandwidth.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
HOST_SOURCES = ["csrc/bindings.cpp", "csrc/host/token_logprobs.cpp", "csrc/host/kl_rewards.cpp", "csrc/host/gae.cpp",
                "csrc/host/whiten.cpp", "csrc/host/group_advantages.cpp", "csrc/host/policy_epilogue.cpp"]
CUDA_SOURCES = ["csrc/cuda/token_logprobs.cu", "csrc/cuda/kl_rewards.cu", "csrc/cuda/gae.cu", "csrc/cuda/whiten.cu",
                "csrc/cuda/group_advantages.cu", "csrc/cuda/policy_epilogue.cu"]
DEFAULT_CUDA_ARCHS = "80;90"

CXX_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-pthread", "-Wall"]
# Host kernels: `omp simd` reductions (no OpenMP runtime), fused multiply-adds where the clone has
# them, and no FP-exception semantics so that GCC if-converts the selects in the exponential and
# vectorises the loop (results are unchanged: only exception flags are given up).
HOST_KERNEL_FLAGS = ["-fopenmp-simd", "-ffp-contract=fast", "-fno-trapping-math"]
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xptxas", "-v", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler",
              "-fvisibility=hidden"]


# ----------------------------------------------------------------------------------------------
# CUDA toolkit discovery


@dataclass
class CudaToolkit:
    nvcc: str
    version: str  # "13.0"
    lib_dir: str  # holds libcudart_static.a


def find_cuda() -> tuple[CudaToolkit | None, str]:
    """The toolkit to build with, or None and the reason (goes into build_info()['reason_no_cuda'])."""
    if os.environ.get("RLHF_FAST_SKIP_CUDA", "0") not in ("", "0"):
        return None, f"RLHF_FAST_SKIP_CUDA={os.environ['RLHF_FAST_SKIP_CUDA']}"
    nvcc = None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            nvcc = str(Path(home) / "bin" / "nvcc")
            break
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found (not on PATH, and CUDA_HOME/CUDA_PATH do not hold bin/nvcc)"

    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise RuntimeError(f"could not read the CUDA version from `{nvcc} --version`:\n{out}")
    # nvcc may be a wrapper script: ask it where its toolkit is (TOP, _TARGET_DIR_ of --dryrun).
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    top = re.search(r"^#\$ TOP=(.*)$", dry, re.M)
    target = re.findall(r"^#\$ _TARGET_DIR_=(.+)$", dry, re.M)
    home = Path(top.group(1)).resolve() if top else Path(nvcc).resolve().parent.parent
    candidates = [home / target[-1] / "lib"] if target else []
    candidates += [home / "lib64", home / "lib"]
    for lib_dir in candidates:
        if (lib_dir / "libcudart_static.a").is_file():
            return CudaToolkit(nvcc, match.group(1), str(lib_dir)), ""
    raise RuntimeError(f"nvcc found at {nvcc}, but no libcudart_static.a in {[str(c) for c in candidates]}")


def cuda_archs(spec: str | None = None) -> list[str]:
    """SM versions from RLHF_FAST_CUDA_ARCHS ("80;90", "8.0 9.0", "90a"), sorted."""
    spec = spec if spec is not None else os.environ.get("RLHF_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", spec.strip()) if a]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?", a)]
    if bad or not archs:
        raise ValueError(f"RLHF_FAST_CUDA_ARCHS={spec!r}: expected SM versions like '80;90' (got {bad or 'none'})")
    return sorted(set(archs), key=lambda a: (int(re.match(r"\d+", a).group()), a))


def gencode_flags(archs: list[str]) -> list[str]:
    """A cubin per arch, and PTX of the highest so that newer GPUs can JIT it."""
    flags = []
    for arch in archs[:-1]:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    top = archs[-1]
    flags.append(f"-gencode=arch=compute_{top},code=[sm_{top},compute_{top}]")
    return flags


# ----------------------------------------------------------------------------------------------
# ptxas report


@dataclass
class KernelResources:
    name: str
    arch: str
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas_report(text: str) -> list[KernelResources]:
    """Per-function resources from `ptxas -v` output (entry functions and non-inlined callees)."""
    found: list[KernelResources] = []
    current: KernelResources | None = None
    arch = "?"
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line):
            arch = m.group(2)
            current = KernelResources(m.group(1), arch)
            found.append(current)
        elif m := re.search(r"Function properties for (\S+)", line):
            if current is None or current.name != m.group(1):
                current = KernelResources(m.group(1), arch)
                found.append(current)
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
    return found


def spill_problems(kernels: list[KernelResources]) -> list[KernelResources]:
    return [k for k in kernels if k.spill_stores or k.spill_loads or k.stack_bytes]


def _short_names(mangled: list[str]) -> list[str]:
    """Demangled, without namespaces and parameter lists: token_logprobs_forward_kernel<bf16_t, true, 256>."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True)
        names = out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    if len(names) != len(mangled):
        return mangled
    short = []
    for name in names:
        name = re.sub(r"rlhf_fast::|\(anonymous namespace\)::", "", name)
        name = re.sub(r"^void ", "", name)
        short.append(re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name))
    return short


def format_ptxas_table(kernels: list[KernelResources]) -> str:
    names = _short_names([k.name for k in kernels])
    width = max((len(n) for n in names), default=10)
    rows = [f"  {'kernel':<{width}}  arch    regs  stack  spill st/ld"]
    for name, k in zip(names, kernels):
        rows.append(f"  {name:<{width}}  {k.arch:<6}  {k.registers:4d}  {k.stack_bytes:5d}  "
                    f"{k.spill_stores:5d}/{k.spill_loads}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# The build: a list of shell commands (compile edges with depfiles, then the link)


@dataclass
class Edge:
    out: str
    inputs: list[str]
    command: str
    depfile: str | None = None
    log: str | None = None  # nvcc output (the ptxas report)


@dataclass
class Plan:
    edges: list[Edge] = field(default_factory=list)
    cuda: CudaToolkit | None = None
    reason_no_cuda: str = ""


def _quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _c_string(value: str) -> str:
    """A C string literal's contents, for -DNAME="..." defines."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _version() -> str:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def make_plan(build_dir: Path, output: Path) -> Plan:
    import pybind11

    cxx = os.environ.get("CXX", "c++")
    cuda, reason = find_cuda()
    plan = Plan(cuda=cuda, reason_no_cuda=reason)
    include = ["-I" + str(ROOT / CSRC / "include")]
    python_include = ["-I" + sysconfig.get_paths()["include"], "-I" + pybind11.get_include()]

    defines = [f'-DRLHF_FAST_VERSION="{_c_string(_version())}"']
    if cuda is not None:
        archs = cuda_archs()
        listed = [f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"]
        defines += ["-DRLHF_FAST_WITH_CUDA", f'-DRLHF_FAST_CUDA_VERSION="{cuda.version}"',
                    f'-DRLHF_FAST_CUDA_ARCHS="{";".join(listed)}"']
    else:
        defines.append(f'-DRLHF_FAST_NO_CUDA_REASON="{_c_string(reason)}"')

    objects = []
    for src in HOST_SOURCES:
        obj = str(build_dir / (src + ".o"))
        extra = python_include + defines if src.endswith("bindings.cpp") else HOST_KERNEL_FLAGS
        cmd = [cxx, "-MMD", "-MF", obj + ".d", *CXX_FLAGS, *include, *extra, "-c", str(ROOT / src), "-o", obj]
        plan.edges.append(Edge(obj, [str(ROOT / src)], _quote(cmd), depfile=obj + ".d"))
        objects.append(obj)

    ldflags = ["-pthread"]
    if cuda is not None:
        jobs = os.environ.get("MAX_JOBS", "0")
        ccbin = ["-ccbin", shutil.which(cxx) or cxx] if "CXX" in os.environ else []
        for src in CUDA_SOURCES:
            obj = str(build_dir / (src + ".o"))
            log = obj + ".log"
            cmd = [cuda.nvcc, "-MD", "-MF", obj + ".d", *ccbin, *NVCC_FLAGS, "--threads", jobs,
                   *gencode_flags(cuda_archs()), *include, "-c", str(ROOT / src), "-o", obj]
            # The report goes to a log that the build prints and checks; on failure it is shown.
            shell = f"{_quote(cmd)} > {shlex.quote(log)} 2>&1 || {{ cat {shlex.quote(log)}; exit 1; }}"
            plan.edges.append(Edge(obj, [str(ROOT / src)], shell, depfile=obj + ".d", log=log))
            objects.append(obj)
        # cudart linked statically with its symbols kept local: the module imports on machines
        # without a GPU or driver, and never binds to (or is bound by) PyTorch's own libcudart.
        ldflags += ["-L" + cuda.lib_dir, "-Wl,--exclude-libs,ALL", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    link = [cxx, "-shared", *objects, "-o", str(output), *ldflags]
    plan.edges.append(Edge(str(output), objects, _quote(link)))
    return plan


def _ninja_escape(s: str) -> str:
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja(plan: Plan, path: Path) -> None:
    lines = [
        "ninja_required_version = 1.3",
        "rule compile",
        "  command = $cmd",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = compile $in",
        "rule link",
        "  command = $cmd",
        "  description = link $out",
    ]
    for edge in plan.edges:
        rule = "compile" if edge.depfile else "link"
        ins = " ".join(_ninja_escape(i) for i in edge.inputs)
        lines.append(f"build {_ninja_escape(edge.out)}: {rule} {ins}")
        lines.append(f"  cmd = {edge.command.replace('$', '$$')}")
    path.write_text("\n".join(lines) + "\n")


def run_plan(plan: Plan, build_dir: Path) -> None:
    build_dir.mkdir(parents=True, exist_ok=True)
    for edge in plan.edges:
        Path(edge.out).parent.mkdir(parents=True, exist_ok=True)
    jobs = int(os.environ.get("MAX_JOBS", "0")) or (os.cpu_count() or 1)
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        except ImportError:
            ninja = None
    if ninja is not None:
        write_ninja(plan, build_dir / "build.ninja")
        subprocess.run([ninja, "-C", str(build_dir), "-j", str(jobs)], check=True)
        return
    print("rlhf_fast: ninja not found, compiling with subprocesses", flush=True)

    def run(edge: Edge) -> None:
        print(edge.command, flush=True)
        subprocess.run(edge.command, shell=True, check=True)

    compiles = [e for e in plan.edges if e.depfile]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, compiles))
    for edge in plan.edges:
        if not edge.depfile:
            run(edge)


def check_ptxas(plan: Plan) -> None:
    for edge in plan.edges:
        if edge.log is None:
            continue
        text = Path(edge.log).read_text()
        kernels = parse_ptxas_report(text)
        print(f"rlhf_fast: ptxas report for {Path(edge.inputs[0]).relative_to(ROOT)}\n"
              f"{format_ptxas_table(kernels)}", flush=True)
        other = [line for line in text.splitlines() if line.strip() and "ptxas info" not in line
                 and not re.match(r"\s+\d+ bytes stack frame", line)]
        if other:
            print("\n".join(other), flush=True)
        bad = spill_problems(kernels)
        if bad:
            raise RuntimeError("rlhf_fast: CUDA kernels spill registers or use a stack frame (a spilling kernel "
                               "loses its memory bandwidth; reduce live values or unrolling):\n"
                               + format_ptxas_table(bad))
        if not kernels:
            raise RuntimeError(f"rlhf_fast: no ptxas report in {edge.log}; expected `-Xptxas -v` output")


if __name__ == "__main__":
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    class BuildExt(build_ext):
        """Builds rlhf_fast._C from the plan above instead of setuptools' one-file-at-a-time compiler."""

        def build_extension(self, ext: Extension) -> None:
            output = Path(self.get_ext_fullpath(ext.name)).resolve()
            build_dir = Path(self.build_temp).resolve() / "rlhf_fast_C"
            plan = make_plan(build_dir, output)
            if plan.cuda is None:
                print(f"rlhf_fast: building without CUDA: {plan.reason_no_cuda}", flush=True)
            else:
                print(f"rlhf_fast: building with CUDA {plan.cuda.version} ({plan.cuda.nvcc}), "
                      f"archs {cuda_archs()}", flush=True)
            run_plan(plan, build_dir)
            check_ptxas(plan)

        def copy_file(self, infile, outfile, *args, **kwargs):
            # In-place builds copy the module into the source tree: replace the file rather than
            # overwrite it, so that a process that has the old module loaded keeps a valid mapping.
            if os.path.isdir(outfile):
                outfile = os.path.join(outfile, os.path.basename(infile))
            tmp = f"{outfile}.tmp{os.getpid()}"
            _, copied = super().copy_file(infile, tmp, *args, **kwargs)
            os.replace(tmp, outfile)
            return outfile, copied

    # rlhf_fast.kernels and rlhf_fast.bench are the top-level kernels/ and bench/ folders, reached
    # through the symlinks rlhf_fast/kernels -> ../kernels and rlhf_fast/bench -> ../bench. Neither
    # folder has an __init__.py: run from the repository root (python -c, python -m, pytest), the
    # root is on sys.path, and a regular package named `kernels` there would hide Hugging Face's
    # `kernels` (which transformers imports); a namespace portion never wins over a regular
    # package. A package_dir mapping cannot do this: setuptools' editable finder does not import a
    # namespace subpackage that it maps, while the symlink serves editable and wheel installs alike.
    setup(
        packages=["rlhf_fast", "rlhf_fast.backends", "rlhf_fast.ops", "rlhf_fast.train", "rlhf_fast.train.rl", "rlhf_fast.kernels", "rlhf_fast.bench"],
        ext_modules=[
            Extension(
                "rlhf_fast._C",
                sources=HOST_SOURCES + CUDA_SOURCES,
                depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "include").rglob("*.h")),
            )
        ],
        cmdclass={"build_ext": BuildExt},
    )
