"""Input checking and the normalised problem every backend receives.

`check_inputs` validates the arguments of `cpoly_lora` against OP_SPEC §6 using
shapes, dtypes and devices only (no data is read, so it traces under
`torch.compile` and never synchronises with a GPU).  `check_values` reads the
integer inputs (task ids, segment offsets); it runs inside the custom op where
tensors are real: a host check with a ValueError on the CPU, a device-side
assert on a GPU (no host synchronisation).

`Problem` is what a backend's forward and backward receive: x as rows
`[N, d_in]`, segment offsets `[b+1]` (built for the padded layout), the banks
and weights as given, and the sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _require_tensor(name: str, t, *, floating: bool) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if not floating and t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {t.dtype}")


def _require_shape(name: str, t: Tensor, expected: tuple, what: str) -> None:
    if _shape(t) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {_shape(t)}")


def _require_ndim(name: str, t: Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {what}, got shape {_shape(t)}")


@dataclass(frozen=True)
class Sizes:
    """Sizes of one call, derived from shapes only."""

    b: int  # examples
    N: int  # token rows
    L: Optional[int]  # tokens per example in the padded layout, None when packed
    d_in: int
    d_out: int
    q: int
    r: int
    S: int  # shared skills (0: no shared bank)
    E: int  # exclusive skills per task (0: no exclusive bank)
    T: int  # tasks of the exclusive bank (0: no exclusive bank)

    def scale(self, scale: Optional[Real]) -> float:
        """The scale of a call: `scale` as given, 1/r by default."""
        return 1.0 / self.r if scale is None else float(scale)

    @property
    def out_shape(self) -> tuple:
        if self.L is None:
            return (self.N, self.d_out)
        return (self.b, self.L, self.d_out)


def check_inputs(
    x,
    weights,
    lora_A,
    lora_B,
    *,
    task_ids=None,
    excl_weights=None,
    excl_A=None,
    excl_B=None,
    scale=None,
    cu_seqlens=None,
    base=None,
) -> Sizes:
    """Validate shapes, dtypes and devices; return the sizes. Reads no data."""
    _require_tensor("x", x, floating=True)
    if cu_seqlens is None:
        if x.dim() != 3:
            raise ValueError(
                "x: expected shape [b, L, d_in] (or [N, d_in] together with cu_seqlens), "
                f"got shape {_shape(x)}"
            )
        b, L, d_in = x.shape
        N = b * L
    else:
        _require_tensor("cu_seqlens", cu_seqlens, floating=False)
        if x.dim() != 2:
            raise ValueError(
                f"x: expected shape [N, d_in] when cu_seqlens is given, got shape {_shape(x)}"
            )
        _require_ndim("cu_seqlens", cu_seqlens, 1, "[b+1] of segment offsets")
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens: expected shape [b+1] with b >= 0, got shape (0,)")
        N, d_in = x.shape
        b, L = cu_seqlens.shape[0] - 1, None
    b_is = f"b = {b} from x.shape[0]" if cu_seqlens is None else f"b = {b} from len(cu_seqlens) - 1"

    shared = [weights is not None, lora_A is not None, lora_B is not None]
    if any(shared) and not all(shared):
        missing = [n for n, g in zip(("weights", "lora_A", "lora_B"), shared) if not g]
        raise ValueError(
            "weights, lora_A, lora_B: expected all three (the shared bank) or none, "
            f"got None for {', '.join(missing)}"
        )
    excl = [excl_weights is not None, excl_A is not None, excl_B is not None]
    if any(excl) and not all(excl):
        missing = [n for n, g in zip(("excl_weights", "excl_A", "excl_B"), excl) if not g]
        raise ValueError(
            "excl_weights, excl_A, excl_B: expected all three (the exclusive bank) or none, "
            f"got None for {', '.join(missing)}"
        )
    has_shared, has_excl = all(shared), all(excl)
    if not has_shared and not has_excl:
        raise ValueError(
            "weights/lora_A/lora_B and excl_weights/excl_A/excl_B: expected at least one "
            "skill bank (shared or exclusive), got neither"
        )
    if has_excl and task_ids is None:
        raise ValueError("task_ids: expected a [b] integer tensor with the exclusive bank, got None")

    q = r = d_out = None
    S = E = T = 0
    if has_shared:
        for name, t in (("weights", weights), ("lora_A", lora_A), ("lora_B", lora_B)):
            _require_tensor(name, t, floating=True)
        _require_ndim("lora_A", lora_A, 4, "[q, S, d_in/q, r]")
        _require_ndim("lora_B", lora_B, 4, "[q, S, r, d_out/q]")
        q, S, dq, r = lora_A.shape
        if q < 1 or S < 1 or r < 1:
            raise ValueError(f"lora_A: expected [q, S, d_in/q, r] with q, S, r >= 1, got shape {_shape(lora_A)}")
        if d_in % q != 0:
            raise ValueError(f"x: expected d_in divisible by q = {q} (lora_A.shape[0]), got d_in = {d_in}")
        _require_shape("lora_A", lora_A, (q, S, d_in // q, r), f"[q, S, d_in/q, r] with d_in = {d_in}")
        if lora_B.shape[0] != q or lora_B.shape[1] != S or lora_B.shape[2] != r:
            raise ValueError(
                f"lora_B: expected shape ({q}, {S}, {r}, d_out/q) to match lora_A [q, S, d_in/q, r], "
                f"got {_shape(lora_B)}"
            )
        d_out = q * lora_B.shape[3]
        if d_out < 1:
            raise ValueError(f"lora_B: expected d_out/q >= 1, got shape {_shape(lora_B)}")
        _require_shape("weights", weights, (b, q, S), f"[b, q, S] with {b_is}")
    if has_excl:
        for name, t in (("excl_weights", excl_weights), ("excl_A", excl_A), ("excl_B", excl_B)):
            _require_tensor(name, t, floating=True)
        _require_ndim("excl_A", excl_A, 5, "[T, q, E, d_in/q, r]")
        _require_ndim("excl_B", excl_B, 5, "[T, q, E, r, d_out/q]")
        T, qe, E, dqe, re = excl_A.shape
        if T < 1 or qe < 1 or E < 1 or re < 1:
            raise ValueError(
                f"excl_A: expected [T, q, E, d_in/q, r] with T, q, E, r >= 1, got shape {_shape(excl_A)}"
            )
        if q is None:
            q, r = qe, re
            if d_in % q != 0:
                raise ValueError(f"x: expected d_in divisible by q = {q} (excl_A.shape[1]), got d_in = {d_in}")
        _require_shape("excl_A", excl_A, (T, q, E, d_in // q, r), f"[T, q, E, d_in/q, r] with d_in = {d_in}")
        if d_out is None:
            if excl_B.shape[:4] != (T, q, E, r):
                raise ValueError(
                    f"excl_B: expected shape ({T}, {q}, {E}, {r}, d_out/q) to match excl_A, got {_shape(excl_B)}"
                )
            d_out = q * excl_B.shape[4]
            if d_out < 1:
                raise ValueError(f"excl_B: expected d_out/q >= 1, got shape {_shape(excl_B)}")
        _require_shape("excl_B", excl_B, (T, q, E, r, d_out // q), "[T, q, E, r, d_out/q]")
        _require_shape("excl_weights", excl_weights, (b, q, E), f"[b, q, E] with {b_is}")
    if task_ids is not None:
        _require_tensor("task_ids", task_ids, floating=False)
        _require_shape("task_ids", task_ids, (b,), f"[b], one task per example, {b_is}")

    sizes = Sizes(b=b, N=N, L=L, d_in=d_in, d_out=d_out, q=q, r=r, S=S, E=E, T=T)
    if base is not None:
        _require_tensor("base", base, floating=True)
        _require_shape("base", base, sizes.out_shape, "x's shape with d_out last")

    for name, t in (
        ("weights", weights),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("excl_weights", excl_weights),
        ("excl_A", excl_A),
        ("excl_B", excl_B),
        ("base", base),
    ):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's dtype), got {t.dtype}")
    for name, t in (
        ("weights", weights),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("task_ids", task_ids),
        ("excl_weights", excl_weights),
        ("excl_A", excl_A),
        ("excl_B", excl_B),
        ("cu_seqlens", cu_seqlens),
        ("base", base),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's device), got {t.device}")

    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real)):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    return sizes


def check_values(task_ids: Optional[Tensor], T: int, cu_seqlens: Optional[Tensor], N: int) -> None:
    """Check task ids in [0, T) and cu_seqlens = 0 <= ... non-decreasing ... = N.

    CPU tensors: ValueError now.  GPU tensors: device-side asserts, so there is
    no host synchronisation (the error surfaces at the next synchronising call).
    """
    checks = []
    if task_ids is not None and T > 0 and task_ids.numel() > 0:
        checks.append(
            (
                ((task_ids >= 0) & (task_ids < T)).all(),
                lambda: f"task_ids: expected values in [0, {T}), got min {int(task_ids.min())} "
                f"and max {int(task_ids.max())}",
            )
        )
    if cu_seqlens is not None:
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == N)
        if cu_seqlens.numel() > 1:
            ok = ok & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        checks.append(
            (
                ok,
                lambda: "cu_seqlens: expected non-decreasing offsets starting at 0 and ending at "
                f"N = {N}, got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else cu_seqlens}",
            )
        )
    for ok, message in checks:
        if ok.device.type == "cpu":
            if not bool(ok):
                raise ValueError(message())
        else:
            torch._assert_async(
                ok, f"cpoly_lora: task_ids must lie in [0, {T}) and cu_seqlens must rise from 0 to N = {N}"
            )


@dataclass
class Problem:
    """One call, normalised for the backends.

    x is `[N, d_in]` (a view of the caller's x when possible, any strides);
    `cu_seqlens` is `[b+1]` contiguous int64 on x's device, built as
    `arange(b+1) * L` for the padded layout; `base` is `[N, d_out]` or None.  Banks and weights are the
    caller's tensors, any strides.  `scale` is resolved (1/r by default).
    """

    sizes: Sizes
    x: Tensor
    cu_seqlens: Tensor
    weights: Optional[Tensor]
    lora_A: Optional[Tensor]
    lora_B: Optional[Tensor]
    task_ids: Optional[Tensor]
    excl_weights: Optional[Tensor]
    excl_A: Optional[Tensor]
    excl_B: Optional[Tensor]
    base: Optional[Tensor]
    scale: float

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_problem(
    x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, base, scale
) -> Problem:
    """Build a Problem from already-checked arguments (see `check_inputs`)."""
    sizes = check_inputs(
        x, weights, lora_A, lora_B,
        task_ids=task_ids, excl_weights=excl_weights, excl_A=excl_A, excl_B=excl_B,
        scale=scale, cu_seqlens=cu_seqlens, base=base,
    )
    if cu_seqlens is None:
        offsets = torch.arange(sizes.b + 1, device=x.device, dtype=torch.int64) * sizes.L
    else:  # kernels index it as a flat int64 array
        offsets = cu_seqlens.to(torch.int64).contiguous()
    return Problem(
        sizes=sizes,
        x=x.reshape(sizes.N, sizes.d_in),
        cu_seqlens=offsets,
        weights=weights,
        lora_A=lora_A,
        lora_B=lora_B,
        task_ids=task_ids,
        excl_weights=excl_weights,
        excl_A=excl_A,
        excl_B=excl_B,
        base=None if base is None else base.reshape(sizes.N, sizes.d_out),
        scale=sizes.scale(scale),
    )
