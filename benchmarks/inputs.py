"""Deterministic inputs of a case: random non-zero values in the layouts of
OP_SPEC §2/§6, mixing weights normalised like a Poly router, task ids in
[0, T) with exactly `case.P` distinct tasks, packed cu_seqlens of mixed
lengths (one single-token segment among them).

`make_inputs` builds one set; `copies` clones it so the timed loop can rotate
among several sets of tensors that the L2 cache cannot all hold.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from .cases import Case

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
POLY_EPS = 1e-12  # PEFT's PolyRouter: weights / (row sum + 1e-12)


@dataclass
class Inputs:
    x: Tensor  # [b, L, d_in], or [N, d_in] when packed
    dy: Tensor  # gradient of the output, x's shape with d_out last
    weights: Optional[Tensor]  # [b, q, S_total]
    lora_A: Optional[Tensor]  # [q, S_total, d_in/q, r]
    lora_B: Optional[Tensor]  # [q, S_total, r, d_out/q]
    task_ids: Tensor  # [b] int64, always drawn (PEFT's router needs them too)
    excl_weights: Optional[Tensor]  # [b, q, E]
    excl_A: Optional[Tensor]  # [T, q, E, d_in/q, r]
    excl_B: Optional[Tensor]  # [T, q, E, r, d_out/q]
    cu_seqlens: Optional[Tensor]  # [b+1] int32 when packed
    scale: float

    def op_kwargs(self) -> dict:
        """Keyword arguments of `cpoly_lora` after (x, weights, lora_A, lora_B)."""
        excl = self.excl_A is not None
        return dict(
            task_ids=self.task_ids if excl else None,
            excl_weights=self.excl_weights,
            excl_A=self.excl_A,
            excl_B=self.excl_B,
            scale=self.scale,
            cu_seqlens=self.cu_seqlens,
        )

    def params(self) -> list[Tensor]:
        """The floating inputs that get gradients (x, weights, banks), present ones only."""
        return [
            t for t in (self.x, self.weights, self.lora_A, self.lora_B, self.excl_weights, self.excl_A, self.excl_B)
            if t is not None
        ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self) if isinstance(t := getattr(self, f.name), Tensor))


def _task_ids(case: Case, g: torch.Generator) -> Tensor:
    """b ids in [0, T) covering exactly P distinct tasks, in random order."""
    pool = torch.randperm(case.T, generator=g)[: case.P]
    picks = torch.cat([torch.arange(case.P), torch.randint(case.P, (case.b - case.P,), generator=g)])
    return pool[picks[torch.randperm(case.b, generator=g)]]


def _seqlens(case: Case, g: torch.Generator) -> list[int]:
    """b lengths >= 1 summing to N, skewed (log-normal), the first one a single token."""
    raw = torch.exp(torch.randn(case.b, generator=g) * 1.2)
    lens = [1] + [max(1, int(v)) for v in (raw[1:] / raw[1:].sum() * (case.N - case.b)).tolist()]
    lens[int(torch.tensor(lens).argmax())] += case.N - sum(lens)
    order = torch.randperm(case.b, generator=g).tolist()
    return [lens[i] for i in order]


def _poly_weights(logits: Tensor, task_ids: Tensor, g: torch.Generator) -> Tensor:
    """RelaxedBernoulli(temperature 1) sample of sigmoid(logits[t]), divided by its row sum (PEFT's router)."""
    u = torch.rand(logits[task_ids].shape, generator=g).clamp(1e-6, 1 - 1e-6)
    w = torch.sigmoid(logits[task_ids] + torch.log(u) - torch.log1p(-u))
    return w / (w.sum(-1, keepdim=True) + POLY_EPS)


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """One deterministic set of inputs: ids, lengths and mixing weights from a CPU generator,
    the large tensors (x, dy, banks) in float32 from a generator on `device` (fast on a GPU;
    the same values on every run on that kind of device), then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(case.name.encode()))
    gd = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(case.name.encode()) + 1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gd, device=device)

    b, q, r, T, E = case.b, case.q, case.r, case.T, case.E
    dq, oq = case.d_in // case.q, case.d_out // case.q
    task_ids = _task_ids(case, g)

    cu_seqlens = None
    if case.packed:
        offsets = torch.tensor([0] + _seqlens(case, g)).cumsum(0)
        cu_seqlens = offsets.to(torch.int32)
        x = randn(case.N, case.d_in)
        dy = randn(case.N, case.d_out)
    else:
        x = randn(b, case.L, case.d_in)
        dy = randn(b, case.L, case.d_out)

    weights = lora_A = lora_B = None
    if case.S_total > 0:
        S = case.S_total
        weights = _poly_weights(torch.randn(T, q, case.S, generator=g), task_ids, g)
        if case.task_skills:
            # author form: raw rows of a learnable T x T matrix initialised to identity, same for every split
            table = torch.eye(T) + 0.01 * torch.randn(T, T, generator=g)
            weights = torch.cat([weights, table[task_ids][:, None, :].expand(b, q, T)], dim=-1)
        lora_A = randn(q, S, dq, r) * case.d_in ** -0.5
        lora_B = randn(q, S, r, oq) * r ** -0.5

    excl_weights = excl_A = excl_B = None
    if E > 0:
        if case.premixed:
            excl_weights = torch.ones(b, q, E)
        else:  # learned per task (C-Poly paper form)
            excl_weights = (0.5 + torch.rand(T, q, E, generator=g))[task_ids]
        excl_A = randn(T, q, E, dq, r) * case.d_in ** -0.5
        excl_B = randn(T, q, E, r, oq) * r ** -0.5

    def put(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    return Inputs(
        x=put(x), dy=put(dy), weights=put(weights), lora_A=put(lora_A), lora_B=put(lora_B),
        task_ids=task_ids.to(device), excl_weights=put(excl_weights), excl_A=put(excl_A), excl_B=put(excl_B),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device),
        scale=1.0 / r,
    )


def copies(inp: Inputs, k: int, requires_grad: bool) -> list[Inputs]:
    """k independent sets with the same values (separate memory), floating ones as leaves."""
    out = []
    for _ in range(k):
        kw = {}
        for f in fields(inp):
            t = getattr(inp, f.name)
            if isinstance(t, Tensor):
                t = t.detach().clone()
                if t.is_floating_point() and f.name != "dy":
                    t.requires_grad_(requires_grad)
            kw[f.name] = t
        out.append(Inputs(**kw))
    return out


def rotation_count(inp: Inputs, device: torch.device) -> int:
    """How many copies to rotate so that together they exceed 4x the L2 cache (2 to 8)."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
    need = -(-4 * l2 // max(1, inp.nbytes()))
    return int(min(8, max(2, need)))
