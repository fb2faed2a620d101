"""Triton kernels of the token-space passes (see the package docstring for the design).

Conventions shared by every kernel:
- A program works on one *tile*: up to BM consecutive token rows of ONE
  segment (example); `tile_seg[t]` is its example (-1: a spare program past
  the real tile count, which exits at once) and `tile_row[t]` its first row.
  The tile ends at min(tile_row + BM, cu_seqlens[seg + 1]).
- Rank is padded to R_PAD (a power of two >= 16, so every tl.dot has M, N, K
  >= 16 on a GPU); masked lanes load 0 and are never stored.
- Mixed adapters are float32: A_i `[b, d_in, r]` and B_i `[b, r, d_out]`,
  contiguous.  Activations are loaded in their dtype and cast to float32;
  all products accumulate in float32; stores cast to the destination dtype.
- Any row index that meets a stride is int64 (rows up to 2^63).
- Only Triton builtins are used (tl.full, not the @jit-defined tl.zeros), so
  the kernels also run in the interpreter when triton itself was imported
  before TRITON_INTERPRET=1 was set.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(tile_seg_ptr, tile_row_ptr, cu_ptr, BM: tl.constexpr):
    """(segment, rows [BM] int64, row mask) of this program's tile; segment -1 for a spare program."""
    pid = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + pid)
    row0 = tl.load(tile_row_ptr + pid)
    row_end = tl.load(cu_ptr + tl.maximum(seg, 0) + 1).to(tl.int64)
    rows = row0 + tl.arange(0, BM).to(tl.int64)
    return seg, rows, rows < row_end


