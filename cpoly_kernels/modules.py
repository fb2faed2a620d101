"""Routers and a drop-in layer for Poly / MHR / C-Poly multi-task LoRA.

The routers turn task ids into the mixing weights that `cpoly_kernels.cpoly_lora`
takes (OP_SPEC §2); they are plain PyTorch:

- `PolyRouter`: Poly (q = 1) and MHR (q > 1).  Exactly PEFT's
  `peft.tuners.poly.router.PolyRouter` (same parameter name, init, sampling
  and normalisation), so the same logits and RNG state give the same weights.
- `CPolyRouter`: C-Poly, paper form.  The Poly router for the shared bank plus
  E exclusive skills per task, gathered by task id, with learned per-task
  weights (or a fixed 1.0, as the author's `cpoly_simple`).
- `CPolyDenseRouter`: C-Poly, the author's `cpoly` code.  The T task skills
  are appended to the shared bank (one dense bank of S + T skills) and their
  weights are the rows of a learnable T x T matrix initialised to identity.

`CPolyLinear` wraps an `nn.Linear` with a skill bank and a router, and computes
`base_layer(x) + cpoly_lora(x, ...)` in one call of the op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ._op import cpoly_lora

#: Added to the per-split sum of the Poly weights before dividing (PEFT's `EPS`).
EPS = 1e-12

VARIANTS = ("poly", "cpoly", "cpoly_dense")


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_task_ids(task_ids, n_tasks: int, b: Optional[int] = None) -> None:
    """task_ids must be an integer tensor `[b]` with values in [0, n_tasks).

    The range is checked on the host (ValueError) for CPU tensors in eager
    mode, else with a device-side assert (no host synchronisation, traceable
    by torch.compile).
    """
    if not isinstance(task_ids, Tensor):
        raise TypeError(f"task_ids: expected an integer torch.Tensor of shape [b], got {type(task_ids).__name__}")
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids: expected an integer dtype, got {task_ids.dtype}")
    if b is None:
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids: expected shape [b] (one task per example), got shape {tuple(task_ids.shape)}")
    elif tuple(task_ids.shape) != (b,):
        raise ValueError(
            f"task_ids: expected shape ({b},) (one task per example of x), got shape {tuple(task_ids.shape)}"
        )
    if task_ids.numel() == 0:
        return
    ok = ((task_ids >= 0) & (task_ids < n_tasks)).all()
    if task_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(
                f"task_ids: expected values in [0, {n_tasks}), got min {int(task_ids.min())} "
                f"and max {int(task_ids.max())}"
            )
    else:
        torch._assert_async(ok, f"task_ids: expected values in [0, {n_tasks})")


def kaiming_init_bank_(bank: Tensor) -> Tensor:
    """Fill an A bank `[..., q, S, d, r]` in place with PEFT's PolyLayer init.

    PEFT's `PolyLayer.reset_poly_parameters` (after mttl) initialises each
    skill's A block as `nn.Linear` initialises a weight: for each skill, then
    each split, an `[r, d]` matrix drawn with `kaiming_uniform_(a=sqrt(5))`
    (i.e. U(-1/sqrt(d), 1/sqrt(d)), d = d_in/q) on the CPU in float32, stored
    transposed.  Leading dimensions (the tasks of an exclusive bank) are the
    outermost loop.  With the same RNG state this reproduces PEFT's values
    exactly.  Returns `bank`.
    """
    q, S, d, r = bank.shape[-4:]
    values = torch.empty(bank.shape[:-4].numel(), q, S, d, r)
    for m in range(values.shape[0]):
        for skill in range(S):
            for split in range(q):
                param = torch.empty((r, d))
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                values[m, split, skill] = param.T
    with torch.no_grad():
        bank.copy_(values.reshape(bank.shape))
    return bank


class PolyRouter(nn.Module):
    """Poly / MHR router: task ids `[b]` -> mixing weights `[b, q, S]`.

    Parameter `module_logits` `[T, q*S]`, initialised U(-1e-3, 1e-3) (drawn on
    the CPU in float32, as PEFT does).  Forward: the task's logits viewed as
    `[b, q, S]`; in training mode a `RelaxedBernoulli(temperature=1, logits)`
    sample (reparameterised, so the logits get gradients), in eval mode their
    sigmoid; then divided by the per-split sum + 1e-12.  This is PEFT's
    `PolyRouter` line for line.
    """

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int = 1, *, device=None, dtype=None):
        super().__init__()
        _require_positive_int("n_tasks", n_tasks)
        _require_positive_int("n_skills", n_skills)
        _require_positive_int("n_splits", n_splits)
        self.n_tasks, self.n_skills, self.n_splits = n_tasks, n_skills, n_splits
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, device=device, dtype=dtype))
        PolyRouter.reset_parameters(self)

    def reset_parameters(self) -> None:
        """`module_logits` ~ U(-1e-3, 1e-3), drawn as PEFT's `PolyRouter.reset`."""
        with torch.no_grad():
            self.module_logits.copy_(torch.empty(self.module_logits.shape).uniform_(-1e-3, 1e-3))

    def forward(self, task_ids: Tensor) -> Tensor:
        _check_task_ids(task_ids, self.n_tasks)
        logits = self.module_logits[task_ids.to(self.module_logits.device, torch.int64)]
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:
            probs = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            probs = torch.sigmoid(logits)
        return probs / (probs.sum(dim=-1, keepdim=True) + EPS)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}"


