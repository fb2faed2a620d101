"""The benchmark cases: every OP_SPEC §5 shape under its §5 name, plus a few
more (MHR with q=4, a packed varlen batch, fp16/fp32 variants), their tiny
CPU-sized versions, and selection by name or substring.

A case fixes sizes only; `inputs.make_inputs` turns it into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

MODES = ("fwd", "fwdbwd", "nograd")
TRAIN = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the workload it stands for
    b: int  # examples (sequences)
    L: int  # tokens per example; for a packed case the mean length (N = b * L)
    d_in: int
    d_out: int
    r: int
    S: int  # shared skills (for `task_skills`: the Poly skills only, T more are appended)
    E: int  # exclusive skills per task (0: no exclusive bank)
    T: int  # tasks (ids are drawn in [0, T))
    q: int = 1
    present: Optional[int] = None  # distinct tasks in the batch; None: min(b, T)
    task_skills: bool = False  # C-Poly author form: T task skills appended to the shared bank
    premixed: bool = False  # exclusive weights fixed to 1.0 (serving premixed adapters)
    packed: bool = False  # x is [N, d_in] with cu_seqlens of mixed lengths
    dtype: Optional[str] = None  # None: the run's default dtype
    modes: tuple = TRAIN
    compile_anchor: bool = False  # time torch.compile of the eager reference by default

    @property
    def N(self) -> int:
        return self.b * self.L

    @property
    def S_total(self) -> int:
        """Skills in the shared bank as the op sees it."""
        return self.S + (self.T if self.task_skills else 0)

    @property
    def P(self) -> int:
        """Tasks present in the batch (OP_SPEC §5's P)."""
        return min(self.b, self.T) if self.present is None else self.present

    def describe(self) -> str:
        bank = f"S{self.S_total}" + (f" (={self.S}+T)" if self.task_skills else "")
        layout = f"packed {self.b} seqs" if self.packed else f"{self.b}x{self.L}"
        return (
            f"{layout} N={self.N} d={self.d_in}x{self.d_out} q{self.q} r{self.r} {bank} "
            f"E{self.E} T{self.T} P{self.P}"
        )


_D4096 = dict(b=16, L=1024, d_in=4096, d_out=4096, r=16, S=32, E=1, T=100)

# N = 16384 tokens in every training row, as in OP_SPEC §5.
CASES: tuple[Case, ...] = (
    Case("d4096", "LLaMA-class attention projection, C-Poly S32 E1 r16", **_D4096, compile_anchor=True),
    Case("d4096-mhr8", "same with MHR heads q=8", **{**_D4096, "q": 8}),
    Case("d4096-many-short", "256 short sequences: every task present", **{**_D4096, "b": 256, "L": 64}),
    Case("d4096-r64", "high rank, few skills", **{**_D4096, "r": 64, "S": 8}),
    Case("t5l-paper-gathered", "C-Poly paper, T5-Large, A=3 shared + 1 exclusive per task",
         b=32, L=512, d_in=1024, d_out=1024, r=2, S=3, E=1, T=100),
    Case("t5l-paper-dense", "C-Poly author code `cpoly`: A=3 + T=100 task skills in one dense bank",
         b=32, L=512, d_in=1024, d_out=1024, r=2, S=3, E=0, T=100, task_skills=True, compile_anchor=True),
    Case("glm10b-qkv-paper", "C-Poly paper, GLM-10B fused q/k/v 4096 -> 12288",
         b=8, L=2048, d_in=4096, d_out=12288, r=2, S=3, E=1, T=100),
    Case("mlp-up", "LLaMA MLP up-projection 4096 -> 11008", **{**_D4096, "d_out": 11008}),
    Case("superni-1600", "full SuperNI: 1600 tasks", **{**_D4096, "r": 8, "S": 8, "T": 1600}),
    Case("decode-serving", "serving premixed adapters: 256 sequences x 1 token, one adapter each",
         b=256, L=1, d_in=4096, d_out=4096, r=16, S=0, E=1, T=256, premixed=True, modes=("nograd",)),
    Case("peft-mhr4", "PEFT's Poly example: FLAN-T5-XL d2048, MHR q=4, S2 r8, 8 x 512",
         b=8, L=512, d_in=2048, d_out=2048, r=8, S=2, E=0, T=100, q=4),
    Case("d4096-packed64", "packed varlen: 64 sequences of mixed lengths from 16 tasks (cu_seqlens)",
         **{**_D4096, "b": 64, "L": 256}, present=16, packed=True),
    Case("d4096-fp16", "d4096 in float16", **_D4096, dtype="float16"),
    Case("d4096-fp32", "d4096 in float32", **_D4096, dtype="float32"),
)

#: The names OP_SPEC §5 measures (its table, top to bottom).
SPEC_CASES = (
    "d4096", "d4096-mhr8", "d4096-many-short", "d4096-r64", "t5l-paper-gathered", "t5l-paper-dense",
    "glm10b-qkv-paper", "mlp-up", "superni-1600", "decode-serving",
)


def _shrink_d(d: int, q: int) -> int:
    d = max(q, d // 32)
    return d - d % q


def tiny(case: Case) -> Case:
    """The same case scaled down for a CPU: d/32, L/32, b/4, at most 8 skills, r/4, T/10."""
    b = max(1, case.b // 4)
    T = max(4, case.T // 10)
    present = None if case.present is None else max(1, min(b, T, case.present // 4))
    return replace(
        case,
        b=b,
        L=max(1, case.L // 32),
        d_in=_shrink_d(case.d_in, case.q),
        d_out=_shrink_d(case.d_out, case.q),
        r=max(2, case.r // 4) if case.r >= 2 else case.r,
        S=min(case.S, 8),
        T=T,
        present=present,
    )


def select(names: Optional[str] = None, filters: Optional[str] = None) -> list[Case]:
    """Cases by comma-separated exact names (in the given order) and/or substrings (any matches)."""
    by_name = {c.name: c for c in CASES}
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"--cases: unknown case(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        chosen = [by_name[n] for n in wanted]
    else:
        chosen = list(CASES)
    if filters:
        subs = [f.strip() for f in filters.split(",") if f.strip()]
        chosen = [c for c in chosen if any(s in c.name for s in subs)]
    return chosen

