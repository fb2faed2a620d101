"""What gets timed for one case: every requested cpoly_kernels backend and every
anchor, each as an `Impl` that runs one forward on input copy k; `make_step`
turns an Impl into a zero-argument step for one mode that rotates the copies.

Modes: "fwd" (training forward, inputs require grad), "fwdbwd" (forward, then
`torch.autograd.grad` of every floating input with a fixed dy), "nograd"
(forward under `torch.no_grad()`, modules in eval mode).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

import cpoly_kernels as ck

from . import anchors
from .cases import Case
from .inputs import Inputs

ANCHORS = ("eager", "compile", "peft", "dense")
# Anchors that compute the case's own function (their output is checked against the reference).
SAME_FUNCTION = ("eager", "compile")


@dataclass
class Impl:
    name: str
    kind: str  # "backend" or "anchor"
    fwd: Optional[Callable[[int], Tensor]] = None  # one forward on input copy k
    leaves: Optional[Callable[[int], list]] = None  # what fwdbwd differentiates, copy k
    skip: Optional[str] = None  # why it is not timed on this case
    train_mode: Callable[[bool], None] = lambda training: None  # PEFT: module train()/eval()
    minus: Optional["Impl"] = None  # timed the same way and subtracted (PEFT's base linear)
    note: str = ""


def planned(case: Case, backend_names: list[str], anchor_names: list[str], compile_cases: str) -> list[str]:
    """The impl names a case will show (before any tensor exists), in display order."""
    names = list(backend_names)
    for a in anchor_names:
        if a == "compile" and not (compile_cases == "all" or (compile_cases == "listed" and case.compile_anchor)):
            continue
        names.append(a)
    return names


def build(case: Case, sets: list[Inputs], names: list[str], backend_info: dict) -> list[Impl]:
    impls = []
    for name in names:
        if name in ANCHORS:
            try:
                impls.append(_anchor(name, case, sets))
            except Exception as e:  # noqa: BLE001  (an anchor that cannot be built must not cost the case)
                impls.append(Impl(name, "anchor", skip=f"could not be built: {type(e).__name__}: {e}"))
        else:
            info = backend_info.get(name, {"available": False, "reason": "unknown backend"})
            impls.append(_backend(name, sets) if info["available"] else Impl(name, "backend", skip=info["reason"]))
    return impls


def _backend(name: str, sets: list[Inputs]) -> Impl:
    def fwd(k: int) -> Tensor:
        s = sets[k]
        return ck.cpoly_lora(s.x, s.weights, s.lora_A, s.lora_B, **s.op_kwargs(), backend=name)

    return Impl(name, "backend", fwd=fwd, leaves=lambda k: sets[k].params())


def _anchor(name: str, case: Case, sets: list[Inputs]) -> Impl:
    if name == "dense":
        dense = [anchors.dense_params(case, s) for s in sets]
        for A, B in dense:
            A.requires_grad_(True)
            B.requires_grad_(True)
        return Impl(
            "dense", "anchor",
            fwd=lambda k: anchors.dense_lora(sets[k].x, *dense[k], sets[k].scale),
            leaves=lambda k: [sets[k].x, *dense[k]],
            note="one plain LoRA for every token",
        )
    if case.packed:
        return Impl(name, "anchor", skip="packed input (cu_seqlens): PEFT's code takes padded [b, L, d] only")
    if name in ("eager", "compile"):
        fn = anchors.eager_reference if name == "eager" else torch.compile(anchors.eager_reference)
        return Impl(
            name, "anchor",
            fwd=lambda k: fn(*anchors.eager_args(sets[k])),
            leaves=lambda k: sets[k].params(),
        )
    if name == "peft":
        reason = anchors.peft_unavailable(case)
        if reason is not None:
            return Impl("peft", "anchor", skip=reason)
        layers = [anchors.peft_layer(case, s) for s in sets]
        base = Impl(
            "peft-base-linear", "anchor",
            fwd=lambda k: layers[k].base_layer(sets[k].x),
            leaves=lambda k: [sets[k].x],
        )

        def train_mode(training: bool) -> None:
            for layer in layers:
                layer.train(training)

        return Impl(
            "peft", "anchor",
            fwd=lambda k: layers[k](sets[k].x, task_ids=sets[k].task_ids),
            leaves=lambda k: [sets[k].x, *anchors.peft_params(layers[k])],
            train_mode=train_mode, minus=base,
            note=f"shared bank only (S{case.S_total}), router included, minus the base linear",
        )
    raise ValueError(f"unknown anchor {name!r}; known: {', '.join(ANCHORS)}")


def make_step(impl: Impl, mode: str, sets: list[Inputs]) -> Callable[[], object]:
    """A zero-argument step for `mode` that takes the next input copy on every call."""
    turn = itertools.cycle(range(len(sets)))
    fwd, leaves = impl.fwd, impl.leaves
    if mode == "fwd":
        return lambda: fwd(next(turn))
    if mode == "nograd":
        def step():
            with torch.no_grad():
                return fwd(next(turn))
        return step
    if mode == "fwdbwd":
        def step():
            k = next(turn)
            return torch.autograd.grad(fwd(k), leaves(k), sets[k].dy)
        return step
    raise ValueError(f"mode: expected 'fwd', 'fwdbwd' or 'nograd', got {mode!r}")