class CPolyRouter(PolyRouter):
    """C-Poly router, paper form: `(weights [b, q, S], excl_weights [b, q, E])`.

    `weights` are the Poly weights of the shared bank (see `PolyRouter`).
    `excl_weights` weigh the E exclusive skills of each example's own task:
    with `learn_excl_weights=True` they are the rows of the parameter
    `excl_weights` `[T, q, E]`, initialised to ones (so at init every task uses
    the plain sum of its exclusive skills, as with fixed weights, and the
    weights are raw, not normalised or squashed); with
    `learn_excl_weights=False` they are a fixed 1.0 (the author's
    `cpoly_simple`, there with E = 1) and the router has no such parameter.
    """

    def __init__(
        self,
        n_tasks: int,
        n_skills: int,
        n_splits: int = 1,
        n_excl_skills: int = 1,
        learn_excl_weights: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__(n_tasks, n_skills, n_splits, device=device, dtype=dtype)
        _require_positive_int("n_excl_skills", n_excl_skills)
        self.n_excl_skills = n_excl_skills
        self.learn_excl_weights = bool(learn_excl_weights)
        if self.learn_excl_weights:
            self.excl_weights = nn.Parameter(torch.ones(n_tasks, n_splits, n_excl_skills, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Poly logits as `PolyRouter`; the learned exclusive weights (if any) to ones."""
        super().reset_parameters()
        if self.learn_excl_weights:
            with torch.no_grad():
                self.excl_weights.fill_(1.0)

    def forward(self, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        weights = super().forward(task_ids)
        if self.learn_excl_weights:
            excl = self.excl_weights[task_ids.to(self.excl_weights.device, torch.int64)]
        else:
            excl = weights.new_ones(weights.shape[0], self.n_splits, self.n_excl_skills)
        return weights, excl

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_excl_skills={self.n_excl_skills}, "
            f"learn_excl_weights={self.learn_excl_weights}"
        )


class CPolyDenseRouter(PolyRouter):
    """C-Poly router, the author's `cpoly` form: weights `[b, q, S + T]`.

    The first S columns are the Poly weights (see `PolyRouter`); the last T are
    the example's task's row of the learnable `c_module_logits` `[T, T]`
    (initialised to identity; raw, not normalised, the same for every split),
    for one dense bank whose last T skills are the task skills.
    """

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int = 1, *, device=None, dtype=None):
        super().__init__(n_tasks, n_skills, n_splits, device=device, dtype=dtype)
        self.c_module_logits = nn.Parameter(torch.eye(n_tasks, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Poly logits as `PolyRouter`; `c_module_logits` to identity."""
        super().reset_parameters()
        with torch.no_grad():
            nn.init.eye_(self.c_module_logits)

    def forward(self, task_ids: Tensor) -> Tensor:
        weights = super().forward(task_ids)
        task_rows = self.c_module_logits[task_ids.to(self.c_module_logits.device, torch.int64)]
        task_rows = task_rows.unsqueeze(1).expand(-1, self.n_splits, -1)
        return torch.cat((weights, task_rows), dim=-1)


class CPolyLinear(nn.Module):
    """`base_layer(x)` plus a Poly / MHR / C-Poly LoRA delta, computed by `cpoly_lora`.

    Args:
        base_layer: the `nn.Linear` to adapt; kept as the submodule
            `base_layer` (its parameters and state-dict entries are untouched).
        n_tasks: T, the number of tasks.
        n_skills: S, the number of shared skills (A in the C-Poly paper).
        r: the rank of every skill.
        n_splits: q; 1 is Poly, > 1 is MHR (must divide in_features and
            out_features).
        variant: "poly" (Poly / MHR: the shared bank only); "cpoly" (C-Poly,
            paper form: plus an exclusive bank of `n_excl_skills` skills per
            task, gathered by task id, router `CPolyRouter`); "cpoly_dense"
            (C-Poly, the author's code: the T task skills appended to the
            shared bank, S + T skills, router `CPolyDenseRouter`).
        n_excl_skills: E, exclusive skills per task ("cpoly" only; default 1).
        learn_excl_weights: "cpoly" only (default True): learn the per-task
            exclusive weights (init ones) or fix them to 1.0 (`cpoly_simple`).
        scale: multiplies the delta; default 1/r (PEFT, Polytropon).
        backend: passed to `cpoly_lora` ("auto", "reference", "triton", "cuda").
        device, dtype: of the adapter parameters; default those of
            `base_layer.weight`.

    Parameters, in PEFT's PolyLayer layout (`d = in_features`, `o = out_features`):
        lora_A `[q, S', d/q, r]`, lora_B `[q, S', r, o/q]` with S' = S, or S + T
        for "cpoly_dense"; for "cpoly" also excl_A `[T, q, E, d/q, r]`,
        excl_B `[T, q, E, r, o/q]`; and `router`.  A blocks are initialised as
        PEFT does (see `kaiming_init_bank_`), B blocks to zero (so the layer
        starts as its base layer).  Construction draws, in this order, lora_A,
        the router's logits, then excl_A: a "poly" layer built under the same
        seed as a PEFT Poly layer has the same initial values.

    The LoRA path runs in the adapters' dtype (x is cast to it, as PEFT does).
    When the base layer's output has that dtype too, it is added inside the op
    (`base=`); else the two are added with type promotion.  The output has x's
    dtype.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        n_tasks: int,
        n_skills: int,
        r: int,
        n_splits: int = 1,
        variant: str = "poly",
        n_excl_skills: Optional[int] = None,
        learn_excl_weights: Optional[bool] = None,
        scale: Optional[float] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
        if variant != "cpoly" and (n_excl_skills is not None or learn_excl_weights is not None):
            raise ValueError(
                f"n_excl_skills, learn_excl_weights: only the 'cpoly' variant has an exclusive bank, "
                f"got variant {variant!r} with n_excl_skills={n_excl_skills!r}, "
                f"learn_excl_weights={learn_excl_weights!r}"
            )
        for name, value in (("n_tasks", n_tasks), ("n_skills", n_skills), ("r", r), ("n_splits", n_splits)):
            _require_positive_int(name, value)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        if d_in % n_splits or d_out % n_splits:
            raise ValueError(
                f"n_splits: expected a divisor of in_features = {d_in} and out_features = {d_out}, got {n_splits}"
            )
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")

        factory = {
            "device": base_layer.weight.device if device is None else device,
            "dtype": base_layer.weight.dtype if dtype is None else dtype,
        }
        self.base_layer = base_layer
        self.in_features, self.out_features = d_in, d_out
        self.n_tasks, self.n_skills, self.n_splits, self.r = n_tasks, n_skills, n_splits, r
        self.variant = variant
        self.scale = 1.0 / r if scale is None else float(scale)
        self.backend = backend
        bank = n_skills + n_tasks if variant == "cpoly_dense" else n_skills
        # Drawn in PEFT's order: lora_A, then the router's logits (drawn by its
        # constructor), then the exclusive bank.
        self.lora_A = nn.Parameter(kaiming_init_bank_(torch.empty(n_splits, bank, d_in // n_splits, r, **factory)))
        self.lora_B = nn.Parameter(torch.zeros(n_splits, bank, r, d_out // n_splits, **factory))
        if variant == "poly":
            self.router = PolyRouter(n_tasks, n_skills, n_splits, **factory)
        elif variant == "cpoly_dense":
            self.router = CPolyDenseRouter(n_tasks, n_skills, n_splits, **factory)
        else:
            E = 1 if n_excl_skills is None else n_excl_skills
            self.router = CPolyRouter(
                n_tasks, n_skills, n_splits, E,
                True if learn_excl_weights is None else learn_excl_weights, **factory,
            )
            self.excl_A = nn.Parameter(
                kaiming_init_bank_(torch.empty(n_tasks, n_splits, E, d_in // n_splits, r, **factory))
            )
            self.excl_B = nn.Parameter(torch.zeros(n_tasks, n_splits, E, r, d_out // n_splits, **factory))

    def reset_parameters(self) -> None:
        """Re-draw the adapter (not the base layer), in the constructor's order: lora_A as
        PEFT, lora_B to zero, the router, excl_A as PEFT, excl_B to zero."""
        kaiming_init_bank_(self.lora_A)
        nn.init.zeros_(self.lora_B)
        self.router.reset_parameters()
        if self.variant == "cpoly":
            kaiming_init_bank_(self.excl_A)
            nn.init.zeros_(self.excl_B)

    def forward(self, x: Tensor, task_ids: Tensor, *, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x `[b, L, in_features]` (padded) or `[N, in_features]` with `cu_seqlens` `[b+1]`
        (packed); task_ids `[b]`, one task per example.  Returns x's shape with
        out_features last, in x's dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if cu_seqlens is None:
            if x.dim() != 3:
                raise ValueError(
                    f"x: expected shape [b, L, {self.in_features}] (or [N, {self.in_features}] with cu_seqlens), "
                    f"got shape {tuple(x.shape)}"
                )
            b = x.shape[0]
        else:
            if not isinstance(cu_seqlens, Tensor):
                raise TypeError(f"cu_seqlens: expected a torch.Tensor [b+1], got {type(cu_seqlens).__name__}")
            if cu_seqlens.dim() != 1:
                raise ValueError(
                    f"cu_seqlens: expected shape [b+1] (segment offsets), got shape {tuple(cu_seqlens.shape)}"
                )
            b = cu_seqlens.shape[0] - 1
        _check_task_ids(task_ids, self.n_tasks, b)

        base = self.base_layer(x)
        dtype = self.lora_A.dtype
        xc = x.to(dtype)
        fuse = base.dtype == dtype
        kwargs = dict(scale=self.scale, cu_seqlens=cu_seqlens, base=base if fuse else None, backend=self.backend)
        if self.variant == "cpoly":
            weights, excl_weights = self.router(task_ids)
            out = cpoly_lora(
                xc, weights, self.lora_A, self.lora_B,
                task_ids=task_ids.to(device=x.device, dtype=torch.int64),
                excl_weights=excl_weights, excl_A=self.excl_A, excl_B=self.excl_B, **kwargs,
            )
        else:
            out = cpoly_lora(xc, self.router(task_ids), self.lora_A, self.lora_B, **kwargs)
        if not fuse:
            out = out + base
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, variant={self.variant!r}, "
            f"n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}, r={self.r}, "
            f"scale={self.scale:g}, backend={self.backend!r}"
        )
