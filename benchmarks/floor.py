"""The OP_SPEC §5 floor: the bytes that must move once, in the input dtype.

    forward:  read x, write the output            N (d_in + d_out)
              read the banks once                 (S + P E)(d_in + d_out) r
              (with base=: read it                N d_out)
    backward: read dy and x, write dx             N (d_out + 2 d_in)
              read the banks again                (S + P E)(d_in + d_out) r
              write every parameter gradient once (S + T E)(d_in + d_out) r

P = tasks present in the batch, T = all tasks (the exclusive bank's gradient
covers every task, present or not).  The floor time divides these bytes by the
bandwidth of a device-to-device copy (bytes read + written) measured in the
same run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FloorShape:
    N: int  # token rows
    d_in: int
    d_out: int
    r: int
    S: int  # shared skills as the op sees them (0: no shared bank)
    E: int  # exclusive skills per task (0: no exclusive bank)
    T: int  # tasks of the exclusive bank
    P: int  # tasks present in the batch
    elem_bytes: int  # bytes per element of the input dtype
    base: bool = False  # the call passes base= (fused residual add)


def forward_elements(s: FloorShape) -> int:
    d = s.d_in + s.d_out
    n = s.N * d + (s.S + s.P * s.E) * d * s.r
    if s.base:
        n += s.N * s.d_out
    return n


def backward_elements(s: FloorShape) -> int:
    d = s.d_in + s.d_out
    return s.N * (s.d_out + 2 * s.d_in) + (s.S + s.P * s.E) * d * s.r + (s.S + s.T * s.E) * d * s.r


def floor_bytes(s: FloorShape, mode: str) -> int:
    """Bytes of one call: "fwd" and "nograd" count the forward, "fwdbwd" both passes."""
    if mode in ("fwd", "nograd"):
        return forward_elements(s) * s.elem_bytes
    if mode == "fwdbwd":
        return (forward_elements(s) + backward_elements(s)) * s.elem_bytes
    raise ValueError(f"mode: expected 'fwd', 'fwdbwd' or 'nograd', got {mode!r}")


def floor_ms(nbytes: int, copy_bytes_per_s: float) -> float:
    """Floor time in ms at the measured copy bandwidth (bytes read + written per second)."""
    return nbytes / copy_bytes_per_s * 1e3
