"""The public op: `cpoly_lora`, registered as the torch custom ops
`cpoly::cpoly_lora` (forward) and `cpoly::cpoly_lora_backward`, each with a
fake (meta) implementation and the forward with autograd, so that
`torch.compile(fullgraph=True)` traces it as one opaque node.

The forward op returns (out, h): h is what the chosen backend saves for its
backward (the float32 rank-space activations `[N, r]`), or an empty tensor.
The backward op returns the seven gradients in the order of
`_backends.reference.GRAD_INPUTS`; one that is not wanted is an empty tensor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._dispatch import get_backend, resolve_backend
from ._inputs import check_inputs, check_values, make_problem
from ._backends.reference import GRAD_INPUTS


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("cpoly::cpoly_lora", mutates_args=())
def cpoly_lora_op(
    x: Tensor,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    base: Optional[Tensor],
    scale: float,
    backend: str,
    save_h: bool,
) -> tuple[Tensor, Tensor]:
    p = make_problem(x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, base, scale)
    check_values(task_ids, p.sizes.T, cu_seqlens, p.sizes.N)
    impl = get_backend(backend)
    with torch.autocast(x.device.type, enabled=False):  # the public op already cast the inputs
        out, h = impl.forward(p, save_h and impl.saves_h)
    if h is None:
        h = _empty(x)
    return out.reshape(p.sizes.out_shape).contiguous(), h


@cpoly_lora_op.register_fake
def _(x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, base, scale, backend, save_h):
    sizes = check_inputs(
        x, weights, lora_A, lora_B, task_ids=task_ids, excl_weights=excl_weights,
        excl_A=excl_A, excl_B=excl_B, scale=scale, cu_seqlens=cu_seqlens, base=base,
    )
    out = x.new_empty(sizes.out_shape)
    if save_h and get_backend(backend).saves_h:
        return out, x.new_empty((sizes.N, sizes.r), dtype=torch.float32)
    return out, _empty(x)


@torch.library.custom_op("cpoly::cpoly_lora_backward", mutates_args=())
def cpoly_lora_backward_op(
    dy: Tensor,
    x: Tensor,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    h: Tensor,
    scale: float,
    backend: str,
    needs: Sequence[bool],
) -> list[Tensor]:
    p = make_problem(x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, None, scale)
    impl = get_backend(backend)
    with torch.autocast(x.device.type, enabled=False):
        grads = impl.backward(p, dy.reshape(p.sizes.N, p.sizes.d_out), h if h.numel() else None, needs)
    out = []
    for name, need, g in zip(GRAD_INPUTS, needs, grads):
        src = getattr(p, name)
        if need and src is not None:
            shape = x.shape if name == "x" else src.shape
            out.append(torch.zeros(shape, dtype=src.dtype, device=src.device) if g is None
                       else g.reshape(shape).contiguous())
        else:
            out.append(_empty(x))
    return out


@cpoly_lora_backward_op.register_fake
def _(dy, x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, h, scale, backend, needs):
    srcs = (x, weights, lora_A, lora_B, excl_weights, excl_A, excl_B)
    return [
        torch.empty_like(t, memory_format=torch.contiguous_format) if (need and t is not None) else _empty(x)
        for need, t in zip(needs, srcs)
    ]


def _setup_context(ctx, inputs, output):
    x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, base, scale, backend, _ = inputs
    ctx.save_for_backward(x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, output[1])
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, dout, _dh):
    x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, h = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[5], n[6], n[7]]
    grads = [None] * 7
    if any(needs):
        got = torch.ops.cpoly.cpoly_lora_backward(
            dout, x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens,
            h, ctx.scale, ctx.backend, needs,
        )
        grads = [g if need else None for g, need in zip(got, needs)]
    dx, dw, dA, dB, dwe, dAe, dBe = grads
    dbase = dout if n[9] else None
    return dx, dw, dA, dB, None, dwe, dAe, dBe, None, dbase, None, None, None


cpoly_lora_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "cpoly_lora: double backward (create_graph=True through its gradients) is not supported"
    )


cpoly_lora_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _autocast(tensors: dict, device_type: str) -> dict:
    """Under autocast, floating inputs take the autocast dtype (as PEFT's einsum/bmm would)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return {
        k: (t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t)
        for k, t in tensors.items()
    }


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
    """C-Poly LoRA: `scale * (x_i A_i) B_i` per example (plus `base` if given).

    x: `[b, L, d_in]`, or packed `[N, d_in]` with `cu_seqlens` `[b+1]`.
    weights `[b, q, S]`, lora_A `[q, S, d_in/q, r]`, lora_B `[q, S, r, d_out/q]`:
    the shared bank (or all None).  task_ids `[b]`, excl_weights `[b, q, E]`,
    excl_A `[T, q, E, d_in/q, r]`, excl_B `[T, q, E, r, d_out/q]`: the
    exclusive bank (or all None).  scale defaults to 1/r.  Returns x's shape
    with d_out last, in x's dtype; under autocast every floating input, base
    included, is first cast to the autocast dtype, which the result then has.
    backend: "auto", "reference", "triton" or "cuda" (the environment variable
    CPOLY_BACKEND applies when "auto").  Bad shapes, dtypes and devices raise
    a ValueError or TypeError naming the argument; out-of-range task_ids or a
    bad cu_seqlens raise a ValueError for CPU tensors and trip a device-side
    assert for GPU tensors (no host synchronisation; it surfaces as a CUDA
    error at the next synchronising call).  See OP_SPEC §2 for the math and
    §6 for the contract.
    """
    if isinstance(x, Tensor):
        cast = _autocast(
            dict(x=x, weights=weights, lora_A=lora_A, lora_B=lora_B, excl_weights=excl_weights,
                 excl_A=excl_A, excl_B=excl_B, base=base),
            x.device.type,
        )
        x, weights, lora_A, lora_B = cast["x"], cast["weights"], cast["lora_A"], cast["lora_B"]
        excl_weights, excl_A, excl_B, base = cast["excl_weights"], cast["excl_A"], cast["excl_B"], cast["base"]
    sizes = check_inputs(
        x, weights, lora_A, lora_B, task_ids=task_ids, excl_weights=excl_weights,
        excl_A=excl_A, excl_B=excl_B, scale=scale, cu_seqlens=cu_seqlens, base=base,
    )
    name = resolve_backend(backend, sizes, x.device, x.dtype)
    s = sizes.scale(scale)
    save_h = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weights, lora_A, lora_B, excl_weights, excl_A, excl_B)
    )
    out, _ = torch.ops.cpoly.cpoly_lora(
        x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, base,
        s, name, save_h,
    )
    return out
