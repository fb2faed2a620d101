"""Random C-Poly problems for the tests: every variant, layout and dtype.

`make_case(...)` returns the keyword arguments of `cpoly_lora` (x, weights,
lora_A, lora_B and the keyword-only ones) filled with random, non-zero
values.  `GRAD_NAMES` lists the differentiable arguments; `baseline_in_dtype` is the
same-precision baseline the kernel tests measure their error against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from cpoly_kernels._inputs import check_inputs
from cpoly_kernels.reference import mix_adapters

GRAD_NAMES = ("x", "weights", "lora_A", "lora_B", "excl_weights", "excl_A", "excl_B", "base")


def _rand(shape, dtype, device, gen, noncontig: bool) -> torch.Tensor:
    """Standard normal values; with `noncontig`, a view with permuted/strided storage."""
    if not noncontig or len(shape) == 0:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    # Store with the last two dims swapped and every other element of dim 0 skipped.
    shape = list(shape)
    store = shape[:-2] + [shape[-1], shape[-2]] if len(shape) >= 2 else shape[:]
    store[0] = 2 * store[0]
    t = torch.randn(store, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)[::2]
    return t.transpose(-1, -2) if len(shape) >= 2 else t


def make_case(
    *,
    b: int = 3,
    L: int = 5,
    lengths: Optional[Sequence[int]] = None,
    d_in: int = 8,
    d_out: int = 12,
    q: int = 1,
    r: int = 3,
    S: int = 4,
    E: int = 0,
    T: int = 5,
    base: bool = False,
    scale: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    noncontig: bool = False,
    requires_grad: bool = False,
) -> dict:
    """One random problem.  `lengths` gives the packed layout (cu_seqlens),
    else x is padded `[b, L, d_in]`.  S = 0: no shared bank; E = 0: no
    exclusive bank.  Mixing weights are positive (like a Poly router's)."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is not None:
        b = len(lengths)
        N = int(sum(lengths))
        cu = torch.zeros(b + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0)
        x = _rand((N, d_in), dtype, device, gen, noncontig)
        out_shape = (N, d_out)
        cu_seqlens = cu.to(device)
    else:
        x = _rand((b, L, d_in), dtype, device, gen, noncontig)
        out_shape = (b, L, d_out)
        cu_seqlens = None
    case = dict(x=x, weights=None, lora_A=None, lora_B=None, cu_seqlens=cu_seqlens, scale=scale)
    if S:
        w = torch.rand((b, q, S), generator=gen, dtype=torch.float64) + 0.1
        case["weights"] = (w / w.sum(-1, keepdim=True)).to(dtype=dtype, device=device)
        case["lora_A"] = _rand((q, S, d_in // q, r), dtype, device, gen, noncontig)
        case["lora_B"] = _rand((q, S, r, d_out // q), dtype, device, gen, noncontig)
    if E:
        case["task_ids"] = torch.randint(0, T, (b,), generator=gen).to(device)
        case["excl_weights"] = (torch.rand((b, q, E), generator=gen, dtype=torch.float64) + 0.5).to(
            dtype=dtype, device=device
        )
        case["excl_A"] = _rand((T, q, E, d_in // q, r), dtype, device, gen, noncontig)
        case["excl_B"] = _rand((T, q, E, r, d_out // q), dtype, device, gen, noncontig)
    if base:
        case["base"] = _rand(out_shape, dtype, device, gen, noncontig)
    if requires_grad:
        for name in GRAD_NAMES:
            if case.get(name) is not None:
                case[name].requires_grad_(True)
    return case


def split_args(case: dict) -> tuple:
    """(positional args, keyword args) for `cpoly_lora(*args, **kwargs)`."""
    args = (case["x"], case["weights"], case["lora_A"], case["lora_B"])
    kwargs = {k: v for k, v in case.items() if k not in ("x", "weights", "lora_A", "lora_B")}
    return args, kwargs


def run(fn, case: dict, dy: Optional[torch.Tensor] = None, **extra):
    """Call `fn` on the case; with `dy`, also backpropagate it.  Returns
    (output, {name: grad}) with grads for every input that requires grad."""
    args, kwargs = split_args(case)
    for name in GRAD_NAMES:
        t = case.get(name)
        if t is not None and t.requires_grad:
            t.grad = None
    out = fn(*args, **kwargs, **extra)
    grads = {}
    if dy is not None:
        leaves = [n for n in GRAD_NAMES if case.get(n) is not None and case[n].requires_grad]
        got = torch.autograd.grad(out, [case[n] for n in leaves], dy, allow_unused=True)
        grads = dict(zip(leaves, got))
    return out, grads


def baseline_in_dtype(x, weights, lora_A, lora_B, *, task_ids=None, excl_weights=None, excl_A=None,
                   excl_B=None, scale=None, cu_seqlens=None, base=None):
    """The op in plain PyTorch in x's dtype (no fp32 upcast): the same-precision baseline."""
    sizes = check_inputs(x, weights, lora_A, lora_B, task_ids=task_ids, excl_weights=excl_weights,
                         excl_A=excl_A, excl_B=excl_B, scale=scale, cu_seqlens=cu_seqlens, base=base)
    A_i, B_i = mix_adapters(sizes, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, x.dtype)
    rows = x.reshape(sizes.N, sizes.d_in)
    if cu_seqlens is None:
        bounds = [i * sizes.L for i in range(sizes.b + 1)]
    else:
        bounds = cu_seqlens.tolist()
    s = 1.0 / sizes.r if scale is None else scale
    pieces = [(rows[bounds[i]:bounds[i + 1]] @ A_i[i]) @ B_i[i] * s for i in range(sizes.b)]
    out = torch.cat(pieces) if pieces else rows.new_zeros(0, sizes.d_out)
    if base is not None:
        out = base.reshape(sizes.N, sizes.d_out) + out
    return out.reshape(sizes.out_shape)
