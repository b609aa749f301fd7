"""Test setup: Triton is interpreted on CPU-only machines; `gpu` tests run only where CUDA is; each
test draws a fresh seed (printed on failure), and `--seed-sweep SECONDS` runs each test again with
more fresh seeds (tests/test_seed_sweep.py, in the slow tier) to find tolerances that fail by chance."""

import os
import time

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is decorated (import of rlhf_fast.kernels.*).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Fixtures that hold state across calls of one test: a test using them is not re-run by the sweep.
STATEFUL_FIXTURES = {"tmp_path", "tmp_path_factory", "capsys", "capfd", "monkeypatch", "recwarn", "caplog"}
SWEEP_MAX_SEEDS = 200


def pytest_addoption(parser):
    parser.addoption("--seed-sweep", type=float, default=0.0, metavar="SECONDS",
                     help="after each test passes, run it again with fresh seeds for about this long "
                          f"(at most {SWEEP_MAX_SEEDS} seeds); a failure names its RLHF_FAST_SEED")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, but a failure prints the seed that reproduces it."""
    seed = new_seed() if "RLHF_FAST_SEED" not in os.environ else int(os.environ["RLHF_FAST_SEED"])
    torch.manual_seed(seed)
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"seed: RLHF_FAST_SEED={seed}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    budget = pyfuncitem.config.getoption("seed_sweep")
    rng_before = torch.random.get_rng_state()
    result = yield
    # Only randomised tests (those that drew from torch's generator) are worth another seed.
    if budget <= 0 or STATEFUL_FIXTURES & set(pyfuncitem.fixturenames) or torch.equal(rng_before, torch.random.get_rng_state()):
        return result
    args = pyfuncitem._fixtureinfo.argnames
    start = time.perf_counter()
    for _ in range(SWEEP_MAX_SEEDS):
        if time.perf_counter() - start > budget:
            break
        seed = new_seed()
        torch.manual_seed(seed)
        try:
            pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in args})
        except pytest.skip.Exception:
            break
        except BaseException as error:
            raise AssertionError(f"seed sweep: failed with RLHF_FAST_SEED={seed}: {error}") from error
    return result
