"""Parity of backend="triton" with the reference: outputs and every gradient.

Without a GPU the kernels run in the Triton interpreter on the CPU:
TRITON_INTERPRET=1 is set around each test by a fixture (the kernels are
defined at the backend's first call, under it), and unset outside them so
that the variable does not leak into other test modules.  bf16 runs in the interpreter too: Triton 3.9's interpreter gets
bf16 arithmetic wrong, but these kernels convert every load to fp32 before
any arithmetic and only convert back on store, which it does right.

Tolerance rule (`assert_close_to_fp64`): for each output and gradient,
    max|triton - fp64 reference| <= C * max|baseline - fp64 reference| + floor
where the baseline is the same math in plain PyTorch in the input dtype
(mixing, then two matmuls per example: what eager PEFT-style code computes),
and floor = 8 * eps(dtype) * max|fp64 reference|, a few roundings of the
largest value (for the checks where the baseline happens to be nearly exact,
e.g. d = 1, or a dot product whose baseline error cancels).  C = 4: the
kernels compute the same sums in fp32 in a different blocking/summation
order, so against an fp32 baseline their error is of the same order; against
fp16/bf16 baselines, whose intermediates are rounded to 16 bits, the kernels
(fp32 intermediates, one rounding on store) are more accurate.  Measured
under the interpreter over every check of this file: error / bound at most
0.37 (fp32), 0.07 (fp16), 0.09 (bf16).  A wrong index, mask, stride or
missing term gives errors of the order of the values themselves, far above
the bound (checked by mutating the kernels: each such mutation fails here).

Every buffer the op allocates is poisoned with NaN (deterministic mode with
`fill_uninitialized_memory`), so an element a kernel forgets to write fails.
"""
import pytest
import torch

import cpoly_kernels as ck
from cpoly_kernels._inputs import check_inputs, make_problem
from cpoly_kernels._backends.triton import TritonBackend  # registers backend "triton"
from problems import GRAD_NAMES, baseline_in_dtype, make_case, run

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
C = 4.0
FLOOR_EPS = 8.0

