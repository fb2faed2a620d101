"""The Triton kernels compile for the GPUs we target (sm_90 and sm_80), with
the block sizes `config.choose_blocks` picks, using the Triton that is
installed: no GPU is needed to compile, so CI proves what the interpreter
cannot: the kernels pass Triton's GPU compiler (tl.dot shape and precision
rules, layouts, register allocation) and fit the shared memory.  Register
and spill counts are not asserted (they vary by Triton version); the sm_90
numbers with Triton 3.6 are in benchmarks/RESULTS.md.

The kernels are loaded from kernels.py as a private module, defined with
TRITON_INTERPRET unset, so the package's own kernels module (interpreted in
the CPU tests) is left alone.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from cpoly_kernels._backends.triton import config  # noqa: E402
from cpoly_kernels._backends.triton.config import SUM_BLOCK, choose_blocks, dot_precision  # noqa: E402
from cpoly_kernels._inputs import Sizes  # noqa: E402

TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SCALARS = {"scale": "fp32"}
TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]


@pytest.fixture(scope="module")
def kernels():
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location(
            "cpoly_compile_check_kernels", Path(config.__file__).with_name("kernels.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    assert not module.INTERPRETED
    return module


def _signature(fn, act: str, constexprs: dict) -> dict:
    """Argument types: activations (x, dy, base, out, dx) in `act`, adapters,
    h and partials fp32, tile maps int32/int64, sizes int32, strides int64."""
    pointer = {"x_ptr": act, "dy_ptr": act, "base_ptr": act, "out_ptr": act, "dx_ptr": act,
               "tile_seg_ptr": "i32", "tile_slot_ptr": "i32", "seg_slot_start_ptr": "i32", "seg_tiles_ptr": "i32",
               "tile_row_ptr": "i64", "cu_ptr": "i64"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer.get(name, "fp32")
        elif name.startswith("stride"):
            sig[name] = "i64"
        else:
            sig[name] = SCALARS.get(name, "i32")
    return sig


def _compile(fn, dtype, constexprs, num_warps, target):
    src = ASTSource(fn, _signature(fn, TRITON_TYPE[dtype], constexprs), constexprs)
    return triton.compile(src, target=target, options=dict(num_warps=num_warps))


SHAPES = [(torch.bfloat16, 2), (torch.bfloat16, 16), (torch.float16, 17), (torch.float16, 64), (torch.bfloat16, 64),
          (torch.bfloat16, 128), (torch.float32, 16), (torch.float32, 32), (torch.float32, 128)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype,r", SHAPES, ids=[f"{TRITON_TYPE[d]}-r{r}" for d, r in SHAPES])
def test_kernels_compile_for_gpu(kernels, dtype, r, target):
    sizes = Sizes(b=1, N=1, L=None, d_in=4096, d_out=4096, q=1, r=r, S=1, E=0, T=0)
    blk = choose_blocks(sizes, dtype)
    tiles = dict(BM=blk.BM, BK=blk.BK, BN=blk.BN, R_PAD=blk.R_PAD, PRECISION=dot_precision(dtype))
    fwd = _compile(kernels.forward_kernel, dtype, dict(HAS_BASE=True, SAVE_H=True, WRITE_OUT=True, **tiles),
                   blk.num_warps, target)
    bwd = _compile(kernels.backward_kernel, dtype,
                   dict(NEED_DX=True, NEED_DA=True, NEED_DB=True, NEED_G=True, **tiles), blk.num_warps, target)
    for compiled in (fwd, bwd):
        assert compiled.asm["cubin"], "no cubin"
        assert compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
def test_segment_sum_compiles_for_gpu(kernels, target):
    compiled = _compile(kernels.segment_sum_kernel, torch.float32, dict(BLOCK=SUM_BLOCK), 4, target)
    assert compiled.asm["cubin"]
