"""Every bad input of OP_SPEC §6 raises a ValueError or TypeError naming the
argument, the expected and the actual value; nothing is written to any input."""
import re

import pytest
import torch

import cpoly_kernels as ck
from problems import make_case, split_args


def _base_case(**kw):
    spec = dict(b=3, L=4, d_in=8, d_out=12, q=2, r=3, S=4, E=2, T=5, base=True)
    spec.update(kw)
    return make_case(**spec)


def _packed_case():
    return make_case(lengths=[3, 0, 2], d_in=8, d_out=12, q=2, r=3, S=4, E=2, T=5)


def _set(**changes):
    return lambda c: c.update(changes)


# (id, case factory, mutation, exception, argument named, fragment of the actual value)
BAD = [
    ("x-not-tensor", _base_case, lambda c: c.update(x=c["x"].tolist()), TypeError, "x", "list"),
    ("x-int", _base_case, lambda c: c.update(x=c["x"].long()), TypeError, "x", "int64"),
    ("x-1d", _base_case, lambda c: c.update(x=c["x"].reshape(-1)), ValueError, "x", "(96,)"),
    ("x-4d", _base_case, lambda c: c.update(x=c["x"][None]), ValueError, "x", "(1, 3, 4, 8)"),
    ("x-2d-without-cu", _base_case, lambda c: c.update(x=c["x"].reshape(12, 8)), ValueError, "x", "(12, 8)"),
    ("x-3d-with-cu", _packed_case, lambda c: c.update(x=c["x"][None]), ValueError, "x", "(1, 5, 8)"),
    ("d_in-not-divisible-by-q", _base_case, lambda c: c.update(x=torch.randn(3, 4, 7)), ValueError, "x", "7"),
    ("lora_A-3d", _base_case, lambda c: c.update(lora_A=c["lora_A"][0]), ValueError, "lora_A", "(4, 4, 3)"),
    ("lora_A-wrong-d", _base_case, lambda c: c.update(lora_A=torch.randn(2, 4, 3, 3)), ValueError, "lora_A", "(2, 4, 3, 3)"),
    ("lora_B-5d", _base_case, lambda c: c.update(lora_B=c["lora_B"][None]), ValueError, "lora_B", "(1, 2, 4, 3, 6)"),
    ("lora_B-wrong-S", _base_case, lambda c: c.update(lora_B=torch.randn(2, 5, 3, 6)), ValueError, "lora_B", "(2, 5, 3, 6)"),
    ("lora_B-wrong-r", _base_case, lambda c: c.update(lora_B=torch.randn(2, 4, 2, 6)), ValueError, "lora_B", "(2, 4, 2, 6)"),
    ("lora_B-wrong-q", _base_case, lambda c: c.update(lora_B=torch.randn(1, 4, 3, 12)), ValueError, "lora_B", "(1, 4, 3, 12)"),
    ("weights-wrong-b", _base_case, lambda c: c.update(weights=torch.rand(2, 2, 4)), ValueError, "weights", "(2, 2, 4)"),
    ("weights-wrong-q", _base_case, lambda c: c.update(weights=torch.rand(3, 1, 4)), ValueError, "weights", "(3, 1, 4)"),
    ("weights-wrong-S", _base_case, lambda c: c.update(weights=torch.rand(3, 2, 5)), ValueError, "weights", "(3, 2, 5)"),
    ("weights-2d", _base_case, lambda c: c.update(weights=torch.rand(3, 8)), ValueError, "weights", "(3, 8)"),
    ("shared-bank-incomplete", _base_case, _set(lora_B=None), ValueError, "weights, lora_A, lora_B", "lora_B"),
    ("no-bank", _base_case, _set(weights=None, lora_A=None, lora_B=None, excl_weights=None, excl_A=None, excl_B=None),
     ValueError, "weights/lora_A/lora_B", "neither"),
    ("excl-bank-incomplete", _base_case, _set(excl_A=None), ValueError, "excl_weights, excl_A, excl_B", "excl_A"),
    ("task_ids-missing", _base_case, _set(task_ids=None), ValueError, "task_ids", "None"),
    ("task_ids-float", _base_case, lambda c: c.update(task_ids=c["task_ids"].float()), TypeError, "task_ids", "float32"),
    ("task_ids-wrong-b", _base_case, lambda c: c.update(task_ids=torch.tensor([0, 1])), ValueError, "task_ids", "(2,)"),
    ("task_ids-negative", _base_case, lambda c: c.update(task_ids=torch.tensor([0, -1, 2])), ValueError, "task_ids", "-1"),
    ("task_ids-too-large", _base_case, lambda c: c.update(task_ids=torch.tensor([0, 5, 2])), ValueError, "task_ids", "5"),
    ("excl_A-4d", _base_case, lambda c: c.update(excl_A=c["excl_A"][0]), ValueError, "excl_A", "(2, 2, 4, 3)"),
    ("excl_A-wrong-r", _base_case, lambda c: c.update(excl_A=torch.randn(5, 2, 2, 4, 2)), ValueError, "excl_A", "(5, 2, 2, 4, 2)"),
    ("excl_B-wrong-T", _base_case, lambda c: c.update(excl_B=torch.randn(4, 2, 2, 3, 6)), ValueError, "excl_B", "(4, 2, 2, 3, 6)"),
    ("excl_B-wrong-d_out", _base_case, lambda c: c.update(excl_B=torch.randn(5, 2, 2, 3, 5)), ValueError, "excl_B", "(5, 2, 2, 3, 5)"),
    ("excl_weights-wrong-E", _base_case, lambda c: c.update(excl_weights=torch.rand(3, 2, 3)), ValueError, "excl_weights", "(3, 2, 3)"),
    ("excl-only-wrong-q", lambda: make_case(S=0, E=1, T=3, q=2, d_in=8, d_out=12),
     lambda c: c.update(excl_weights=torch.rand(3, 1, 1)), ValueError, "excl_weights", "(3, 1, 1)"),
    ("base-wrong-shape", _base_case, lambda c: c.update(base=torch.randn(3, 4, 11)), ValueError, "base", "(3, 4, 11)"),
    ("base-wrong-dtype", _base_case, lambda c: c.update(base=c["base"].double()), TypeError, "base", "float64"),
    ("lora_A-wrong-dtype", _base_case, lambda c: c.update(lora_A=c["lora_A"].half()), TypeError, "lora_A", "float16"),
    ("weights-wrong-dtype", _base_case, lambda c: c.update(weights=c["weights"].double()), TypeError, "weights", "float64"),
    ("excl_B-wrong-dtype", _base_case, lambda c: c.update(excl_B=c["excl_B"].bfloat16()), TypeError, "excl_B", "bfloat16"),
    ("lora_B-wrong-device", _base_case, lambda c: c.update(lora_B=c["lora_B"].to("meta")), ValueError, "lora_B", "meta"),
    ("task_ids-wrong-device", _base_case, lambda c: c.update(task_ids=c["task_ids"].to("meta")), ValueError, "task_ids", "meta"),
    ("scale-not-number", _base_case, _set(scale="0.5"), TypeError, "scale", "str"),
    ("cu_seqlens-float", _packed_case, lambda c: c.update(cu_seqlens=c["cu_seqlens"].float()), TypeError, "cu_seqlens", "float32"),
    ("cu_seqlens-2d", _packed_case, lambda c: c.update(cu_seqlens=c["cu_seqlens"][None]), ValueError, "cu_seqlens", "(1, 4)"),
    ("cu_seqlens-wrong-b", _packed_case, lambda c: c.update(cu_seqlens=torch.tensor([0, 5])), ValueError, "weights", "(3, 2, 4)"),
    ("cu_seqlens-decreasing", _packed_case, lambda c: c.update(cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, "cu_seqlens", "[0, 3, 2, 5]"),
    ("cu_seqlens-not-ending-at-N", _packed_case, lambda c: c.update(cu_seqlens=torch.tensor([0, 3, 3, 4])), ValueError, "cu_seqlens", "N = 5"),
    ("cu_seqlens-not-starting-at-0", _packed_case, lambda c: c.update(cu_seqlens=torch.tensor([1, 3, 3, 5])), ValueError, "cu_seqlens", "[1, 3, 3, 5]"),
]


@pytest.mark.parametrize("fn", ["op", "reference"])
@pytest.mark.parametrize("name,factory,mutate,exc,arg,actual", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(name, factory, mutate, exc, arg, actual, fn):
    case = factory()
    mutate(case)
    args, kwargs = split_args(case)
    call = ck.cpoly_lora if fn == "op" else ck.reference.cpoly_lora
    with pytest.raises(exc) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(arg), message
    assert "expected" in message, message
    assert actual in message, message


def test_unknown_backend_is_named():
    args, kwargs = split_args(_base_case())
    with pytest.raises(ValueError, match=re.escape("backend: expected one of 'auto', 'cuda', 'triton', 'reference', got 'cudnn'")):
        ck.cpoly_lora(*args, **kwargs, backend="cudnn")


def test_unknown_backend_in_environment_is_named(monkeypatch):
    monkeypatch.setenv("CPOLY_BACKEND", "fast")
    args, kwargs = split_args(_base_case())
    with pytest.raises(ValueError, match="CPOLY_BACKEND: expected one of .* got 'fast'"):
        ck.cpoly_lora(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unusable_backend_says_why(backend):
    """On this CPU tensor the GPU backends cannot run; the error says why."""
    args, kwargs = split_args(_base_case())
    report = ck.backends()[backend]
    with pytest.raises(ck.BackendUnavailable, match=f"backend '{backend}' (is unavailable|cannot run this call): .+") as info:
        ck.cpoly_lora(*args, **kwargs, backend=backend)
    assert info.value.reason and info.value.reason in str(info.value)
    if not report["available"]:
        assert report["reason"]


def test_nothing_is_written_to_any_input():
    case = make_case(lengths=[2, 0, 5], d_in=8, d_out=12, q=2, r=3, S=4, E=2, T=5, base=True, requires_grad=True)
    before = {k: v.detach().clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    args, kwargs = split_args(case)
    out = ck.cpoly_lora(*args, **kwargs)
    out.sum().backward()
    bad = dict(case, task_ids=torch.tensor([0, 9, 1]))
    args, kwargs = split_args(bad)
    with pytest.raises(ValueError):
        ck.cpoly_lora(*args, **kwargs)
    for k, v in before.items():
        assert torch.equal(case[k].detach(), v), k
