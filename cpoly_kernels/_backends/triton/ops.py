"""Host side of the Triton backend: tile map, block sizes, launches, and the
parameter-space steps in PyTorch.  Imported only when Triton is importable.

Nothing here reads device data on the host: sizes come from shapes, the tile
map is built with device ops (cumsum, searchsorted) and sized by a host-known
upper bound, so the op never synchronises and can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor

from ..._inputs import Problem, Sizes
from ..mixing import adapters, param_grads
from . import kernels
from .config import SUM_BLOCK, Blocks, choose_blocks, dot_precision


@dataclass(frozen=True)
class TileMap:
    """Segment-aligned token tiles, on the device.

    `tile_seg[t]`: example of tile t, -1 past the real tile count;
    `tile_row[t]`: its first row; `count` is the host-known upper bound
    cdiv(N, BM) + min(b, N) on the number of tiles (the grid size): each
    non-empty segment adds at most one partial tile.
    For the backward's partial gradients: `seg_tiles[i]`, the tiles of
    example i; `tile_slot[t]`, the slot of tile t among the tiles of segments
    with two or more tiles (in tile order), -1 for the tile of a one-tile
    segment (it writes its example's gradient directly); `seg_slot_start[i]`,
    the first slot of example i; `slots`, a host-known upper bound on the
    number of slots.
    """

    tile_seg: Tensor
    tile_row: Tensor
    count: int
    seg_tiles: Tensor
    tile_slot: Tensor
    seg_slot_start: Tensor
    slots: int


def slot_bound(sizes: Sizes, bm: int, count: int) -> int:
    """Upper bound on the tiles of multi-tile segments, known on the host.

    Padded: none when L <= BM, else every tile.  Packed: a multi-tile segment
    has L > BM tokens, so there are at most N // (BM + 1) of them, each with
    at most one partial tile beyond its N / BM full ones.
    """
    if sizes.L is not None:
        return 0 if sizes.L <= bm else count
    return min(count, triton.cdiv(sizes.N, bm) + sizes.N // (bm + 1))


def tile_map(cu_seqlens: Tensor, sizes: Sizes, bm: int) -> TileMap:
    cu = cu_seqlens
    lengths = cu[1:] - cu[:-1]
    tiles = (lengths + (bm - 1)) // bm
    seg_end = torch.cumsum(tiles, 0)
    seg_start = seg_end - tiles
    count = triton.cdiv(sizes.N, bm) + min(sizes.b, sizes.N)
    tile = torch.arange(count, device=cu.device, dtype=torch.int64)
    seg = torch.searchsorted(seg_end, tile, right=True)
    real = seg < sizes.b
    seg_c = seg.clamp(max=sizes.b - 1)
    row = cu[seg_c] + (tile - seg_start[seg_c]) * bm
    multi_tiles = torch.where(tiles > 1, tiles, 0)
    slot_start = torch.cumsum(multi_tiles, 0) - multi_tiles
    slot = torch.where(real & (tiles[seg_c] > 1), slot_start[seg_c] + tile - seg_start[seg_c], -1)
    return TileMap(
        tile_seg=torch.where(real, seg, -1).to(torch.int32),
        tile_row=row,
        count=count,
        seg_tiles=tiles.to(torch.int32),
        tile_slot=slot.to(torch.int32),
        seg_slot_start=slot_start.to(torch.int32),
        slots=slot_bound(sizes, bm, count),
    )


def _launch_forward(p: Problem, A_i: Tensor, B_i: Tensor, tm: TileMap, blk: Blocks,
                    out: Optional[Tensor], h: Optional[Tensor]) -> None:
    """out (when given) = base + scale * (x A_i) B_i and h (when given) = x A_i, per tile.

    A pointer whose constexpr switch is off is never dereferenced; A_i stands in for it.
    """
    s = p.sizes
    base = p.base
    kernels.forward_kernel[(tm.count,)](
        p.x, A_i, B_i,
        A_i if base is None else base, A_i if out is None else out, A_i if h is None else h,
        tm.tile_seg, tm.tile_row, p.cu_seqlens,
        s.d_in, s.d_out, s.r, p.scale,
        p.x.stride(0), p.x.stride(1),
        0 if base is None else base.stride(0), 0 if base is None else base.stride(1),
        HAS_BASE=base is not None, SAVE_H=h is not None, WRITE_OUT=out is not None,
        BM=blk.BM, BK=blk.BK, BN=blk.BN, R_PAD=blk.R_PAD,
        PRECISION=dot_precision(p.dtype), num_warps=blk.num_warps,
    )


def forward(p: Problem, save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
    s = p.sizes
    out = torch.empty(s.N, s.d_out, dtype=p.dtype, device=p.device)
    h = torch.empty(s.N, s.r, dtype=torch.float32, device=p.device) if save_h else None
    if s.N == 0:
        return out, h
    blk = choose_blocks(s, p.dtype)
    A_i, B_i = adapters(p)
    _launch_forward(p, A_i, B_i, tile_map(p.cu_seqlens, s, blk.BM), blk, out, h)
    return out, h


def backward(p: Problem, dy: Tensor, h: Optional[Tensor], needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    s = p.sizes
    need_x, need_w, need_A, need_B, need_we, need_Ae, need_Be = needs
    shared, excl = p.weights is not None, p.excl_weights is not None
    need_dA = (shared and (need_w or need_A)) or (excl and (need_we or need_Ae))
    need_dB = (shared and (need_w or need_B)) or (excl and (need_we or need_Be))
    dx = torch.empty(s.N, s.d_in, dtype=p.dtype, device=p.device) if need_x else None
    a_width = s.d_in * s.r if need_dA else 0
    b_width = s.r * s.d_out if need_dB else 0
    width = a_width + b_width
    launch = s.N > 0 and (need_x or width > 0)

    if launch:
        blk = choose_blocks(s, p.dtype)
        tm = tile_map(p.cu_seqlens, s, blk.BM)
        A_i, B_i = adapters(p)
        if need_dB and h is None:
            h = torch.empty(s.N, s.r, dtype=torch.float32, device=p.device)
            _launch_forward(p, A_i, B_i, tm, blk, None, h)
        # Rows [0, b): each example's dA_i | dB_i (written by its tile or summed
        # by segment_sum_kernel); rows b + slot: partials of multi-tile segments.
        part = torch.empty(s.b + tm.slots, width, dtype=torch.float32, device=p.device) if width > 0 else None
        # A pointer whose constexpr switch is off is never dereferenced; A_i stands in for it.
        kernels.backward_kernel[(tm.count,)](
            p.x, dy, A_i if h is None else h, A_i, B_i,
            A_i if dx is None else dx, A_i if part is None else part,
            tm.tile_seg, tm.tile_row, p.cu_seqlens, tm.tile_slot, s.b,
            s.d_in, s.d_out, s.r, p.scale,
            p.x.stride(0), p.x.stride(1), dy.stride(0), dy.stride(1),
            width, a_width,
            NEED_DX=need_x, NEED_DA=need_dA, NEED_DB=need_dB, NEED_G=need_x or need_dA,
            BM=blk.BM, BK=blk.BK, BN=blk.BN, R_PAD=blk.R_PAD,
            PRECISION=dot_precision(p.dtype), num_warps=blk.num_warps,
        )
        if width > 0:
            kernels.segment_sum_kernel[(s.b, triton.cdiv(width, SUM_BLOCK))](
                part, tm.seg_slot_start, tm.seg_tiles, s.b, width, BLOCK=SUM_BLOCK,
            )
            per_example = part[: s.b]
    if not launch or width == 0:
        # Without tokens the gradients are 0.
        per_example = torch.zeros(s.b, width, dtype=torch.float32, device=p.device)

    unused = torch.zeros((), dtype=torch.float32, device=p.device)
    dA_i = per_example[:, :a_width].view(s.b, s.d_in, s.r) if need_dA else unused.expand(s.b, s.d_in, s.r)
    dB_i = per_example[:, a_width:].view(s.b, s.r, s.d_out) if need_dB else unused.expand(s.b, s.r, s.d_out)
    return (dx,) + param_grads(p, dA_i, dB_i, needs)
