"""Compile-time configuration of the Triton kernels: block sizes and dot
precision per shape and dtype.  Kept apart from `kernels.py` so it can be
imported without defining the kernels (which fixes interpreter or GPU mode
for the process)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..._inputs import Sizes

SUM_BLOCK = 1024


@dataclass(frozen=True)
class Blocks:
    """Compile-time tile sizes: BM token rows, BK over d_in, BN over d_out, R_PAD >= rank."""

    BM: int
    BK: int
    BN: int
    R_PAD: int
    num_warps: int


def choose_blocks(sizes: Sizes, dtype: torch.dtype) -> Blocks:
    """One configuration per shape (no autotuning, which the interpreter cannot run).

    R_PAD >= 16 keeps every tl.dot at M, N, K >= 16.  Larger ranks get smaller
    d blocks so the per-program tiles (x/dy [BM, BK], adapter [BK, R_PAD], g
    and h [BM, R_PAD]) stay in registers; BM = 128 where it fits halves the
    tiles, so the partial gradients of long segments, against BM = 64.  The
    float32 ("ieee") and float16 ("tf32x3") dots hold more registers than
    bfloat16's tf32 ones, so they get smaller d blocks.  These choices keep
    the kernels free of register spills on sm_90 with Triton 3.6 (read off
    the compiled cubins; no GPU was available to time anything), except the
    float32 backward at R_PAD = 128.
    """
    r_pad = max(16, triton.next_power_of_2(sizes.r))
    if dtype == torch.bfloat16 or r_pad >= 128:
        bm = 128 if r_pad <= 32 else 64
        cap = 64 if r_pad <= 64 else 32
    else:
        bm, cap = (128, 16) if r_pad <= 32 else (64, 32)
    bk = min(cap, max(16, triton.next_power_of_2(sizes.d_in)))
    bn = min(cap, max(16, triton.next_power_of_2(sizes.d_out)))
    big = bm * max(bk, bn) >= 8192 or r_pad >= 64 or dtype != torch.bfloat16
    return Blocks(BM=bm, BK=bk, BN=bn, R_PAD=r_pad, num_warps=8 if big else 4)


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies its float32 operands.

    float32 inputs: exact fp32 products ("ieee"), as torch's default matmul.
    bfloat16 inputs: "tf32".  Their values are exact in tf32, and rounding the
    float32 intermediates (mixed adapters, h, g) to tf32's 10-bit mantissa is
    8x below bfloat16's own rounding of the result.
    float16 inputs: "tf32x3" (three tf32 products, about fp32 accuracy), since
    float16 keeps 10 bits itself and tf32 rounding would be of the same size.
    The op is memory-bound, so the extra products are cheap.
    """
    return {torch.float32: "ieee", torch.bfloat16: "tf32"}.get(dtype, "tf32x3")
