"""The ground truth: `cpoly_lora` in plain PyTorch, written for clarity.

It follows OP_SPEC §2 literally: mix each example's adapter from the banks
(mixing happens on parameters), then `delta_i = scale * (x_i A_i) B_i`.  It
computes in float32 (float64 when x is float64) whatever the input dtype, and
returns x's dtype.  It is differentiable by ordinary autograd, which is what
makes it the reference for every gradient too.  Packed input is handled by a
plain loop over the segments.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._inputs import Sizes, check_inputs, check_values


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix_adapters(
    sizes: Sizes,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Each example's adapter: A_i `[b, d_in, r]` and B_i `[b, r, d_out]` in `dtype`.

    Per split k:  A_i[k] = sum_s W[i,k,s] A[k,s] + sum_e W_ex[i,k,e] A_ex[t_i,k,e]
    (likewise B); the q blocks of A_i are stacked along d_in, those of B_i
    side by side along d_out (PEFT's PolyLayer layout).
    """
    b, q, r = sizes.b, sizes.q, sizes.r
    dq, oq = sizes.d_in // q, sizes.d_out // q
    A_i = torch.zeros(b, q, dq, r, dtype=dtype, device=(lora_A if lora_A is not None else excl_A).device)
    B_i = torch.zeros(b, q, r, oq, dtype=dtype, device=A_i.device)
    if weights is not None:
        W = weights.to(dtype)
        A_i = A_i + torch.einsum("bqs,qsdr->bqdr", W, lora_A.to(dtype))
        B_i = B_i + torch.einsum("bqs,qsro->bqro", W, lora_B.to(dtype))
    if excl_weights is not None:
        W_ex = excl_weights.to(dtype)
        task = task_ids.long()
        A_i = A_i + torch.einsum("bqe,bqedr->bqdr", W_ex, excl_A[task].to(dtype))
        B_i = B_i + torch.einsum("bqe,bqero->bqro", W_ex, excl_B[task].to(dtype))
    A_i = A_i.reshape(b, sizes.d_in, r)
    B_i = B_i.transpose(1, 2).reshape(b, r, sizes.d_out)
    return A_i, B_i


