"""The CUDA backend: the kernels of csrc/ (extension `cpoly_kernels._C`) stream
the tokens; the parameter-sized mixing stays in torch (`mixing.adapters` and
`mixing.param_grads`, float32, deterministic).

    forward   h    = project_down(x, A_i)             h_i = x_i A_i      [N, r] float32, saved
              out  = project_up(h, B_i, base, scale)   base + scale h_i B_i
    backward  g    = project_down(dy, B_i^T, scale)   g_i = scale dy_i B_i^T
              dx   = project_up(g, A_i^T)              g_i A_i^T
              dA_i = segment_outer(x, g)               x_i^T g_i
              dB_i = segment_outer(dy, h, scale)^T     scale h_i^T dy_i

Segments are read from cu_seqlens on the device, so nothing synchronises with
the host and the calls can be captured in a CUDA graph.  Kernels run on x's
device, on its current stream; every output is freshly allocated and fully
written by the kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._dispatch import register_backend
from .._inputs import Problem, Sizes
from .mixing import adapters, param_grads

try:
    from .. import _C
except ImportError as exc:  # not built (no nvcc at install time) or not loadable
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

KERNEL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_DEVICE_STATUS: dict[int, str] = {}


@torch.compiler.assume_constant_result
def _device_status(index: int) -> str:
    """'' when CUDA device `index` can run the kernels, else why not (cached per process)."""
    if index not in _DEVICE_STATUS:
        with torch.cuda.device(index):
            _DEVICE_STATUS[index] = _C.device_status(index)
    return _DEVICE_STATUS[index]


def _pad_ranks(w: Tensor) -> Tensor:
    """`[b, d, r]` float32 -> contiguous `[b, d, padded_rank(r)]`, zeros past r."""
    b, d, r = w.shape
    out = w.new_zeros(b, d, _C.padded_rank(r))
    out[:, :, :r] = w
    return out


def _project_down(x: Tensor, w: Tensor, cu: Tensor, s: Sizes, alpha: float, stream: int) -> Tensor:
    """`[N, r]` float32: alpha * x[n] @ w[segment(n)] (w `[b, d, r]` float32)."""
    w = _pad_ranks(w)  # held until the launch is queued
    y = torch.empty(s.N, s.r, dtype=torch.float32, device=x.device)
    _C.project_down(
        KERNEL_DTYPES[x.dtype], x.data_ptr(), w.data_ptr(), cu.data_ptr(), y.data_ptr(),
        s.N, x.shape[1], s.r, s.b, alpha, x.device.index, stream,
    )
    return y


def _project_up(
    v: Tensor, w: Tensor, cu: Tensor, base: Optional[Tensor], dtype: torch.dtype, s: Sizes, alpha: float, stream: int
) -> Tensor:
    """`[N, d]` in `dtype`: base[n] + alpha * v[n] @ w[segment(n)] (v `[N, r]`, w `[b, r, d]` float32)."""
    w = w.contiguous()
    d = w.shape[2]
    y = torch.empty(s.N, d, dtype=dtype, device=v.device)
    _C.project_up(
        KERNEL_DTYPES[dtype], v.data_ptr(), w.data_ptr(), cu.data_ptr(), 0 if base is None else base.data_ptr(),
        y.data_ptr(), s.N, d, s.r, s.b, alpha, v.device.index, stream,
    )
    return y


def _segment_outer(x: Tensor, v: Tensor, cu: Tensor, s: Sizes, alpha: float, stream: int) -> Tensor:
    """`[b, d, r]` float32: alpha * sum over segment i of x[n]^T v[n]."""
    d = x.shape[1]
    g = torch.empty(s.b, d, s.r, dtype=torch.float32, device=x.device)
    _C.segment_outer(
        KERNEL_DTYPES[x.dtype], x.data_ptr(), v.data_ptr(), cu.data_ptr(), g.data_ptr(),
        s.N, d, s.r, s.b, alpha, x.device.index, stream,
    )
    return g


class CudaBackend:
    name = "cuda"
    saves_h = True

    def unavailable(self) -> Optional[str]:
        if _C is None:
            return f"extension cpoly_kernels._C not built or not importable ({_IMPORT_ERROR})"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    def unsupported(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if device.type != "cuda":
            return f"needs CUDA tensors, got device {device}"
        if dtype not in KERNEL_DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16 or float32)"
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not built with CUDA"
        index = torch.cuda.current_device() if device.index is None else device.index
        status = _device_status(index)
        if status:
            return f"cuda:{index} cannot run the kernels of cpoly_kernels._C: {status}"
        return None

    def forward(self, p: Problem, save_h: bool) -> tuple[Tensor, Optional[Tensor]]:
        s = p.sizes
        A_i, B_i = adapters(p)
        x = p.x.contiguous()
        cu = p.cu_seqlens  # contiguous int64 (Problem)
        base = None if p.base is None else p.base.contiguous()
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            h = _project_down(x, A_i, cu, s, 1.0, stream)
            out = _project_up(h, B_i, cu, base, x.dtype, s, p.scale, stream)
        return out, (h if save_h else None)

    def backward(
        self, p: Problem, dy: Tensor, h: Optional[Tensor], needs: Sequence[bool]
    ) -> tuple[Optional[Tensor], ...]:
        s = p.sizes
        need_x, need_w, need_A, need_B, need_we, need_Ae, need_Be = needs
        need_dAi = need_w or need_A or need_we or need_Ae
        need_dBi = need_w or need_B or need_we or need_Be
        A_i, B_i = adapters(p)
        x = p.x.contiguous()
        dy = dy.to(x.dtype).contiguous()
        cu = p.cu_seqlens  # contiguous int64 (Problem)
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            g = _project_down(dy, B_i.transpose(1, 2), cu, s, p.scale, stream) if need_x or need_dAi else None
            dx = _project_up(g, A_i.transpose(1, 2), cu, None, x.dtype, s, 1.0, stream) if need_x else None
            # param_grads reads dA_i only when need_dAi and dB_i only when need_dBi.
            dA_i = _segment_outer(x, g, cu, s, 1.0, stream) if need_dAi else torch.zeros_like(A_i)
            if need_dBi:
                if h is None:
                    h = _project_down(x, A_i, cu, s, 1.0, stream)
                dB_i = _segment_outer(dy, h.contiguous(), cu, s, p.scale, stream).transpose(1, 2)
            else:
                dB_i = torch.zeros_like(B_i)
        return (dx,) + param_grads(p, dA_i, dB_i, needs)


register_backend(CudaBackend())
