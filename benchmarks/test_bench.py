"""pytest-benchmark suite over a subset of the cases: `pytest benchmarks/ --benchmark-only`.

Needs a CUDA GPU (skipped otherwise) and is no part of the CI test command
(`pytest tests/`).  Each test times one (case, impl, mode) step followed by a
device synchronisation; the floor of the case is stored in `extra_info`.
The CLI (`python -m benchmarks.run`) is the fuller tool: do_bench with L2
flushes, CUDA graphs, floors and speedups in one table.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (the test extra)")

import cpoly_kernels as ck

from benchmarks import impls as impls_mod
from benchmarks.cases import CASES
from benchmarks.floor import FloorShape, floor_bytes, floor_ms
from benchmarks.inputs import copies, make_inputs, rotation_count
from benchmarks.timing import copy_bandwidth

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the benchmark suite needs a CUDA GPU; on a CPU use `python -m benchmarks.run` (tiny smoke run)",
)

SUBSET = ("d4096", "t5l-paper-gathered", "d4096-packed64", "decode-serving")
IMPLS = ("cuda", "triton", "eager", "dense")
PARAMS = [
    (name, impl, mode)
    for name in SUBSET
    for impl in IMPLS
    for mode in next(c for c in CASES if c.name == name).modes
]


@pytest.fixture(scope="session")
def copy_bps():
    return copy_bandwidth(torch.device("cuda"), warmup_ms=10, rep_ms=40)


@pytest.fixture(scope="module")
def case_sets():
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            case = next(c for c in CASES if c.name == name)
            inp = make_inputs(case, torch.device("cuda"), torch.bfloat16)
            cache[name] = (case, copies(inp, rotation_count(inp, inp.x.device), requires_grad=True))
        return cache[name]

    return get


@pytest.mark.parametrize("name,impl_name,mode", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_bench(benchmark, case_sets, copy_bps, name, impl_name, mode):
    info = ck.backends()
    if impl_name in info and not info[impl_name]["available"]:
        pytest.skip(f"backend {impl_name} unavailable: {info[impl_name]['reason']}")
    case, sets = case_sets(name)
    impl = impls_mod.build(case, sets, [impl_name], info)[0]
    if impl.skip is not None:
        pytest.skip(impl.skip)
    step = impls_mod.make_step(impl, mode, sets)

    def run():
        step()
        torch.cuda.synchronize()

    shape = FloorShape(N=case.N, d_in=case.d_in, d_out=case.d_out, r=case.r, S=case.S_total, E=case.E,
                       T=case.T if case.E else 0, P=case.P, elem_bytes=2)
    benchmark.extra_info["floor_ms"] = floor_ms(floor_bytes(shape, mode), copy_bps)
    benchmark.extra_info["copy_GBps"] = copy_bps / 1e9
    benchmark.pedantic(run, warmup_rounds=5, rounds=30, iterations=1)