pytestmark = pytest.mark.skipif(
    TritonBackend().unavailable() is not None, reason="triton is not importable"
)


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    """The interpreter without a GPU; every torch.empty NaN-filled (deterministic
    mode with `fill_uninitialized_memory`)."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(deterministic)


def _as(case, dtype):
    """A detached copy of the case with its floating tensors in `dtype`, same requires_grad."""
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _eps(dtype):
    return torch.finfo(dtype).eps


def assert_close_to_fp64(name, got, base, want):
    assert got.shape == want.shape and got.dtype == base.dtype, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element was not written?)"
    want = want.double()
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    base_err = (base.double() - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    bound = C * base_err + FLOOR_EPS * _eps(got.dtype) * max(scale, 1e-30)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (baseline error {base_err:.3g})"


def check_parity(case, dy=None, dy_fn=None):
    """Forward and backward of triton, baseline and fp64 reference on the same case."""
    dtype = case["x"].dtype
    ref_case = _as(case, torch.float64)
    base_case = _as(case, dtype)
    out_ref, _ = run(ck.reference.cpoly_lora, ref_case)
    if dy is None:
        dy = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        dy = dy.to(DEVICE)
    if dy_fn is not None:
        dy = dy_fn(dy)
    out_ref, g_ref = run(ck.reference.cpoly_lora, ref_case, dy)
    out_base, g_base = run(baseline_in_dtype, base_case, dy.to(dtype))
    out, g = run(ck.cpoly_lora, case, dy.to(dtype), backend="triton")
    assert_close_to_fp64("output", out, out_base, out_ref)
    assert set(g) == set(g_ref)
    for k in g_ref:
        assert g[k] is not None, k
        assert g[k].shape == case[k].shape, k
        # Autograd gives None for an input that does not reach the output (no examples): zeros.
        want = torch.zeros_like(ref_case[k]) if g_ref[k] is None else g_ref[k]
        baseline = torch.zeros_like(base_case[k]) if g_base[k] is None else g_base[k]
        assert_close_to_fp64(f"grad {k}", g[k], baseline, want)


VARIANTS = {
    "poly-padded": dict(S=4),
    "mhr-q2-padded-base": dict(S=3, q=2, base=True),
    "mhr-q4-packed": dict(S=2, q=4, d_in=16, lengths=[5, 0, 9]),
    "cpoly-both-packed-skewed-base": dict(S=3, E=2, T=4, lengths=[0, 1, 300, 2, 0, 1], base=True),
    "cpoly-both-q2-padded": dict(S=2, E=1, T=3, q=2, L=7),
    "excl-only-packed": dict(S=0, E=1, T=3, lengths=[2, 6, 1]),
    "excl-only-q2-padded": dict(S=0, E=2, T=3, q=2),
    "noncontig-both-base": dict(S=3, E=1, T=2, noncontig=True, base=True, lengths=[3, 140, 0]),
    "one-token-segments": dict(S=2, E=1, lengths=[1] * 7),
    "skills-1": dict(S=1, E=1, T=1),
    "skills-2000": dict(S=2000, r=2, d_in=16, d_out=8, lengths=[4, 9]),
    "tasks-2000": dict(S=0, E=2, T=2000, r=2, d_in=6, d_out=4, lengths=[3, 0, 5]),
    "padded-multi-tile": dict(S=2, E=1, b=2, L=140, d_in=6, d_out=10),
    "noncontig-padded-q2-base": dict(S=2, E=1, q=2, L=6, noncontig=True, base=True),
    "scale-given": dict(S=2, E=1, scale=0.37),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", VARIANTS)
def test_variants_and_layouts(name, dtype):
    check_parity(make_case(**VARIANTS[name], dtype=dtype, device=DEVICE, requires_grad=True))


SHAPES = {
    "d1-to-3": dict(d_in=1, d_out=3, r=1),
    "d3-to-1": dict(d_in=3, d_out=1, r=2),
    "d127-r3": dict(d_in=127, d_out=127, r=3, lengths=[0, 70, 3]),
    "d1025-in": dict(d_in=1025, d_out=5, r=16, lengths=[3, 0, 2]),
    "d1025-out": dict(d_in=5, d_out=1025, r=17, lengths=[2, 3]),
    "r16-multi-tile": dict(d_in=24, d_out=40, r=16, lengths=[260, 1, 0, 9]),
    "r17-mhr": dict(d_in=34, d_out=18, q=2, r=17, E=1),
    "r64": dict(d_in=20, d_out=12, r=64, lengths=[70, 2]),
    "r128": dict(d_in=9, d_out=7, r=128, lengths=[3, 66]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SHAPES)
def test_awkward_shapes(name, dtype):
    kw = dict(S=2)
    kw.update(SHAPES[name])
    check_parity(make_case(**kw, dtype=dtype, device=DEVICE, requires_grad=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stride0_and_transposed_incoming_gradients(dtype):
    case = make_case(S=3, E=1, q=2, lengths=[4, 0, 150], base=True, dtype=dtype, device=DEVICE,
                     requires_grad=True)
    # out.sum().backward(): dy is a stride-0 expansion of one scalar.
    check_parity(case, dy_fn=lambda dy: torch.ones((), dtype=dy.dtype, device=dy.device).expand(dy.shape))
    check_parity(case, dy_fn=lambda dy: dy.t().contiguous().t())


@pytest.mark.parametrize("wanted", [("x",), ("lora_B",), ("lora_A",), ("weights",), ("excl_B", "x"),
                                    ("excl_weights",)])
def test_partial_gradients(wanted):
    """Only some inputs require grad: the kernels skip dx, g, dA_i or dB_i accordingly."""
    case = make_case(S=2, E=1, lengths=[5, 130], device=DEVICE)
    for k in wanted:
        case[k].requires_grad_(True)
    check_parity(case)


def test_backward_without_saved_h():
    """The backend recomputes h when the forward did not save it."""
    case = make_case(S=2, E=2, q=2, lengths=[3, 0, 140], device=DEVICE)
    p = make_problem(case["x"], case["weights"], case["lora_A"], case["lora_B"], case["task_ids"],
                     case["excl_weights"], case["excl_A"], case["excl_B"], case["cu_seqlens"], None, 0.5)
    dy = torch.randn(p.sizes.N, p.sizes.d_out, device=DEVICE)
    backend = ck._dispatch.get_backend("triton")
    needs = [True] * 7
    _, h = backend.forward(p, save_h=True)
    with_h = backend.backward(p, dy, h, needs)
    without_h = backend.backward(p, dy, None, needs)
    for a, b in zip(with_h, without_h):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_strided_int32_cu_seqlens(cu_dtype):
    """cu_seqlens as a strided view (every other element of a longer tensor), int32 or int64."""
    case = make_case(S=2, E=1, T=3, lengths=[1, 130, 0, 4], base=True, device=DEVICE, requires_grad=True)
    dense = case["cu_seqlens"].to(cu_dtype)
    strided = torch.stack([dense, torch.full_like(dense, 10**6)], 1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, dense)
    check_parity(dict(case, cu_seqlens=strided))


@pytest.mark.parametrize("lengths", [[0, 0], []], ids=["no-tokens", "no-examples"])
def test_empty_inputs(lengths):
    check_parity(make_case(S=2, E=1, lengths=lengths, base=True, device=DEVICE, requires_grad=True))


def test_forward_without_grad():
    case = make_case(S=2, lengths=[3, 9], device=DEVICE)
    with torch.no_grad():
        out = ck.cpoly_lora(case["x"], case["weights"], case["lora_A"], case["lora_B"],
                            cu_seqlens=case["cu_seqlens"], backend="triton")
    want = ck.reference.cpoly_lora(case["x"], case["weights"], case["lora_A"], case["lora_B"],
                                   cu_seqlens=case["cu_seqlens"])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_deterministic():
    case = make_case(S=3, E=1, lengths=[300, 1, 40], device=DEVICE, requires_grad=True)
    dy = torch.randn(341, 12, device=DEVICE)
    first = run(ck.cpoly_lora, case, dy, backend="triton")
    second = run(ck.cpoly_lora, case, dy, backend="triton")
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


def test_unsupported_calls_say_why(monkeypatch):
    backend = ck._dispatch.get_backend("triton")
    sizes = check_inputs(**{k: v for k, v in make_case(S=2).items()})
    dev = torch.device(DEVICE)
    assert backend.unsupported(sizes, dev, torch.float32) is None
    assert "float64" in backend.unsupported(sizes, dev, torch.float64)
    big = check_inputs(**{k: v for k, v in make_case(S=1, r=129, d_in=2, d_out=2).items()})
    assert "129" in backend.unsupported(big, dev, torch.float32)
    assert "not supported" in backend.unsupported(sizes, torch.device("meta"), torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in backend.unsupported(sizes, torch.device("cpu"), torch.float32)


def test_torch_compile_fullgraph():
    case = make_case(S=2, E=1, q=2, lengths=[2, 7], base=True, device=DEVICE, requires_grad=True)

    def step(x, weights, lora_A, lora_B, task_ids, excl_weights, excl_A, excl_B, cu_seqlens, base):
        out = ck.cpoly_lora(x, weights, lora_A, lora_B, task_ids=task_ids, excl_weights=excl_weights,
                            excl_A=excl_A, excl_B=excl_B, cu_seqlens=cu_seqlens, base=base, backend="triton")
        return (out * out).sum()

    names = ("x", "weights", "lora_A", "lora_B", "task_ids", "excl_weights", "excl_A", "excl_B", "cu_seqlens",
             "base")
    args = [case[n] for n in names]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [case[n] for n in GRAD_NAMES if case.get(n) is not None]
    got = torch.autograd.grad(compiled(*args), leaves)
    want = torch.autograd.grad(step(*args), leaves)
    for name, a, b in zip([n for n in GRAD_NAMES if case.get(n) is not None], got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_opcheck_on_the_triton_backend():
    """The custom ops' schema, fake kernels and autograd with backend "triton"."""
    from torch.library import opcheck

    c = make_case(S=2, E=1, q=2, lengths=[3, 0, 6], base=True, device=DEVICE, requires_grad=True)
    fwd_args = (c["x"], c["weights"], c["lora_A"], c["lora_B"], c["task_ids"], c["excl_weights"], c["excl_A"],
                c["excl_B"], c["cu_seqlens"], c["base"], 0.3, "triton", True)
    opcheck(torch.ops.cpoly.cpoly_lora.default, fwd_args)
    out, h = torch.ops.cpoly.cpoly_lora(*fwd_args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args[:9])
    bwd_args = (torch.randn_like(out),) + detached + (h.detach(), 0.3, "triton", [True] * 7)
    opcheck(torch.ops.cpoly.cpoly_lora_backward.default, bwd_args)


