"""The CUDA backend (csrc/ + cpoly_kernels/_backends/cuda.py).

On any machine where the extension is built (CI builds it without a GPU):
its info functions, launch-shape planning and argument checks, the backend's
reasons for not running, the build script's option parsing, and the kernels'
device code run on the CPU by csrc/testing/cpu_emulation.cpp (built with g++)
through the whole op, forward and backward.  With a CUDA GPU: parity of every
output and gradient with the float64 reference, NaN-poisoned outputs,
determinism, CUDA-graph capture and int64 offsets.

Tolerance rule: the kernel's max error against float64 must be within 3x the
error of the same computation done in plain PyTorch in the input dtype, plus
one epsilon of the largest reference value.
"""
import contextlib
import ctypes
import importlib.util
import math
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

import cpoly_kernels as ck
from cpoly_kernels import reference
from cpoly_kernels._dispatch import get_backend, resolve_backend
from cpoly_kernels._inputs import Sizes, make_problem
from cpoly_kernels._backends import cuda as cuda_backend
from problems import baseline_in_dtype

C = cuda_backend._C
BACKEND = get_backend("cuda")
UNAVAILABLE = BACKEND.unavailable()

needs_ext = pytest.mark.skipif(C is None, reason=f"cpoly_kernels._C is not built: {cuda_backend._IMPORT_ERROR}")


def _gpu_reason():
    if UNAVAILABLE is not None:
        return UNAVAILABLE
    return BACKEND.unsupported(Sizes(1, 1, None, 8, 8, 1, 1, 1, 0, 0), torch.device("cuda"), torch.float32)


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a CUDA GPU for the cuda backend: {GPU_REASON}")

SIZES = Sizes(b=2, N=10, L=5, d_in=16, d_out=8, q=1, r=4, S=3, E=0, T=0)


# ---- CPU: the extension's planning and argument checks ----


@needs_ext
def test_extension_info():
    archs = C.compiled_archs()
    assert archs and all(isinstance(a, int) and a > 0 for a in archs), archs
    assert C.cuda_runtime_version() >= 11000
    assert isinstance(C.device_status(0), str)


@needs_ext
def test_padded_rank():
    chunk = C.rank_chunk()
    for r in range(1, 140):
        rp = C.padded_rank(r)
        assert rp % chunk == 0 and r <= rp < r + chunk, (r, rp)


