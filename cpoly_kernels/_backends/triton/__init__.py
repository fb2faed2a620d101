"""The Triton backend (`backend="triton"`): fused token-space kernels.

Design
------
Parameter space (small, once per example, PyTorch, float32):
  A_i `[b, d_in, r]` and B_i `[b, r, d_out]` are mixed from the banks by
  `mixing.adapters`; the bank and weight gradients come from the
  per-example dA_i, dB_i through `mixing.param_grads` (a one-hot matmul:
  deterministic, no scatter-add).  These tensors are parameter-sized
  (b (d_in + d_out) r floats), never token-sized.

Token space (the hot path, Triton, `kernels.py`): the tokens are cut into
  *tiles* of at most BM rows that never straddle a segment.  The tile map is
  built on the device from cu_seqlens (cumsum + searchsorted) with the
  host-known bound cdiv(N, BM) + min(b, N) on the tile count; spare programs
  exit at once.  So every program uses one example's adapter, skewed,
  empty and one-token segments all cost what their tokens cost, and a
  segment with almost every token is spread over all the programs.
  - forward_kernel, one program per tile: h = x A_i accumulated in fp32
    over d_in blocks (stored `[N, r]` fp32 for the backward), then
    out = base + scale h B_i over d_out blocks.  Reads x (and base) once,
    writes out once; extra traffic: h (4 r bytes per token) and the
    adapters (each tile reads its example's A_i, B_i).
  - backward_kernel, one program per tile, one pass: over d_out blocks it
    reads dy once, accumulates g = dy B_i^T in registers and writes the
    tile's partial dB_i = scale h^T dy; then, with g scaled, over d_in
    blocks it reads x once, writes dx = g A_i^T once and the tile's partial
    dA_i = x^T g.
  - segment_sum_kernel: dA_i, dB_i = the sum of the segment's tile
    partials in tile order.  Deterministic (no atomics, fixed order); there
    is no non-deterministic mode since nothing could be measured to justify
    one.
  Bytes per token beyond the floor N (d_in + d_out) / N (d_out + 2 d_in):
  forward 4 r (h); backward 4 r (h) + 8 r (d_in + d_out) / BM (the fp32 tile
  partials, written then summed), e.g. r = 16, BM = 128, d = 4096 in bf16:
  about 1.3x the backward floor; r = 2 about 1.05x; r = 64 (BM = 64) about
  3.7x.  Reading dy twice instead (a separate dB pass) costs a similar
  r d / block share for g and h re-reads plus 1/3 of the floor, so the one
  pass wins except at the largest ranks.  The per-example adapters: tiles
  of one long segment share A_i, B_i (L2 hits); short examples read their
  own fp32 adapter per tile (many-short: 64 tokens, r = 16, d = 4096 adds
  about half the forward's bytes), still far less than mixing inside the
  kernels, which would re-read S bank tiles per token tile.  The tile of a
  one-tile segment writes its example's dA_i, dB_i directly; only segments
  of two or more tiles leave partials to sum, so the backward holds
  4 r (d_in + d_out) (b + slots) bytes, slots <= cdiv(N, BM) + N // (BM + 1)
  (none for padded input with L <= BM): 84 MB at 16 x 1024 tokens, r = 16,
  d = 4096 -> 4096; 268 MB for 256 x 64 packed (134 MB padded).  The parameter
  space (mix_adapters, the excl_A[task_ids] gather, mix_adjoint) is
  parameter-sized PyTorch work: a few small launches per call.

Numerics: activations are loaded in their dtype and converted to fp32; all
products accumulate in fp32; float32 inputs use exact fp32 dots ("ieee"),
bf16 inputs use tf32 dots (their values are exact in tf32), fp16 inputs
tf32x3 dots (`config.dot_precision`).  Every
row-index x stride product is int64.  Strides are passed explicitly (views,
transposes, stride-0 gradients).  Rank is padded to R_PAD = max(16,
next_pow2(r)) with masks (ranks 1..128); d_in, d_out are any size (masked
blocks).  No host synchronisation: the op is capturable in a CUDA graph.

Where it runs: CUDA tensors; CPU tensors only under the Triton interpreter
(TRITON_INTERPRET=1 at the call, and at the first call, which defines the
kernels).  Importing this
package never fails: without Triton, `unavailable()` says why.  Block sizes
(`config.choose_blocks`) are one untuned configuration per shape.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..._dispatch import register_backend
from ..._inputs import Problem, Sizes

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128


def _interpreter_problem() -> Optional[str]:
    """None when the kernels can run on CPU tensors in this process, else why not.

    Triton picks the interpreter when a kernel is defined, so `kernels.py`
    (imported at the first call) must be imported with TRITON_INTERPRET=1;
    the kernels use only Triton builtins, so triton itself may have been
    imported before in either mode.
    """
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on", "yes"):
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    kernels = sys.modules.get(f"{__name__}.kernels")
    if kernels is not None and not kernels.INTERPRETED:
        return "the kernels were compiled for a GPU (TRITON_INTERPRET was unset at their first use)"
    return None


class TritonBackend:
    name = "triton"
    saves_h = True

    def unavailable(self) -> Optional[str]:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # any import failure means the backend cannot run
            return f"triton is not importable: {type(exc).__name__}: {exc}"
        return None

    def unsupported(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        if sizes.r > MAX_RANK:
            return f"rank {sizes.r} is above the supported maximum {MAX_RANK}"
        if device.type == "cpu":
            return _interpreter_problem()
        if device.type != "cuda":
            return f"device type {device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
        kernels = sys.modules.get(f"{__name__}.kernels")
        if (kernels.INTERPRETED if kernels is not None else _interpreter_problem() is None):
            return "TRITON_INTERPRET=1: the kernels would run in the CPU interpreter, not on the GPU"
        return None

    def forward(self, p: Problem, save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        from . import ops

        with _on_device(p.device):
            return ops.forward(p, save_h)

    def backward(
        self, p: Problem, dy: Tensor, h: Optional[Tensor], needs: Sequence[bool]
    ) -> tuple[Optional[Tensor], ...]:
        from . import ops

        with _on_device(p.device):
            return ops.backward(p, dy, h, needs)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device and its current stream: make it x's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


register_backend(TritonBackend())