class _RecordLaunch:
    """Stands in for a Triton kernel: records the grid, launches nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
        return launch


def test_host_code_reads_no_device_data(monkeypatch):
    """Run the backend's host code on meta tensors: any .item(), .tolist(),
    bool(tensor) or data-dependent shape would raise (meta tensors have no data),
    so the op cannot synchronise with a GPU; every grid is host-known."""
    from cpoly_kernels._backends.triton import kernels, ops

    grids = []
    for kernel in ("forward_kernel", "backward_kernel", "segment_sum_kernel"):
        monkeypatch.setattr(kernels, kernel, _RecordLaunch(grids))
    case = make_case(S=3, E=1, q=2, lengths=[4, 0, 9], base=True, device="meta")
    p = make_problem(case["x"], case["weights"], case["lora_A"], case["lora_B"], case["task_ids"],
                     case["excl_weights"], case["excl_A"], case["excl_B"], case["cu_seqlens"], case["base"], 0.5)
    out, h = ops.forward(p, save_h=True)
    grads = ops.backward(p, torch.empty(p.sizes.N, p.sizes.d_out, device="meta"), None, [True] * 7)
    assert out.shape == (13, 12) and h.shape == (13, 3)
    assert [g.shape for g in grads] == [case[n].shape for n in GRAD_NAMES[:-1]]
    assert len(grids) == 4 and all(isinstance(d, int) for grid in grids for d in grid)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_cuda_graph_capture_and_no_sync():
    case = make_case(S=3, E=1, q=2, lengths=[5, 0, 200, 1], base=True, device="cuda", requires_grad=True)
    dy = torch.randn(206, 12, device="cuda")
    want_out, want_grads = run(ck.cpoly_lora, case, dy, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(ck.cpoly_lora, case, dy, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(ck.cpoly_lora, case, dy, backend="triton")  # warm-up outside capture
        with torch.cuda.graph(graph, stream=stream):
            out, grads = run(ck.cpoly_lora, case, dy, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for k in want_grads:
        torch.testing.assert_close(grads[k], want_grads[k], rtol=0, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_int64_offsets():
    """N * d_out > 2**31 elements (OP_SPEC §4: int32 offsets overflow there): the
    last rows of the output and of dx must still be right."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB of memory")
    N, d_in, d_out, r = 33_000, 8, 65_537, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, d_in, generator=gen).to("cuda", torch.float16).requires_grad_(True)
    A = torch.randn(1, 1, d_in, r, generator=gen).to("cuda", torch.float16)
    B = torch.randn(1, 1, r, d_out, generator=gen).to("cuda", torch.float16)
    w = torch.ones(2, 1, 1, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, N - 3, N], device="cuda")
    out = ck.cpoly_lora(x, w, A, B, cu_seqlens=cu, backend="triton")
    dy = torch.zeros_like(out)
    dy[-3:] = torch.randn(3, d_out, generator=gen).to("cuda", torch.float16)
    (dx,) = torch.autograd.grad(out, [x], dy)
    tail_x = x[-3:].detach().requires_grad_(True)
    tail = ck.reference.cpoly_lora(tail_x, w[1:], A, B, cu_seqlens=torch.tensor([0, 3], device="cuda"))
    (tail_dx,) = torch.autograd.grad(tail, [tail_x], dy[-3:])
    torch.testing.assert_close(out[-3:], tail, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dx[-3:], tail_dx, rtol=2e-3, atol=2e-3)
