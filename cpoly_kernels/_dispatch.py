"""Backends and how a call picks one.

A backend is an object with a name and four methods (see `Backend`); the
Triton and CUDA backends register themselves with `register_backend` when
the package is imported, and the public op does not change when one is
added (a new name joins `AUTO_ORDER`).

Picking: a `backend=` other than "auto" wins; else the environment variable
`CPOLY_BACKEND` (read at each eager call; a torch.compile'd graph keeps the
choice it was traced with); else "auto", which for tensors on a GPU
takes the first backend of `AUTO_ORDER` that is available and supports the
call (dtype, sizes), and the reference otherwise (CPU tensors included, even
when the Triton interpreter is enabled).
"""
from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

from ._inputs import Problem, Sizes

AUTO_ORDER = ("cuda", "triton", "reference")
ENV_VAR = "CPOLY_BACKEND"


class Backend(Protocol):
    name: str
    #: True when `forward` returns the rank-space activations h = x_i A_i
    #: (`[N, r]`, float32) for its own backward; False when it returns None.
    saves_h: bool

    def unavailable(self) -> Optional[str]:
        """None when the backend can run in this process, else why not."""

    def unsupported(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when the backend can run such a call, else why not (shapes only)."""

    def forward(self, p: Problem, save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        """`[N, d_out]` rows of base + delta in x's dtype, and h when `save_h` and `saves_h`."""

    def backward(
        self, p: Problem, dy: Tensor, h: Optional[Tensor], needs: Sequence[bool]
    ) -> tuple[Optional[Tensor], ...]:
        """Gradients of (x, weights, lora_A, lora_B, excl_weights, excl_A, excl_B).

        `dy` is `[N, d_out]` (any strides, stride 0 included); `needs[j]` says
        whether gradient j is wanted (None may be returned where it is not).
        Each gradient has its input's shape and dtype.
        """


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run a call; `reason` says why."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    return _REGISTRY[name]


def backends() -> dict[str, dict]:
    """Every backend: `{"available": bool, "reason": None or why it is unavailable}`."""
    out = {}
    for name in AUTO_ORDER:
        b = _REGISTRY.get(name)
        reason = "not registered" if b is None else b.unavailable()
        out[name] = {"available": reason is None, "reason": reason}
    return out


def resolve_backend(requested: str, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name a call runs on; raises if a forced backend cannot run it."""
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str, got {type(requested).__name__}")
    name, source = requested, "backend"
    if name == "auto":
        env = os.environ.get(ENV_VAR, "")
        if env:
            name, source = env, ENV_VAR
    choices = ("auto",) + AUTO_ORDER
    if name not in choices:
        raise ValueError(f"{source}: expected one of {', '.join(repr(c) for c in choices)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":  # the kernels only for GPU tensors; never the interpreter
            for cand in AUTO_ORDER:
                b = _REGISTRY.get(cand)
                if b is not None and b.unavailable() is None and b.unsupported(sizes, device, dtype) is None:
                    return cand
        return "reference"
    b = _REGISTRY.get(name)
    reason = "not registered" if b is None else b.unavailable()
    if reason is not None:
        raise BackendUnavailable(f"{source}: backend {name!r} is unavailable: {reason}", reason)
    reason = b.unsupported(sizes, device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"{source}: backend {name!r} cannot run this call: {reason}", reason)
    return name