@triton.jit
def forward_kernel(
    x_ptr, a_ptr, b_ptr, base_ptr, out_ptr, h_ptr,
    tile_seg_ptr, tile_row_ptr, cu_ptr,
    d_in, d_out, r, scale,
    stride_xm, stride_xk, stride_basem, stride_basen,
    HAS_BASE: tl.constexpr, SAVE_H: tl.constexpr, WRITE_OUT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h = x_tile @ A_i (over d_in blocks), then out = base + scale * h @ B_i (over d_out blocks).

    x is read once and out written once; h `[N, r]` float32 is stored when SAVE_H.
    """
    seg, rows, row_mask = _tile(tile_seg_ptr, tile_row_ptr, cu_ptr, BM)
    if seg < 0:
        return
    seg64 = seg.to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < r
    a_base = a_ptr + seg64 * d_in * r
    b_base = b_ptr + seg64 * r * d_out

    h = tl.full((BM, R_PAD), 0.0, tl.float32)
    for k0 in range(0, d_in, BK):
        cols = k0 + tl.arange(0, BK)
        col_mask = cols < d_in
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xk,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(tl.float32)
        a = tl.load(
            a_base + cols[:, None] * r + ranks[None, :],
            mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
        )
        h += tl.dot(x, a, input_precision=PRECISION)

    if SAVE_H:
        tl.store(h_ptr + rows[:, None] * r + ranks[None, :], h, mask=row_mask[:, None] & rank_mask[None, :])

    if WRITE_OUT:
        for n0 in range(0, d_out, BN):
            cols = n0 + tl.arange(0, BN)
            col_mask = cols < d_out
            bmat = tl.load(
                b_base + ranks[:, None] * d_out + cols[None, :],
                mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
            )
            acc = tl.dot(h, bmat, input_precision=PRECISION) * scale
            out_mask = row_mask[:, None] & col_mask[None, :]
            if HAS_BASE:
                acc += tl.load(
                    base_ptr + rows[:, None] * stride_basem + cols[None, :].to(tl.int64) * stride_basen,
                    mask=out_mask, other=0.0,
                ).to(tl.float32)
            tl.store(
                out_ptr + rows[:, None] * d_out + cols[None, :],
                acc.to(out_ptr.dtype.element_ty), mask=out_mask,
            )


@triton.jit
def backward_kernel(
    x_ptr, dy_ptr, h_ptr, a_ptr, b_ptr, dx_ptr, part_ptr,
    tile_seg_ptr, tile_row_ptr, cu_ptr, tile_slot_ptr, n_seg,
    d_in, d_out, r, scale,
    stride_xm, stride_xk, stride_dym, stride_dyn,
    part_width, part_b_off,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_G: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One pass over a tile for every token-space gradient.

    NEED_G (= NEED_DX or NEED_DA) says whether g is wanted.  Loop over d_out
    blocks: read dy once; g += dy @ B_i^T and (NEED_DB) the
    tile's partial dB_i = scale * h^T dy.  Then loop over d_in blocks with g
    = scale * dy B_i^T in registers: dx = g @ A_i^T (NEED_DX) and (NEED_DA)
    the tile's partial dA_i = x^T g, x read once.  Partials are float32 rows
    of `part` (`[b + slots, part_width]`: dA_i as `[d_in, r]` at offset 0,
    dB_i as `[r, d_out]` at part_b_off).  The tile of a one-tile segment
    writes its example's row `seg` directly (its final value); a tile of a
    longer segment writes row `n_seg + tile_slot[pid]`, and
    `segment_sum_kernel` sums those per segment in tile order.
    """
    seg, rows, row_mask = _tile(tile_seg_ptr, tile_row_ptr, cu_ptr, BM)
    if seg < 0:
        return
    seg64 = seg.to(tl.int64)
    slot = tl.load(tile_slot_ptr + tl.program_id(0))
    dest = tl.where(slot < 0, seg64, n_seg + slot.to(tl.int64))
    part_row = part_ptr + dest * part_width
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < r
    a_base = a_ptr + seg64 * d_in * r
    b_base = b_ptr + seg64 * r * d_out

    if NEED_DB:
        h = tl.load(h_ptr + rows[:, None] * r + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    g = tl.full((BM, R_PAD), 0.0, tl.float32)
    for n0 in range(0, d_out, BN):
        cols = n0 + tl.arange(0, BN)
        col_mask = cols < d_out
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :].to(tl.int64) * stride_dyn,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(tl.float32)
        if NEED_G:
            b_t = tl.load(
                b_base + ranks[None, :] * d_out + cols[:, None],
                mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
            )
            g += tl.dot(dy, b_t, input_precision=PRECISION)
        if NEED_DB:
            db = tl.dot(tl.trans(h), dy, input_precision=PRECISION) * scale
            tl.store(
                part_row + part_b_off + ranks[:, None] * d_out + cols[None, :], db,
                mask=rank_mask[:, None] & col_mask[None, :],
            )

    if NEED_G:
        g = g * scale
        for k0 in range(0, d_in, BK):
            cols = k0 + tl.arange(0, BK)
            col_mask = cols < d_in
            a_t = tl.load(
                a_base + cols[None, :] * r + ranks[:, None],
                mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
            )
            if NEED_DX:
                dx = tl.dot(g, a_t, input_precision=PRECISION)
                tl.store(
                    dx_ptr + rows[:, None] * d_in + cols[None, :],
                    dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :],
                )
            if NEED_DA:
                x = tl.load(
                    x_ptr + rows[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xk,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                ).to(tl.float32)
                da = tl.dot(tl.trans(x), g, input_precision=PRECISION)
                tl.store(
                    part_row + cols[:, None] * r + ranks[None, :], da,
                    mask=col_mask[:, None] & rank_mask[None, :],
                )


@triton.jit
def segment_sum_kernel(part_ptr, seg_slot_start_ptr, seg_tiles_ptr, n_seg, width, BLOCK: tl.constexpr):
    """part[seg, :] = sum of the segment's tile partials (rows n_seg + slot), in tile order.

    Grid (segments, cdiv(width, BLOCK)).  A one-tile segment's row was written
    by its tile and is left alone; a segment without tokens gets zeros.
    Deterministic: a fixed order, no atomics.
    """
    seg = tl.program_id(0)
    n_tiles = tl.load(seg_tiles_ptr + seg)
    if n_tiles == 1:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    first = tl.load(seg_slot_start_ptr + seg).to(tl.int64) + n_seg
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    ptrs = part_ptr + first * width + offs
    for _ in range(0, n_tiles):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += width
    tl.store(part_ptr + seg.to(tl.int64) * width + offs, acc, mask=mask)


#: True when these kernels were defined for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = not isinstance(forward_kernel, triton.runtime.JITFunction)