def mix_adjoint(
    sizes: Sizes,
    dA_i: Tensor,
    dB_i: Tensor,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    needs: Sequence[bool],
) -> tuple[Optional[Tensor], ...]:
    """Back through `mix_adapters`: from dA_i `[b, d_in, r]`, dB_i `[b, r, d_out]`
    (float32 or float64) to the gradients of (weights, lora_A, lora_B,
    excl_weights, excl_A, excl_B), each in its input's dtype; None where
    `needs` (same order) is False or the input is None.

        dA[k,s]      = sum_i W[i,k,s] dA_i[k]
        dA_ex[t,k,e] = sum_{i: t_i = t} W_ex[i,k,e] dA_i[k]
        dW[i,k,s]    = <A[k,s], dA_i[k]> + <B[k,s], dB_i[k]>
        dW_ex[i,k,e] = <A_ex[t_i,k,e], dA_i[k]> + <B_ex[t_i,k,e], dB_i[k]>

    The sum over examples of one task is a matmul with a one-hot matrix, so it
    is deterministic on every device (no scatter-add).
    """
    b, q, r, T = sizes.b, sizes.q, sizes.r, sizes.T
    dt = dA_i.dtype
    dA4 = dA_i.reshape(b, q, sizes.d_in // q, r)
    dB4 = dB_i.reshape(b, r, q, sizes.d_out // q).transpose(1, 2)
    need_w, need_A, need_B, need_we, need_Ae, need_Be = needs
    dw = dA = dB = dwe = dAe = dBe = None
    if weights is not None:
        if need_w:
            dw = (
                torch.einsum("qsdr,bqdr->bqs", lora_A.to(dt), dA4)
                + torch.einsum("qsro,bqro->bqs", lora_B.to(dt), dB4)
            ).to(weights.dtype)
        W = weights.to(dt)
        if need_A:
            dA = torch.einsum("bqs,bqdr->qsdr", W, dA4).to(lora_A.dtype)
        if need_B:
            dB = torch.einsum("bqs,bqro->qsro", W, dB4).to(lora_B.dtype)
    if excl_weights is not None:
        task = task_ids.long()
        if need_we:
            dwe = (
                torch.einsum("bqedr,bqdr->bqe", excl_A[task].to(dt), dA4)
                + torch.einsum("bqero,bqro->bqe", excl_B[task].to(dt), dB4)
            ).to(excl_weights.dtype)
        W_ex = excl_weights.to(dt)
        onehot_t = torch.nn.functional.one_hot(task, T).to(dt).t()  # [T, b]
        if need_Ae:
            per_example = torch.einsum("bqe,bqdr->bqedr", W_ex, dA4).flatten(1)
            dAe = (onehot_t @ per_example).reshape(excl_A.shape).to(excl_A.dtype)
        if need_Be:
            per_example = torch.einsum("bqe,bqro->bqero", W_ex, dB4).flatten(1)
            dBe = (onehot_t @ per_example).reshape(excl_B.shape).to(excl_B.dtype)
    return dw, dA, dB, dwe, dAe, dBe


def grad_rows(
    sizes: Sizes,
    x: Tensor,
    cu_seqlens: Tensor,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    dy: Tensor,
    scale: float,
    needs: Sequence[bool],
) -> tuple[Optional[Tensor], ...]:
    """The backward of OP_SPEC §2 written out, for x and dy given as rows.

    Per example, with g_i = scale * dy_i B_i^T and h_i = x_i A_i:
    dx_i = g_i A_i^T, dA_i = x_i^T g_i, dB_i = scale * h_i^T dy_i; then
    `mix_adjoint`.  Returns the gradients of (x, weights, lora_A, lora_B,
    excl_weights, excl_A, excl_B), None where not needed.
    """
    ct = compute_dtype(x.dtype)
    A_i, B_i = mix_adapters(sizes, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, ct)
    xc, dyc = x.to(ct), dy.to(ct)
    if sizes.L is not None:  # padded: all examples at once
        xb = xc.reshape(sizes.b, sizes.L, sizes.d_in)
        dyb = dyc.reshape(sizes.b, sizes.L, sizes.d_out)
        g = scale * torch.bmm(dyb, B_i.transpose(1, 2))
        h = torch.bmm(xb, A_i)
        dx = torch.bmm(g, A_i.transpose(1, 2)).reshape(sizes.N, sizes.d_in)
        dA_i = torch.bmm(xb.transpose(1, 2), g)
        dB_i = scale * torch.bmm(h.transpose(1, 2), dyb)
    else:
        dx = torch.empty(sizes.N, sizes.d_in, dtype=ct, device=x.device)
        dA_i = torch.empty(sizes.b, sizes.d_in, sizes.r, dtype=ct, device=x.device)
        dB_i = torch.empty(sizes.b, sizes.r, sizes.d_out, dtype=ct, device=x.device)
        bounds = cu_seqlens.tolist()
        for i in range(sizes.b):
            rows = slice(bounds[i], bounds[i + 1])
            g = scale * dyc[rows] @ B_i[i].t()
            h = xc[rows] @ A_i[i]
            dx[rows] = g @ A_i[i].t()
            dA_i[i] = xc[rows].t() @ g
            dB_i[i] = scale * h.t() @ dyc[rows]
    param_grads = mix_adjoint(
        sizes, dA_i, dB_i, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, needs[1:]
    )
    return (dx.to(x.dtype) if needs[0] else None,) + param_grads


def delta_rows(
    sizes: Sizes,
    x: Tensor,
    cu_seqlens: Optional[Tensor],
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    base: Optional[Tensor],
    scale: float,
) -> Tensor:
    """`[N, d_out]` rows of base + delta for x given as rows `[N, d_in]`.

    Padded layout (`sizes.L` set): x holds b blocks of L rows and cu_seqlens is
    ignored; packed layout: example i owns rows cu_seqlens[i]..cu_seqlens[i+1].
    """
    ct = compute_dtype(x.dtype)
    A_i, B_i = mix_adapters(sizes, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, ct)
    xc = x.to(ct)
    if sizes.L is not None:
        xb = xc.reshape(sizes.b, sizes.L, sizes.d_in)
        delta = (torch.bmm(torch.bmm(xb, A_i), B_i) * scale).reshape(sizes.N, sizes.d_out)
    else:
        bounds = cu_seqlens.tolist()
        pieces = [(xc[bounds[i] : bounds[i + 1]] @ A_i[i]) @ B_i[i] * scale for i in range(sizes.b)]
        delta = torch.cat(pieces, dim=0) if pieces else xc.new_zeros(0, sizes.d_out)
    if base is not None:
        delta = base.to(ct) + delta
    return delta.to(x.dtype)


def cpoly_lora(
    x: Tensor,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    *,
    task_ids: Optional[Tensor] = None,
    excl_weights: Optional[Tensor] = None,
    excl_A: Optional[Tensor] = None,
    excl_B: Optional[Tensor] = None,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Reference C-Poly LoRA delta (or base + delta); see OP_SPEC §2 and §6.

    Same signature as `cpoly_kernels.cpoly_lora`; `backend` is accepted for
    that reason and ignored (this function is the reference).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    sizes = check_inputs(
        x, weights, lora_A, lora_B,
        task_ids=task_ids, excl_weights=excl_weights, excl_A=excl_A, excl_B=excl_B,
        scale=scale, cu_seqlens=cu_seqlens, base=base,
    )
    check_values(task_ids, sizes.T, cu_seqlens, sizes.N)
    rows = delta_rows(
        sizes,
        x.reshape(sizes.N, sizes.d_in),
        cu_seqlens,
        weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B,
        None if base is None else base.reshape(sizes.N, sizes.d_out),
        sizes.scale(scale),
    )
    return rows.reshape(sizes.out_shape)
