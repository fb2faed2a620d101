"""What users run today instead of the fused op (OP_SPEC §5's anchors).

- `eager_reference`: PEFT's Poly forward (einsum mixing + two bmm, in the input
  dtype), extended with the gathered exclusive bank `A_ex[task_ids]`.
  `torch.compile(eager_reference)` is the compile anchor.
- `dense_lora`: one plain LoRA `(x @ A) @ B * scale` on the same x, one adapter
  for everyone.
- `peft_layer`: PEFT's real Poly layer (`peft.tuners.poly.layer.Linear`) on an
  `nn.Linear`, with the case's shared bank (it has no exclusive bank); its time
  is taken minus the time of that base linear alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .cases import Case
from .inputs import Inputs


def eager_reference(
    x: Tensor,
    weights: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    task_ids: Optional[Tensor],
    excl_weights: Optional[Tensor],
    excl_A: Optional[Tensor],
    excl_B: Optional[Tensor],
    scale: float,
) -> Tensor:
    """PEFT's `poly.layer.Linear.forward` LoRA term plus the gathered exclusive bank, x `[b, L, d_in]`."""
    b, _, d_in = x.shape
    A = B = None
    if weights is not None:
        A = torch.einsum("bqs,qsdr->bqdr", weights, lora_A)
        B = torch.einsum("bqs,qsrd->bqrd", weights, lora_B)
    if excl_weights is not None:
        A_ex = torch.einsum("bqe,bqedr->bqdr", excl_weights, excl_A[task_ids])
        B_ex = torch.einsum("bqe,bqerd->bqrd", excl_weights, excl_B[task_ids])
        A = A_ex if A is None else A + A_ex
        B = B_ex if B is None else B + B_ex
    r = A.shape[-1]
    A = A.reshape(b, d_in, r)
    B = B.transpose(1, 2).reshape(b, r, -1)
    return x.bmm(A).bmm(B) * scale


def eager_args(inp: Inputs) -> tuple:
    excl = inp.excl_A is not None
    return (
        inp.x, inp.weights, inp.lora_A, inp.lora_B, inp.task_ids if excl else None,
        inp.excl_weights, inp.excl_A, inp.excl_B, inp.scale,
    )


def dense_lora(x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """One ordinary LoRA adapter for every token: `(x @ A) @ B * scale`."""
    return (x @ A) @ B * scale


def dense_params(case: Case, inp: Inputs) -> tuple[Tensor, Tensor]:
    """A `[d_in, r]`, B `[r, d_out]` with the case's rank, same dtype/device as x."""
    g = torch.Generator().manual_seed(1234)
    A = torch.randn(case.d_in, case.r, generator=g) * case.d_in ** -0.5
    B = torch.randn(case.r, case.d_out, generator=g) * case.r ** -0.5
    return A.to(inp.x), B.to(inp.x)


def peft_unavailable(case: Case) -> Optional[str]:
    """None when PEFT's Poly layer can run this case, else why not."""
    if case.S_total == 0:
        return "no shared bank (PEFT's Poly layer has only a shared bank)"
    if case.packed:
        return "packed input (cu_seqlens): PEFT's Poly layer takes padded [b, L, d] only"
    try:
        import peft.tuners.poly.layer  # noqa: F401
    except ImportError as e:
        return f"peft is not importable ({e})"
    return None


def peft_layer(case: Case, inp: Inputs) -> nn.Module:
    """`peft.tuners.poly.layer.Linear` around a bias-free `nn.Linear(d_in, d_out)` (frozen),
    its bank set to the case's shared bank, in x's dtype and device."""
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.layer import Linear as PolyLinear

    base = nn.Linear(case.d_in, case.d_out, bias=False)
    config = PolyConfig(r=case.r, n_tasks=case.T, n_skills=case.S_total, n_splits=case.q, poly_type="poly")
    layer = PolyLinear(base, "default", config)
    layer.to(device=inp.x.device, dtype=inp.x.dtype)
    with torch.no_grad():
        layer.poly_lora_A["default"].copy_(inp.lora_A)
        layer.poly_lora_B["default"].copy_(inp.lora_B)
    base.weight.requires_grad_(False)
    return layer


def peft_params(layer: nn.Module) -> list[Tensor]:
    """The layer's trainable tensors: the bank and the router's logits."""
    return [p for p in layer.parameters() if p.requires_grad]