@needs_ext
def test_launch_shapes():
    N, d, r, b = 16384, 4096, 16, 16
    blocks, threads = C.launch_shape("project_down", "float16", N, d, r, b)
    assert (blocks, threads) == (N // 32 * 2, 256)
    assert C.launch_shape("project_up", "float16", N, d, r, b) == (N // 32 * (d // 256), 256)
    assert C.launch_shape("project_up", "float32", N, d, r, b) == (N // 32 * (d // 128), 256)
    assert C.launch_shape("segment_outer", "bfloat16", N, d, r, b) == (b * (d // 64) * 2, 256)
    # Odd sizes round up; nothing is launched for no rows or no segments.
    assert C.launch_shape("project_down", "float32", 33, 1025, 17, 3)[0] == 2 * 3
    assert C.launch_shape("project_up", "float32", 33, 1025, 17, 3)[0] == 2 * 9
    assert C.launch_shape("segment_outer", "float32", 33, 1025, 17, 3)[0] == 3 * 33 * 3
    assert C.launch_shape("project_down", "float32", 0, 8, 4, 2)[0] == 0
    assert C.launch_shape("project_up", "float32", 0, 8, 4, 2)[0] == 0
    assert C.launch_shape("segment_outer", "float32", 0, 8, 4, 0)[0] == 0
    # Segments are zero-filled by segment_outer even without rows.
    assert C.launch_shape("segment_outer", "float32", 0, 8, 4, 2)[0] == 2


@needs_ext
def test_launch_shape_errors():
    with pytest.raises(ValueError, match="launch_shape: kernel: expected"):
        C.launch_shape("bogus", "float32", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="project_down: dtype: expected .* got 'float64'"):
        C.launch_shape("project_down", "float64", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="project_up: .*more than a CUDA grid holds"):
        C.launch_shape("project_up", "float16", 2**40, 4096, 8, 1)
    with pytest.raises(ValueError, match="segment_outer: r: expected >= 1, got 0"):
        C.launch_shape("segment_outer", "float16", 8, 8, 0, 1)
    with pytest.raises(ValueError, match="project_down: b: expected >= 1 segments"):
        C.launch_shape("project_down", "float16", 8, 8, 4, 0)


ADDR = 4096  # a 16-byte aligned stand-in for a device address
CALLS = {
    "project_down": dict(dtype="float32", x=ADDR, w=ADDR, cu=ADDR, y=ADDR),
    "project_up": dict(dtype="float16", v=ADDR, w=ADDR, cu=ADDR, base=0, y=ADDR),
    "segment_outer": dict(dtype="bfloat16", x=ADDR, v=ADDR, cu=ADDR, g=ADDR),
}


def call(kernel, **changes):
    """C.<kernel> with valid-looking arguments (4 rows, d 8, r 2, 1 segment) but for `changes`."""
    args = dict(CALLS[kernel], N=4, d=8, r=2, b=1, alpha=1.0, device=0, stream=0)
    return getattr(C, kernel)(**{**args, **changes})


@needs_ext
@pytest.mark.parametrize(
    "kernel, changes, match",
    [
        ("project_down", dict(x=0), "x: expected a device address, got 0"),
        ("project_down", dict(w=ADDR + 4), "w: expected a 16-byte aligned address"),
        ("project_down", dict(N=-1), "N: expected >= 0, got -1"),
        ("project_up", dict(dtype="half"), "dtype: expected 'float32', 'float16' or 'bfloat16', got 'half'"),
        ("project_up", dict(cu=ADDR + 4), "cu: expected a 8-byte aligned address"),
        ("project_up", dict(d=0), "d: expected >= 1, got 0"),
        ("segment_outer", dict(g=0), "g: expected a device address"),
        ("segment_outer", dict(v=ADDR + 2), "v: expected a 4-byte aligned address"),
        ("segment_outer", dict(device=-1), "device: expected a CUDA device index >= 0, got -1"),
    ],
)
def test_argument_checks(kernel, changes, match):
    with pytest.raises(ValueError, match=f"cpoly_kernels._C.{kernel}: {match}"):
        call(kernel, **changes)


@needs_ext
def test_empty_launches_touch_nothing():
    # No rows (and for segment_outer no segments): nothing is launched, the null addresses are not looked at.
    call("project_down", x=0, w=0, cu=0, y=0, N=0)
    call("project_up", v=0, w=0, cu=0, y=0, N=0)
    call("segment_outer", x=0, v=0, cu=0, g=0, N=0, b=0)


@needs_ext
@pytest.mark.skipif(C is not None and C.device_status(0) == "", reason="a CUDA device is present: launches would run")
@pytest.mark.parametrize("kernel", sorted(CALLS))
def test_launch_without_device_raises(kernel):
    with pytest.raises(RuntimeError, match=f"cpoly_kernels._C.{kernel}: CUDA error"):
        call(kernel)


# ---- CPU: the backend's reasons and dispatch ----


def test_backend_registered():
    assert BACKEND.name == "cuda" and BACKEND.saves_h
    assert ck.backends()["cuda"]["reason"] != "not registered"


def test_unavailable_without_extension(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_C", None)
    monkeypatch.setattr(cuda_backend, "_IMPORT_ERROR", "ImportError: no module named 'cpoly_kernels._C'")
    assert BACKEND.unavailable() == (
        "extension cpoly_kernels._C not built or not importable (ImportError: no module named 'cpoly_kernels._C')"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_unavailable_without_gpu():
    reason = BACKEND.unavailable()
    assert reason is not None and ("no CUDA device" in reason or "not built" in reason)
    assert resolve_backend("auto", SIZES, torch.device("cpu"), torch.float32) != "cuda"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        resolve_backend("cuda", SIZES, torch.device("cpu"), torch.float32)


def test_unsupported_reasons():
    assert "needs CUDA tensors" in BACKEND.unsupported(SIZES, torch.device("cpu"), torch.float32)
    reason = BACKEND.unsupported(SIZES, torch.device("cuda", 0), torch.float64)
    assert "dtype torch.float64 is not supported" in reason


# ---- CPU: the build script ----


def _load_setup():
    path = Path(__file__).resolve().parents[1] / "setup.py"
    if not path.is_file():
        pytest.skip(f"no setup.py at {path} (tests run outside the source tree)")
    spec = importlib.util.spec_from_file_location("cpoly_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_cuda_archs():
    setup = _load_setup()
    assert setup.cmake_archs(setup.DEFAULT_ARCHS) == "80-real;90"
    assert setup.cmake_archs("90") == "90"
    assert setup.cmake_archs("sm_90a; 8.0 80") == "80-real;90a"
    for bad in ("", "ninety", "80,x"):
        with pytest.raises(ValueError, match="CPOLY_CUDA_ARCHS"):
            setup.cmake_archs(bad)


def test_setup_build_mode(monkeypatch):
    setup = _load_setup()
    for value, mode in (("0", "skip"), ("1", "force")):
        monkeypatch.setenv("CPOLY_BUILD_CUDA", value)
        assert setup.build_mode() == mode
    monkeypatch.delenv("CPOLY_BUILD_CUDA")
    assert setup.build_mode() == "auto"
    monkeypatch.setenv("CPOLY_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="CPOLY_BUILD_CUDA"):
        setup.build_mode()


def test_setup_extensions(monkeypatch, tmp_path):
    setup = _load_setup()
    monkeypatch.setattr(setup, "find_nvcc", lambda: None)
    monkeypatch.setenv("CPOLY_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="CPOLY_BUILD_CUDA=1: nvcc not found"):
        setup.extensions()
    monkeypatch.delenv("CPOLY_BUILD_CUDA")
    assert setup.extensions() == []
    monkeypatch.setattr(setup, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setenv("CPOLY_BUILD_CUDA", "0")
    assert setup.extensions() == []
    monkeypatch.delenv("CPOLY_BUILD_CUDA")
    [ext] = setup.extensions()
    assert (ext.name, ext.nvcc) == ("cpoly_kernels._C", "/opt/cuda/bin/nvcc")


def test_setup_find_nvcc(monkeypatch, tmp_path):
    setup = _load_setup()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup.find_nvcc() == str(nvcc)


# ---- GPU: parity with the reference (the emulated tests below reuse these helpers) ----

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LENGTHS = {"packed": [4, 0, 1, 9, 0, 3], "skewed": [90, 1, 0, 1, 1, 0]}

# (variant, layout, d_in, d_out, r)
CASES = [
    ("shared", "padded", 64, 48, 16),
    ("excl", "packed", 96, 40, 2),
    ("both", "packed", 1025, 131, 3),
    ("mhr", "padded", 128, 96, 17),
    ("both", "skewed", 256, 200, 64),
    ("shared", "packed", 40, 24, 1),
    ("mhr", "skewed", 130, 34, 16),
    ("both", "padded", 72, 2049, 128),
]


def make_inputs(variant, layout, dtype, d_in, d_out, r, *, base=False, seed=0, device="cuda"):
    """Keyword arguments of `cpoly_lora` for one case (float tensors in `dtype`)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    q = 2 if variant == "mhr" else 1
    S = 3 if variant != "excl" else 0
    E, T = (2, 4) if variant != "shared" else (0, 0)
    if layout == "padded":
        b, L = 3, 13  # 39 rows: segments start inside 32-row tiles
        x, cu, lead = randn(b, L, d_in), None, (b, L)
    else:
        lengths = LENGTHS[layout]
        b, N = len(lengths), sum(lengths)
        offsets = torch.tensor([0] + lengths).cumsum(0)
        cu = offsets.to(device=device, dtype=torch.int32 if layout == "packed" else torch.int64)
        x, lead = randn(N, d_in), (N,)
    kw = dict(x=x, weights=None, lora_A=None, lora_B=None, scale=1.0 / math.sqrt(r), cu_seqlens=cu)
    if S:
        kw.update(
            weights=torch.rand(b, q, S, generator=gen).to(device=device, dtype=dtype),
            lora_A=randn(q, S, d_in // q, r, std=0.5),
            lora_B=randn(q, S, r, d_out // q, std=0.5),
        )
    if E:
        kw.update(
            task_ids=torch.randint(0, T, (b,), generator=gen).to(device),
            excl_weights=torch.rand(b, q, E, generator=gen).to(device=device, dtype=dtype),
            excl_A=randn(T, q, E, d_in // q, r, std=0.5),
            excl_B=randn(T, q, E, r, d_out // q, std=0.5),
        )
    if base:
        kw["base"] = randn(*lead, d_out)
    return kw


GRAD_NAMES = ("x", "weights", "lora_A", "lora_B", "excl_weights", "excl_A", "excl_B")


def _with_grads(kw, dtype=None):
    """A copy of kw whose float tensors are fresh leaves (cast to dtype) requiring grad."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype or v.dtype)
            if k in GRAD_NAMES:
                v.requires_grad_(True)
        out[k] = v
    return out


def assert_close(name, got, ref64, plain):
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    plain_err = (plain.double() - ref64).abs().max().item() if got.numel() else 0.0
    floor = torch.finfo(got.dtype).eps * (ref64.abs().max().item() if got.numel() else 0.0)
    tol = 3 * plain_err + floor
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (plain PyTorch in {got.dtype}: {plain_err:.3g})"


@pytest.fixture
def poison():
    """torch.empty returns NaN-filled memory, so an output element the kernels skip shows up."""
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(was, warn_only=was_warn)


def check_parity(kw, dy_fn=None):
    """Output and every gradient of backend="cuda" against float64, by the tolerance rule."""
    leaves = _with_grads(kw)
    out = ck.cpoly_lora(**leaves, backend="cuda")
    if dy_fn is None:
        gen = torch.Generator().manual_seed(1)
        dy = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    else:
        dy = dy_fn(out)
    out.backward(dy)

    ref_in = _with_grads(kw, torch.float64)
    ref = reference.cpoly_lora(**ref_in)
    ref.backward(dy.double())
    plain_in = _with_grads(kw)
    plain = baseline_in_dtype(**plain_in)
    plain.backward(dy)

    assert out.dtype == kw["x"].dtype and out.shape == ref.shape
    assert_close("out", out, ref, plain)
    for name in GRAD_NAMES:
        if leaves.get(name) is not None:
            got = leaves[name].grad
            assert got is not None and got.dtype == kw[name].dtype and got.shape == kw[name].shape, name
            assert_close(f"grad {name}", got, ref_in[name].grad, plain_in[name].grad)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_parity(case, dtype, poison):
    check_parity(make_inputs(*case[:2], dtype, *case[2:]))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["padded", "skewed"])
def test_parity_with_base(layout, dtype, poison):
    check_parity(make_inputs("both", layout, dtype, 200, 136, 8, base=True))


@needs_gpu
def test_views_and_stride0_grad(poison):
    kw = make_inputs("both", "packed", torch.float16, 64, 40, 8)
    kw["x"] = kw["x"].t().contiguous().t()  # transposed view
    kw["lora_A"] = kw["lora_A"].transpose(2, 3).contiguous().transpose(2, 3)
    check_parity(kw, dy_fn=lambda out: torch.ones(1, dtype=out.dtype, device=out.device).expand(out.shape))


def check_no_tokens(device):
    kw = make_inputs("both", "packed", torch.float32, 16, 8, 4, device=device)
    kw["x"] = kw["x"][:0]
    kw["cu_seqlens"] = torch.zeros_like(kw["cu_seqlens"])
    leaves = _with_grads(kw)
    out = ck.cpoly_lora(**leaves, backend="cuda")
    out.sum().backward()
    assert out.shape == (0, 8)
    for name in ("lora_A", "lora_B", "excl_A", "excl_B", "weights", "excl_weights"):
        assert torch.equal(leaves[name].grad, torch.zeros_like(leaves[name])), name


@needs_gpu
def test_no_tokens(poison):
    check_no_tokens("cuda")


@needs_gpu
def test_deterministic():
    kw = make_inputs("mhr", "skewed", torch.bfloat16, 256, 130, 16)
    results = []
    for _ in range(2):
        leaves = _with_grads(kw)
        out = ck.cpoly_lora(**leaves, backend="cuda")
        out.backward(torch.ones_like(out))
        results.append([out] + [leaves[n].grad for n in GRAD_NAMES if leaves.get(n) is not None])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_gpu
def test_cuda_graph_capture():
    kw = make_inputs("both", "skewed", torch.float16, 128, 72, 8, base=True)
    p = make_problem(kw["x"], kw["weights"], kw["lora_A"], kw["lora_B"], kw["task_ids"], kw["excl_weights"],
                     kw["excl_A"], kw["excl_B"], kw["cu_seqlens"], kw["base"], kw["scale"])
    dy = torch.randn(p.sizes.N, p.sizes.d_out, device="cuda", dtype=torch.float16)
    needs = [True] * 7

    def step():
        out, h = BACKEND.forward(p, True)
        return (out,) + BACKEND.backward(p, dy, h, needs)

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    # Not bitwise: the torch mixing around the kernels may pick other cuBLAS algorithms when captured.
    for a, b in zip(expected, captured):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=1e-3)


@needs_gpu
def test_int64_offsets():
    """N * d_out > 2**31 elements: the last rows must still be right."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB of memory")
    N, d_in, d_out, r = 33_000, 8, 65_537, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, d_in, generator=gen).to("cuda", torch.float16)
    A = torch.randn(1, 1, d_in, r, generator=gen).to("cuda", torch.float16)
    B = torch.randn(1, 1, r, d_out, generator=gen).to("cuda", torch.float16)
    w = torch.ones(2, 1, 1, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, N - 3, N], device="cuda")
    out = ck.cpoly_lora(x, w, A, B, cu_seqlens=cu, backend="cuda")
    tail = ck.reference.cpoly_lora(x[-3:], w[1:], A, B, cu_seqlens=torch.tensor([0, 3], device="cuda"))
    torch.testing.assert_close(out[-3:], tail, rtol=2e-3, atol=2e-3)
    del out


@needs_gpu
def test_auto_picks_cuda():
    assert resolve_backend("auto", SIZES, torch.device("cuda", 0), torch.float16) == "cuda"


# ---- CPU: the device code, emulated ----

EMULATOR = Path(__file__).resolve().parents[1] / "csrc" / "testing" / "cpu_emulation.cpp"
EMU_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _cuda_include():
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator's shared library, built with g++ against the CUDA headers."""
    if C is None:
        pytest.skip(f"launch shapes come from cpoly_kernels._C, which is not built: {cuda_backend._IMPORT_ERROR}")
    if not EMULATOR.is_file():
        pytest.skip(f"no {EMULATOR} (tests run outside the source tree)")
    cxx, include = shutil.which("g++"), _cuda_include()
    if cxx is None or include is None:
        pytest.skip(f"needs g++ and the CUDA headers (g++: {cxx}, cuda_fp16.h in: {include})")
    lib = tmp_path_factory.mktemp("emulator") / "libcpoly_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", f"-I{include}", str(EMULATOR), "-o", str(lib),
           "-lpthread"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"building the emulator failed: {' '.join(cmd)}\n{done.stderr}")
    return ctypes.CDLL(str(lib))


class EmulatedC:
    """Stands in for cpoly_kernels._C: its launch shapes, the device code run on the CPU."""

    padded_rank = staticmethod(lambda r: C.padded_rank(r))

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _args(*values):
        return [ctypes.c_float(v) if isinstance(v, float) else ctypes.c_int64(v) for v in values]

    def project_down(self, dtype, x, w, cu, y, N, d, r, b, alpha, device, stream):
        blocks = C.launch_shape("project_down", dtype, N, d, r, b)[0]
        if blocks:
            self.lib.emu_project_down(
                EMU_DTYPES[dtype], *map(ctypes.c_void_p, (x, w, cu, y)),
                *self._args(N, d, r, C.padded_rank(r), b, float(alpha), blocks),
            )

    def project_up(self, dtype, v, w, cu, base, y, N, d, r, b, alpha, device, stream):
        blocks = C.launch_shape("project_up", dtype, N, d, r, b)[0]
        if blocks:
            self.lib.emu_project_up(
                EMU_DTYPES[dtype], *map(ctypes.c_void_p, (v, w, cu, base, y)),
                *self._args(N, d, r, b, float(alpha), blocks),
            )

    def segment_outer(self, dtype, x, v, cu, g, N, d, r, b, alpha, device, stream):
        blocks = C.launch_shape("segment_outer", dtype, N, d, r, b)[0]
        if blocks:
            self.lib.emu_segment_outer(
                EMU_DTYPES[dtype], *map(ctypes.c_void_p, (x, v, cu, g)),
                *self._args(N, d, r, float(alpha), blocks),
            )


@pytest.fixture
def emulated(emulator, monkeypatch, poison):
    """backend="cuda" runs on CPU tensors, its kernels in the emulator, outputs NaN-poisoned."""
    monkeypatch.setattr(cuda_backend, "_C", EmulatedC(emulator))
    monkeypatch.setattr(cuda_backend.CudaBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(cuda_backend.CudaBackend, "unsupported", lambda self, sizes, device, dtype: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))


def _misaligned(t):
    """The same values at an address one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


# (variant, layout, dtype, d_in, d_out, r, base): several row tiles and rank
# chunks, empty and skewed segments, odd widths (scalar loads), 16-byte loads.
EMULATED_CASES = [
    ("both", "skewed", torch.float32, 40, 24, 9, False),
    ("mhr", "packed", torch.float16, 34, 18, 3, False),
    ("shared", "padded", torch.bfloat16, 64, 48, 16, True),
    ("excl", "packed", torch.float16, 48, 300, 33, False),  # ranks staged twice, two column blocks
]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_emulated_parity(case, emulated):
    variant, layout, dtype, d_in, d_out, r, base = case
    check_parity(make_inputs(variant, layout, dtype, d_in, d_out, r, base=base, device="cpu"))


def test_emulated_misaligned(emulated):
    kw = make_inputs("excl", "packed", torch.float16, 64, 40, 8, base=True, device="cpu")
    kw["x"], kw["base"] = _misaligned(kw["x"]), _misaligned(kw["base"])
    assert kw["x"].data_ptr() % 16 and kw["base"].data_ptr() % 16
    check_parity(kw)


def test_emulated_no_tokens(emulated):
    check_no_tokens("cpu")


@pytest.mark.parametrize("wanted", [("x",), ("lora_B",), ("weights", "excl_A")])
def test_emulated_some_grads(wanted, emulated):
    """Only the wanted gradients are computed (the others stay None), and they are right."""
    kw = make_inputs("both", "packed", torch.float32, 24, 16, 4, device="cpu")

    def leaves(dtype):
        return {k: v.detach().to(dtype).requires_grad_(k in wanted)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}

    got, ref = leaves(torch.float32), leaves(torch.float64)
    out = ck.cpoly_lora(**got, backend="cuda")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(dy)
    reference.cpoly_lora(**ref).backward(dy.double())
    for name in GRAD_NAMES:
        if name in wanted:
            torch.testing.assert_close(got[name].grad.double(), ref[name].grad, rtol=1e-5, atol=1e-6)
        else:
            assert got[name].grad is None, name
