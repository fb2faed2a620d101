"""The parameter space of the kernel backends (Triton, CUDA), in float32
PyTorch: each example's mixed adapter before the token kernels run, and the
bank and weight gradients from the per-example ones after.  Both are
parameter-sized and built once per example (`reference.mix_adapters`,
`reference.mix_adjoint`: deterministic, no scatter-add)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._inputs import Problem
from ..reference import mix_adapters, mix_adjoint


def adapters(p: Problem) -> tuple[Tensor, Tensor]:
    """A_i `[b, d_in, r]`, B_i `[b, r, d_out]`, float32, contiguous."""
    A_i, B_i = mix_adapters(
        p.sizes, p.weights, p.lora_A, p.lora_B, p.task_ids, p.excl_weights, p.excl_A, p.excl_B, torch.float32
    )
    return A_i.contiguous(), B_i.contiguous()


def param_grads(p: Problem, dA_i: Tensor, dB_i: Tensor, needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """Gradients of (weights, lora_A, lora_B, excl_weights, excl_A, excl_B) from
    dA_i, dB_i; `needs` has the backward's seven flags (x's first)."""
    return mix_adjoint(
        p.sizes, dA_i, dB_i, p.weights, p.lora_A, p.lora_B, p.task_ids, p.excl_weights, p.excl_A, p.excl_B,
        needs[1:],
    )
