"""The reference op against an independent, naive float64 loop (OP_SPEC §2),
for every variant and layout, outputs and every gradient; gradcheck of the
reference and of the public op's reference backend (its backward is written
out, not autograd)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import cpoly_kernels as ck
from problems import GRAD_NAMES, make_case, run

# (name, make_case arguments): every variant of the OP_SPEC §2 table and layout.
VARIANTS = {
    "poly": dict(S=4, E=0, q=1),
    "mhr": dict(S=3, E=0, q=2, d_in=8, d_out=6),
    "mhr-q4": dict(S=2, E=0, q=4, d_in=8, d_out=12),
    "gathered-only": dict(S=0, E=1, T=4),
    "cpoly": dict(S=3, E=2, T=4),
    "cpoly-mhr": dict(S=2, E=1, T=3, q=2),
    "premixed-serving": dict(S=0, E=1, T=6, L=1, b=5),
}
LAYOUTS = {
    "padded": dict(),
    "packed": dict(lengths=[4, 0, 1, 6, 0]),
    "packed-skewed": dict(lengths=[1, 13, 1, 1]),
    "single-token": dict(L=1),
}


def naive_cpoly(case: dict) -> torch.Tensor:
    """OP_SPEC §2 spelled out with loops over examples, splits and skills, in float64."""
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    x = f64["x"]
    packed = f64["cu_seqlens"] is not None
    if packed:
        cu = f64["cu_seqlens"].tolist()
        xs = [x[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]
    else:
        xs = list(x.unbind(0))
    A, B, W = f64["lora_A"], f64["lora_B"], f64["weights"]
    Ae, Be, We = f64["excl_A"] if "excl_A" in f64 else None, f64.get("excl_B"), f64.get("excl_weights")
    bank = A if A is not None else Ae[0]
    q, r = bank.shape[0], bank.shape[-1]
    scale = 1.0 / r if f64["scale"] is None else f64["scale"]
    outs = []
    for i, xi in enumerate(xs):
        a_blocks, b_blocks = [], []
        for k in range(q):
            a = 0.0
            bb = 0.0
            if A is not None:
                for s in range(A.shape[1]):
                    a = a + W[i, k, s] * A[k, s]
                    bb = bb + W[i, k, s] * B[k, s]
            if Ae is not None:
                t = int(f64["task_ids"][i])
                for e in range(Ae.shape[2]):
                    a = a + We[i, k, e] * Ae[t, k, e]
                    bb = bb + We[i, k, e] * Be[t, k, e]
            a_blocks.append(a)
            b_blocks.append(bb)
        A_i = torch.cat(a_blocks, dim=0)  # d_in x r: blocks stacked along d_in
        B_i = torch.cat(b_blocks, dim=1)  # r x d_out: blocks side by side
        outs.append(scale * (xi @ A_i) @ B_i)
    d_out = q * (B if B is not None else Be).shape[-1]
    if not outs:
        out = x.new_zeros(x.shape[:-1] + (d_out,))
    else:
        out = torch.cat(outs, 0) if packed else torch.stack(outs, 0)
    if f64.get("base") is not None:
        out = out + f64["base"]
    return out


def _grads_close(got: dict, want: dict, **tol):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], msg=lambda m: f"grad {name}: {m}", **tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_base", [False, True])
def test_reference_matches_naive_loop(variant, layout, with_base):
    spec = dict(VARIANTS[variant], **LAYOUTS[layout])
    case = make_case(**spec, base=with_base, dtype=torch.float64, requires_grad=True, seed=3)
    want_case = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                 for k, v in case.items()}
    out, _ = run(ck.reference.cpoly_lora, case)
    want = naive_cpoly(want_case)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(want)
    _, grads = run(ck.reference.cpoly_lora, case, dy)
    leaves = [n for n in GRAD_NAMES if want_case.get(n) is not None]
    want_grads = dict(zip(leaves, torch.autograd.grad(want, [want_case[n] for n in leaves], dy)))
    _grads_close(grads, want_grads, rtol=1e-10, atol=1e-12)
    # The public op on the reference backend: same forward, backward written out.
    out_op, grads_op = run(ck.cpoly_lora, case, dy, backend="reference")
    torch.testing.assert_close(out_op, want, rtol=1e-12, atol=1e-12)
    _grads_close(grads_op, want_grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["cpoly", "cpoly-mhr", "poly"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("fn", ["reference", "op"])
def test_gradcheck_every_input(variant, layout, fn):
    spec = dict(VARIANTS[variant], **LAYOUTS[layout])
    case = make_case(**spec, base=True, dtype=torch.float64, requires_grad=True, seed=5, scale=0.7)
    names = [n for n in GRAD_NAMES if case.get(n) is not None]
    call = ck.reference.cpoly_lora if fn == "reference" else ck.cpoly_lora

    def f(*tensors):
        c = dict(case, **dict(zip(names, tensors)))
        return run(call, c)[0]

    assert torch.autograd.gradcheck(f, [case[n] for n in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computes_in_fp32(dtype):
    """fp16/bf16 inputs: the result is the (float32) exact value rounded once to
    the dtype, so within half an ulp of the float64 value plus float32 noise;
    computing in the input dtype would be several ulps off."""
    case = make_case(S=3, E=1, T=4, q=2, base=True, dtype=dtype, seed=7, d_in=64, d_out=32)
    out, _ = run(ck.reference.cpoly_lora, case)
    assert out.dtype == dtype
    want = naive_cpoly(case)
    float32_noise = 64 * torch.finfo(torch.float32).eps * (1 + want.abs())
    bound = 0.5 * torch.finfo(dtype).eps * want.abs() + float32_noise
    assert ((out.double() - want).abs() <= bound).all()


def test_fp64_in_gives_fp64_out():
    case = make_case(S=2, E=1, T=3, dtype=torch.float64)
    assert run(ck.reference.cpoly_lora, case)[0].dtype == torch.float64
    assert run(ck.cpoly_lora, case)[0].dtype == torch.float64


def test_default_scale_is_one_over_rank():
    case = make_case(S=2, r=5, dtype=torch.float64)
    out_default, _ = run(ck.reference.cpoly_lora, case)
    out_explicit, _ = run(ck.reference.cpoly_lora, dict(case, scale=0.2))
    out_other, _ = run(ck.reference.cpoly_lora, dict(case, scale=0.5))
    torch.testing.assert_close(out_default, out_explicit, rtol=0, atol=0)
    torch.testing.assert_close(out_other, out_default * 2.5)


def test_mixing_is_on_parameters_not_outputs():
    """(sum w A)(sum w B) != sum w (A B): guard against output-level mixing."""
    case = make_case(S=3, dtype=torch.float64, seed=11)
    out, _ = run(ck.reference.cpoly_lora, case)
    x, W, A, B = case["x"], case["weights"], case["lora_A"], case["lora_B"]
    r = A.shape[-1]
    output_level = sum(W[:, 0, s, None, None] * ((x @ A[0, s]) @ B[0, s]) for s in range(3)) / r
    assert not torch.allclose(out, output_level, rtol=1e-3, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    q=st.sampled_from([1, 2, 3]),
    dq=st.integers(1, 5),
    oq=st.integers(1, 5),
    r=st.integers(1, 5),
    S=st.integers(0, 4),
    E=st.integers(0, 2),
    T=st.integers(1, 4),
    lengths=st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=0, max_size=5)),
    b=st.integers(0, 3),
    L=st.integers(0, 3),
    with_base=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_naive_loop_on_random_shapes(q, dq, oq, r, S, E, T, lengths, b, L, with_base, seed):
    if S == 0 and E == 0:
        S = 1
    case = make_case(b=b, L=L, lengths=lengths, d_in=q * dq, d_out=q * oq, q=q, r=r, S=S, E=E, T=T,
                     base=with_base, dtype=torch.float64, seed=seed)
    out, _ = run(ck.reference.cpoly_lora, case)
    torch.testing.assert_close(out, naive_cpoly(case), rtol=1e-12, atol=1e-12)
    out_op, _ = run(ck.cpoly_lora, case)
    torch.testing.assert_close(out_op, out, rtol=0, atol=0)
