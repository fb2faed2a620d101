"""The reference as a backend: the reference forward, and the reference
backward written out (`reference.grad_rows`), recomputing the mixed adapters."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._dispatch import register_backend
from .._inputs import Problem, Sizes
from ..reference import delta_rows, grad_rows

GRAD_INPUTS = ("x", "weights", "lora_A", "lora_B", "excl_weights", "excl_A", "excl_B")


class ReferenceBackend:
    name = "reference"
    saves_h = False

    def unavailable(self) -> Optional[str]:
        return None

    def unsupported(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def forward(self, p: Problem, save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        out = delta_rows(
            p.sizes, p.x, p.cu_seqlens, p.weights, p.lora_A, p.lora_B, p.task_ids,
            p.excl_weights, p.excl_A, p.excl_B, p.base, p.scale,
        )
        return out, None

    def backward(
        self, p: Problem, dy: Tensor, h: Optional[Tensor], needs: Sequence[bool]
    ) -> tuple[Optional[Tensor], ...]:
        return grad_rows(
            p.sizes, p.x, p.cu_seqlens, p.weights, p.lora_A, p.lora_B, p.task_ids,
            p.excl_weights, p.excl_A, p.excl_B, dy, p.scale, needs,
        )


register_backend(ReferenceBackend())
