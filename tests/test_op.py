"""The public op: dispatch, custom-op registration (opcheck), torch.compile
with fullgraph, autocast, stride-0 gradients, empty inputs."""
import pytest
import torch
from torch.library import opcheck

import cpoly_kernels as ck
from cpoly_kernels._dispatch import resolve_backend
from problems import GRAD_NAMES, make_case, run, split_args

CASES = {
    "cpoly-padded": dict(S=3, E=2, T=4, q=2, base=True),
    "poly-packed-empty": dict(S=4, lengths=[3, 0, 5, 1]),
    "excl-only-packed": dict(S=0, E=1, T=3, lengths=[2, 6]),
}


def _clone(case):
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in case.items()}


def _assert_same(got, want, grads_got, grads_want, **tol):
    torch.testing.assert_close(got, want, **tol)
    assert set(grads_got) == set(grads_want)
    for k in grads_want:
        torch.testing.assert_close(grads_got[k], grads_want[k], msg=lambda m: f"grad {k}: {m}", **tol)


def test_backends_report_says_why():
    report = ck.backends()
    assert set(report) == {"cuda", "triton", "reference"}
    assert report["reference"] == {"available": True, "reason": None}
    for name, entry in report.items():
        assert entry["available"] == (entry["reason"] is None), name


def test_auto_is_reference_for_cpu_tensors():
    case = make_case()
    from cpoly_kernels._inputs import check_inputs
    args, kwargs = split_args(case)
    sizes = check_inputs(*args, **{k: v for k, v in kwargs.items()})
    assert resolve_backend("auto", sizes, torch.device("cpu"), torch.float32) == "reference"


def test_environment_variable_and_explicit_choice(monkeypatch):
    case = make_case(S=2, E=1)
    args, kwargs = split_args(case)
    monkeypatch.setenv("CPOLY_BACKEND", "reference")
    want = ck.reference.cpoly_lora(*args, **kwargs)
    torch.testing.assert_close(ck.cpoly_lora(*args, **kwargs), want, rtol=0, atol=0)
    monkeypatch.setenv("CPOLY_BACKEND", "cuda")  # cannot run CPU tensors
    with pytest.raises(RuntimeError, match="CPOLY_BACKEND: backend 'cuda'"):
        ck.cpoly_lora(*args, **kwargs)
    # An explicit per-call choice wins over the environment.
    torch.testing.assert_close(ck.cpoly_lora(*args, **kwargs, backend="reference"), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_opcheck_forward_and_backward(name):
    case = make_case(**CASES[name], requires_grad=True)
    c = case
    fwd_args = (c["x"], c["weights"], c["lora_A"], c["lora_B"], c.get("task_ids"), c.get("excl_weights"),
                c.get("excl_A"), c.get("excl_B"), c["cu_seqlens"], c.get("base"), 0.37, "reference", True)
    opcheck(torch.ops.cpoly.cpoly_lora.default, fwd_args)
    out, _ = torch.ops.cpoly.cpoly_lora(*fwd_args)
    dy = torch.randn_like(out)
    needs = [c.get(n) is not None for n in GRAD_NAMES if n != "base"]
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args[:9])
    bwd_args = (dy,) + detached + (torch.empty(0), 0.37, "reference", needs)
    opcheck(torch.ops.cpoly.cpoly_lora_backward.default, bwd_args)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_compile_fullgraph_forward_and_backward(name, dynamic):
    torch._dynamo.reset()
    case = make_case(**CASES[name], requires_grad=True, seed=2)
    want_case = _clone(case)
    dy = torch.randn_like(run(ck.reference.cpoly_lora, want_case)[0])
    want, want_grads = run(ck.reference.cpoly_lora, want_case, dy)
    compiled = torch.compile(ck.cpoly_lora, fullgraph=True, dynamic=dynamic)
    got, got_grads = run(compiled, case, dy)
    _assert_same(got, want, got_grads, want_grads)


def test_compile_inside_a_model_with_env_backend(monkeypatch):
    """A module that builds its weights in the graph, compiled fullgraph, with
    the backend chosen by the environment variable."""
    torch._dynamo.reset()
    monkeypatch.setenv("CPOLY_BACKEND", "reference")
    case = make_case(S=3, E=1, T=4, q=2, requires_grad=True)
    logits = torch.randn(4, 2 * 3, requires_grad=True)

    def step(x, task_ids):
        w = torch.sigmoid(logits[task_ids]).view(-1, 2, 3)
        w = w / (w.sum(-1, keepdim=True) + 1e-12)
        y = ck.cpoly_lora(x, w, case["lora_A"], case["lora_B"], task_ids=task_ids,
                          excl_weights=case["excl_weights"], excl_A=case["excl_A"], excl_B=case["excl_B"])
        return (y * y).mean()

    loss_c = torch.compile(step, fullgraph=True)(case["x"], case["task_ids"])
    grads_c = torch.autograd.grad(loss_c, [logits, case["lora_A"], case["excl_B"]])
    loss_e = step(case["x"], case["task_ids"])
    grads_e = torch.autograd.grad(loss_e, [logits, case["lora_A"], case["excl_B"]])
    torch.testing.assert_close(loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e)


def test_stride_zero_gradient_and_views():
    """`.sum().backward()` gives a stride-0 gradient; inputs are transposed views."""
    case = make_case(S=3, E=1, T=3, q=2, base=True, noncontig=True, requires_grad=True, lengths=[4, 1, 0, 3])
    want_case = _clone(case)
    args, kwargs = split_args(case)
    ck.cpoly_lora(*args, **kwargs).sum().backward()
    dy = torch.ones(8, 12)
    _, want_grads = run(ck.reference.cpoly_lora, want_case, dy)
    for name, g in want_grads.items():
        torch.testing.assert_close(case[name].grad, g, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    case = make_case(S=3, E=1, T=3, requires_grad=True)
    args, kwargs = split_args(case)
    with torch.autocast("cpu", dtype=dtype):
        out = ck.cpoly_lora(*args, **kwargs)
    assert out.dtype == dtype
    cast = {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}
    cargs, ckwargs = split_args(cast)
    torch.testing.assert_close(out, ck.reference.cpoly_lora(*cargs, **ckwargs), rtol=0, atol=0)
    out.float().sum().backward()
    for name in ("x", "lora_A", "excl_B", "weights"):
        assert case[name].grad is not None and case[name].grad.dtype == torch.float32, name
        assert case[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", [
    dict(b=0, L=4),
    dict(b=2, L=0),
    dict(lengths=[0, 0]),
    dict(lengths=[]),
], ids=["no-examples", "no-tokens", "empty-segments", "no-segments"])
def test_empty_inputs(spec):
    case = make_case(S=2, E=1, T=3, base=True, requires_grad=True, **spec)
    out, _ = run(ck.cpoly_lora, case, None)
    want, _ = run(ck.reference.cpoly_lora, case)
    assert out.shape == want.shape and out.numel() == 0
    dy = torch.randn_like(out)
    _, grads = run(ck.cpoly_lora, case, dy)
    for name, g in grads.items():
        assert g.shape == case[name].shape
        if name != "x" and name != "base":
            assert torch.count_nonzero(g) == 0, name


def test_double_backward_says_it_is_unsupported():
    case = make_case(S=2, E=1, requires_grad=True)
    args, kwargs = split_args(case)
    (gx,) = torch.autograd.grad(ck.cpoly_lora(*args, **kwargs).sum(), [case["x"]], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()
