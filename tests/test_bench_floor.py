"""The OP_SPEC §5 floor formula against a hand computation, and the benchmark
cases against the floors of the measured anchor run
(shared/spec/anchors-h200-2026-11-26.json, copy bandwidth 4.250086233621223 TB/s).
CPU only, no GPU needed: `python -m pytest tests/test_bench_floor.py`."""
import pytest
import torch

from benchmarks.cases import CASES, SPEC_CASES, tiny
from benchmarks.floor import FloorShape, floor_bytes, floor_ms
from benchmarks.inputs import make_inputs

H200_COPY_BPS = 4.250086233621223e12

# (floor_fwd_ms, floor_fwdbwd_ms) of anchors-h200-2026-11-26.json, by this suite's case name.
ANCHOR_FLOORS_MS = {
    "d4096": (0.06612062733620405, 0.171962974825874),
    "d4096-mhr8": (0.06612062733620405, 0.171962974825874),
    "d4096-many-short": (0.07130172126926483, 0.1823251626919955),
    "d4096-r64": (0.06908125244081022, 0.19638813193887472),
    "t5l-paper-gathered": (0.015857462718486204, 0.03980845721707738),
    "t5l-paper-dense": (0.01598853205905471, 0.04007059589821438),
    "glm10b-qkv-paper": (0.1264896236098139, 0.2861475003446685),
    "mlp-up": (0.12190990665112623, 0.29041110889374977),
    "superni-1600": (0.06390015850774944, 0.2089707886334509),
    "decode-serving": (0.016776875592768196, None),
}


def test_floor_by_hand_d4096():
    # d4096: N = 16 x 1024 = 16384, d_in = d_out = 4096, r 16, S 32, E 1, T 100,
    # 16 examples of 16 different tasks (P = 16), bf16 (2 bytes).
    s = FloorShape(N=16384, d_in=4096, d_out=4096, r=16, S=32, E=1, T=100, P=16, elem_bytes=2)
    x_and_out = 16384 * (4096 + 4096)  # 134_217_728
    banks = (32 + 16 * 1) * (4096 + 4096) * 16  # 6_291_456
    assert floor_bytes(s, "fwd") == 2 * 140_509_184 == 2 * (x_and_out + banks)
    assert floor_bytes(s, "nograd") == floor_bytes(s, "fwd")
    dy_x_dx = 16384 * (4096 + 2 * 4096)  # 201_326_592
    grads = (32 + 100 * 1) * (4096 + 4096) * 16  # 17_301_504: every task's exclusive gradient
    backward = dy_x_dx + banks + grads  # 224_919_552
    assert floor_bytes(s, "fwdbwd") == 2 * (140_509_184 + backward) == 730_857_472
    assert floor_ms(730_857_472, H200_COPY_BPS) == pytest.approx(0.171962974825874, rel=1e-12)
    with_base = FloorShape(**{**s.__dict__, "base": True})
    assert floor_bytes(with_base, "fwd") - floor_bytes(s, "fwd") == 2 * 16384 * 4096


@pytest.mark.parametrize("name", SPEC_CASES)
def test_cases_reproduce_the_spec_floors(name):
    case = next(c for c in CASES if c.name == name)
    s = FloorShape(N=case.N, d_in=case.d_in, d_out=case.d_out, r=case.r, S=case.S_total, E=case.E,
                   T=case.T if case.E else 0, P=case.P, elem_bytes=2)
    fwd, fwdbwd = ANCHOR_FLOORS_MS[name]
    assert floor_ms(floor_bytes(s, "fwd"), H200_COPY_BPS) == pytest.approx(fwd, rel=1e-9)
    if fwdbwd is not None:
        assert floor_ms(floor_bytes(s, "fwdbwd"), H200_COPY_BPS) == pytest.approx(fwdbwd, rel=1e-9)


@pytest.mark.parametrize("case", [tiny(c) for c in CASES], ids=lambda c: c.name)
def test_inputs_have_the_case_layout(case):
    inp = make_inputs(case, torch.device("cpu"), torch.float32)
    assert int(inp.task_ids.unique().numel()) == case.P
    assert int(inp.task_ids.min()) >= 0 and int(inp.task_ids.max()) < case.T
    if case.packed:
        lens = inp.cu_seqlens.diff()
        assert int(inp.cu_seqlens[0]) == 0 and int(inp.cu_seqlens[-1]) == case.N and bool((lens >= 1).all())
    if inp.weights is not None:
        poly = inp.weights[..., : case.S]
        assert torch.allclose(poly.sum(-1), torch.ones(()), atol=1e-5) and bool((poly > 0).all())
    for t in inp.params():
        assert bool((t != 0).any())
