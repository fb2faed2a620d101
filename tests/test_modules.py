"""Routers and CPolyLinear (cpoly_kernels.modules).

CPolyLinear is checked against two independent computations: a hand-written
per-example, per-split loop in float64 (outputs and every gradient), and the
reference op called on the module's own parameters (train mode, same RNG).
"""
import math

import pytest
import torch
from torch import nn

import cpoly_kernels
import cpoly_kernels.modules as modules
from cpoly_kernels import reference
from cpoly_kernels.modules import CPolyDenseRouter, CPolyLinear, CPolyRouter, PolyRouter

VARIANTS = ("poly", "cpoly", "cpoly_dense")


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, name=""):
    """Every element within rtol, plus atol scaled by the expected tensor's magnitude."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
    )


def randomize_(module, seed=0):
    """Random values (never zeros) for every adapter parameter, base layer untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


# ----------------------------------------------------------------------------- routers


def test_poly_router_init():
    router = PolyRouter(n_tasks=5, n_skills=3, n_splits=2)
    logits = router.module_logits
    assert logits.shape == (5, 6)
    assert logits.requires_grad
    assert logits.abs().max() <= 1e-3
    assert logits.std() > 1e-5  # really drawn, not constant


@pytest.mark.parametrize("n_splits", [1, 3])
def test_poly_router_eval_is_normalised_sigmoid(n_splits):
    T, S = 4, 5
    router = PolyRouter(T, S, n_splits).eval()
    with torch.no_grad():
        router.module_logits.copy_(torch.randn(T, n_splits * S) * 2)
    task_ids = torch.tensor([3, 0, 3, 1, 2])
    w = router(task_ids)
    assert w.shape == (5, n_splits, S)
    expected = torch.sigmoid(router.module_logits.detach().double()[task_ids].view(5, n_splits, S))
    expected = expected / (expected.sum(-1, keepdim=True) + 1e-12)
    assert_close(w, expected)
    assert_close(w.sum(-1), torch.ones(5, n_splits, dtype=torch.float64))
    assert torch.equal(router(task_ids), w)  # deterministic in eval mode


def test_poly_router_train_samples_relaxed_bernoulli():
    T, S, q = 3, 4, 2
    router = PolyRouter(T, S, q).train()
    task_ids = torch.tensor([0, 2, 2])
    w1, w2 = router(task_ids), router(task_ids)
    assert not torch.allclose(w1, w2)  # a fresh sample per call
    assert not torch.allclose(w1[1], w1[2])  # and per example, even of the same task
    assert (w1 > 0).all() and (w1 < 1).all()
    assert_close(w1.sum(-1), torch.ones(3, q))
    (w1 * torch.randn_like(w1)).sum().backward()
    grad = router.module_logits.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # task 1 unused


@pytest.mark.parametrize("n_splits", [1, 4])
@pytest.mark.parametrize("training", [False, True])
def test_poly_router_matches_peft(n_splits, training):
    peft_router = pytest.importorskip("peft.tuners.poly.router")
    from peft import PolyConfig

    T, S = 5, 3
    cfg = PolyConfig(poly_type="poly", r=2, n_tasks=T, n_skills=S, n_splits=n_splits)
    theirs = peft_router.PolyRouter(cfg)
    torch.manual_seed(7)
    theirs.reset()
    torch.manual_seed(7)
    ours = PolyRouter(T, S, n_splits)
    assert torch.equal(ours.module_logits, theirs.module_logits)  # same init, same RNG

    with torch.no_grad():
        theirs.module_logits.normal_()
        ours.module_logits.copy_(theirs.module_logits)
    ours.train(training)
    theirs.train(training)
    task_ids = torch.tensor([4, 0, 4, 2, 1, 3])
    torch.manual_seed(11)
    w_ours = ours(task_ids)
    torch.manual_seed(11)
    w_theirs = theirs(task_ids, input_ids=None)
    assert torch.equal(w_ours, w_theirs)
    dw = torch.randn_like(w_ours)
    (w_ours * dw).sum().backward()
    (w_theirs * dw).sum().backward()
    assert torch.equal(ours.module_logits.grad, theirs.module_logits.grad)


@pytest.mark.parametrize("router_cls", [PolyRouter, CPolyRouter, CPolyDenseRouter])
def test_router_rejects_bad_task_ids(router_cls):
    router = router_cls(4, 2, 1)
    with pytest.raises(TypeError, match=r"task_ids: expected an integer dtype, got torch.float32"):
        router(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"task_ids: expected shape \[b\].*got shape \(2, 1\)"):
        router(torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, 4\), got min 0 and max 4"):
        router(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, 4\), got min -1"):
        router(torch.tensor([-1, 2]))
    router.eval()
    expected = router(torch.tensor([3, 0]))
    for dtype in (torch.uint8, torch.int32):  # any integer dtype is a task id, not a mask
        got = router(torch.tensor([3, 0], dtype=dtype))
        if isinstance(got, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        else:
            assert torch.equal(got, expected)


def test_cpoly_router_learned_exclusive_weights():
    T, S, q, E = 4, 3, 2, 2
    router = CPolyRouter(T, S, q, n_excl_skills=E).eval()
    assert router.excl_weights.shape == (T, q, E)
    assert torch.equal(router.excl_weights, torch.ones(T, q, E))  # documented init
    assert "excl_weights" in dict(router.named_parameters())
    with torch.no_grad():
        router.excl_weights.copy_(torch.randn(T, q, E))
    task_ids = torch.tensor([2, 0, 2])
    weights, excl = router(task_ids)
    assert weights.shape == (3, q, S) and excl.shape == (3, q, E)
    assert torch.equal(excl, router.excl_weights[task_ids])  # raw rows, not normalised
    poly = PolyRouter(T, S, q).eval()
    with torch.no_grad():
        poly.module_logits.copy_(router.module_logits)
    assert torch.equal(weights, poly(task_ids))
    (excl * torch.randn_like(excl)).sum().backward()
    assert router.excl_weights.grad[2].abs().sum() > 0
    assert torch.equal(router.excl_weights.grad[1], torch.zeros(q, E))


def test_cpoly_router_fixed_exclusive_weights():
    router = CPolyRouter(4, 3, 2, n_excl_skills=1, learn_excl_weights=False).train()
    assert "excl_weights" not in dict(router.named_parameters())
    assert [n for n, _ in router.named_parameters()] == ["module_logits"]
    weights, excl = router(torch.tensor([3, 1]))
    assert weights.shape == (2, 2, 3)
    assert torch.equal(excl, torch.ones(2, 2, 1))


def test_cpoly_dense_router():
    T, S, q = 4, 3, 2
    router = CPolyDenseRouter(T, S, q).eval()
    assert torch.equal(router.c_module_logits, torch.eye(T))
    task_ids = torch.tensor([1, 3, 1])
    w = router(task_ids)
    assert w.shape == (3, q, S + T)
    # at init: the task's own skill has weight exactly 1, the other tasks' 0
    assert torch.equal(w[:, :, S:], torch.eye(T)[task_ids].unsqueeze(1).expand(3, q, T))
    with torch.no_grad():
        router.c_module_logits.copy_(torch.randn(T, T))
    w = router(task_ids)
    for k in range(q):  # raw rows, the same for every split
        assert torch.equal(w[:, k, S:], router.c_module_logits[task_ids])
    poly = PolyRouter(T, S, q).eval()
    with torch.no_grad():
        poly.module_logits.copy_(router.module_logits)
    assert torch.equal(w[:, :, :S], poly(task_ids))
    (w * torch.randn_like(w)).sum().backward()
    assert router.c_module_logits.grad[1].abs().sum() > 0
    assert torch.equal(router.c_module_logits.grad[0], torch.zeros(T))


# ----------------------------------------------------------------------------- CPolyLinear


def make_layer(variant, n_splits=2, d_in=12, d_out=8, T=3, S=2, r=3, seed=0, **kw):
    torch.manual_seed(seed)
    return CPolyLinear(nn.Linear(d_in, d_out), n_tasks=T, n_skills=S, r=r, n_splits=n_splits, variant=variant, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpoly_linear_init(variant):
    T, S, q, r, d_in, d_out = 3, 2, 2, 3, 12, 8
    base = nn.Linear(d_in, d_out)
    layer = CPolyLinear(base, n_tasks=T, n_skills=S, r=r, n_splits=q, variant=variant)
    bank = S + T if variant == "cpoly_dense" else S
    assert layer.base_layer is base
    assert layer.lora_A.shape == (q, bank, d_in // q, r)
    assert layer.lora_B.shape == (q, bank, r, d_out // q)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    bound = 1 / math.sqrt(d_in // q)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert layer.scale == pytest.approx(1 / r)
    keys = set(layer.state_dict())
    assert {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B", "router.module_logits"} <= keys
    if variant == "cpoly":
        assert layer.excl_A.shape == (T, q, 1, d_in // q, r)
        assert layer.excl_B.shape == (T, q, 1, r, d_out // q)
        assert torch.equal(layer.excl_B, torch.zeros_like(layer.excl_B))
        assert layer.excl_A.abs().max() <= bound and layer.excl_A.std() > 0
        assert not torch.equal(layer.excl_A[0], layer.excl_A[1])
    else:
        assert not hasattr(layer, "excl_A")
    x = torch.randn(2, 5, d_in)
    assert_close(layer(x, torch.tensor([0, 2])), base(x))  # B = 0: the layer starts as its base


def test_cpoly_linear_init_matches_peft_poly_layer():
    pytest.importorskip("peft")
    from peft import PolyConfig
    from peft.tuners.poly.layer import Linear as PeftPolyLinear

    base = nn.Linear(16, 8)
    cfg = PolyConfig(poly_type="poly", r=2, n_tasks=3, n_skills=4, n_splits=2)
    torch.manual_seed(3)
    theirs = PeftPolyLinear(base, "default", cfg)
    torch.manual_seed(3)
    ours = CPolyLinear(base, n_tasks=3, n_skills=4, r=2, n_splits=2)
    assert torch.equal(ours.lora_A, theirs.poly_lora_A["default"])
    assert torch.equal(ours.lora_B, theirs.poly_lora_B["default"])
    assert torch.equal(ours.router.module_logits, theirs.poly_router["default"].module_logits)
    with torch.no_grad():
        ours.lora_B.fill_(1.0)
        ours.router.module_logits.fill_(1.0)
    torch.manual_seed(3)
    ours.reset_parameters()  # re-draws in the constructor's (PEFT's) order
    assert torch.equal(ours.lora_A, theirs.poly_lora_A["default"])
    assert torch.equal(ours.lora_B, theirs.poly_lora_B["default"])
    assert torch.equal(ours.router.module_logits, theirs.poly_router["default"].module_logits)


def hand_forward(x_rows, bounds, task_ids, W, A, B, W_ex, A_ex, B_ex, scale):
    """Per example i and split k: A_i[k] = sum_s W A[k,s] (+ sum_e W_ex A_ex[t_i,k,e]),
    likewise B_i[k]; stack; scale * x_i A_i B_i.  Plain loops, no einsum."""
    q, S = A.shape[:2]
    pieces = []
    for i in range(len(bounds) - 1):
        a_blocks, b_blocks = [], []
        for k in range(q):
            a = sum(W[i, k, s] * A[k, s] for s in range(S))
            bb = sum(W[i, k, s] * B[k, s] for s in range(S))
            if W_ex is not None:
                t = int(task_ids[i])
                for e in range(A_ex.shape[2]):
                    a = a + W_ex[i, k, e] * A_ex[t, k, e]
                    bb = bb + W_ex[i, k, e] * B_ex[t, k, e]
            a_blocks.append(a)
            b_blocks.append(bb)
        A_i, B_i = torch.cat(a_blocks, 0), torch.cat(b_blocks, 1)
        pieces.append(scale * (x_rows[bounds[i] : bounds[i + 1]] @ A_i) @ B_i)
    return torch.cat(pieces, 0)


def hand_router(layer, task_ids, logits, excl_w, c_logits):
    """Eval-mode router weights from float64 copies of the router's parameters."""
    q, S = layer.n_splits, layer.n_skills
    p = torch.sigmoid(logits[task_ids].view(-1, q, S))
    W = p / (p.sum(-1, keepdim=True) + 1e-12)
    if layer.variant == "cpoly_dense":
        W = torch.cat((W, c_logits[task_ids].unsqueeze(1).expand(-1, q, -1)), -1)
    return W, (excl_w[task_ids] if excl_w is not None else None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_splits", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpoly_linear_matches_float64_hand_computation(variant, n_splits, packed):
    layer = make_layer(variant, n_splits=n_splits).eval()
    randomize_(layer, seed=1)
    params = dict(layer.named_parameters())
    task_ids = torch.tensor([2, 0, 2, 1])
    g = torch.Generator().manual_seed(5)
    if packed:
        bounds = [0, 3, 3, 4, 9]  # an empty and a single-token segment
        x = torch.randn(9, 12, generator=g)
        cu = torch.tensor(bounds)
    else:
        x = torch.randn(4, 3, 12, generator=g)
        bounds, cu = [0, 3, 6, 9, 12], None
    x.requires_grad_(True)
    y = layer(x, task_ids, cu_seqlens=cu)
    assert y.shape == x.shape[:-1] + (8,) and y.dtype == torch.float32
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * dy).sum(), [x] + list(params.values()))

    p64 = {n: p.detach().double().requires_grad_(True) for n, p in params.items()}
    x64 = x.detach().double().requires_grad_(True)
    W, W_ex = hand_router(
        layer, task_ids, p64["router.module_logits"], p64.get("router.excl_weights"),
        p64.get("router.c_module_logits"),
    )
    x_rows = x64.reshape(-1, 12)
    delta = hand_forward(
        x_rows, bounds, task_ids, W, p64["lora_A"], p64["lora_B"], W_ex, p64.get("excl_A"), p64.get("excl_B"),
        1 / 3,
    )
    y64 = (x_rows @ p64["base_layer.weight"].t() + p64["base_layer.bias"] + delta).reshape(y.shape)
    expected = torch.autograd.grad((y64 * dy.double()).sum(), [x64] + list(p64.values()))

    assert_close(y, y64)
    for name, got, want in zip(["x"] + list(params), grads, expected):
        assert want.abs().sum() > 0, f"{name}: the check is vacuous (zero gradient)"
        assert_close(got, want, name=name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpoly_linear_matches_reference_op_in_training(variant, packed):
    layer = make_layer(variant, n_splits=2).train()
    randomize_(layer, seed=2)
    task_ids = torch.tensor([1, 1, 0])
    if packed:
        x, cu = torch.randn(7, 12), torch.tensor([0, 2, 3, 7])
    else:
        x, cu = torch.randn(3, 4, 12), None
    x.requires_grad_(True)
    dy = torch.randn(x.shape[:-1] + (8,))
    inputs = [x] + list(layer.parameters())

    torch.manual_seed(9)
    y = layer(x, task_ids, cu_seqlens=cu)
    got = torch.autograd.grad((y * dy).sum(), inputs)

    torch.manual_seed(9)
    routed = layer.router(task_ids)
    kw = dict(scale=1 / 3, cu_seqlens=cu, base=layer.base_layer(x))
    if variant == "cpoly":
        ref = reference.cpoly_lora(
            x, routed[0], layer.lora_A, layer.lora_B, task_ids=task_ids,
            excl_weights=routed[1], excl_A=layer.excl_A, excl_B=layer.excl_B, **kw,
        )
    else:
        ref = reference.cpoly_lora(x, routed, layer.lora_A, layer.lora_B, **kw)
    want = torch.autograd.grad((ref * dy).sum(), inputs)
    assert_close(y, ref)
    for name, g_got, g_want in zip(["x"] + [n for n, _ in layer.named_parameters()], got, want):
        assert_close(g_got, g_want, name=name)
    # the sample really is stochastic: another seed gives another output
    torch.manual_seed(10)
    assert not torch.allclose(layer(x, task_ids, cu_seqlens=cu), y)


def test_cpoly_linear_fixed_exclusive_weights_is_cpoly_simple():
    layer = make_layer("cpoly", learn_excl_weights=False).eval()
    randomize_(layer, seed=4)
    assert "router.excl_weights" not in layer.state_dict()
    x, task_ids = torch.randn(2, 3, 12), torch.tensor([2, 1])
    weights, _ = layer.router(task_ids)
    expected = reference.cpoly_lora(
        x, weights, layer.lora_A, layer.lora_B, task_ids=task_ids, excl_weights=torch.ones(2, 2, 1),
        excl_A=layer.excl_A, excl_B=layer.excl_B, base=layer.base_layer(x),
    )
    assert_close(layer(x, task_ids), expected)


def test_cpoly_linear_calls_the_op_with_fused_base(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return cpoly_kernels.cpoly_lora(*args, **kwargs)

    monkeypatch.setattr(modules, "cpoly_lora", spy)
    layer = make_layer("poly", backend="reference", scale=0.25)
    layer(torch.randn(2, 3, 12), torch.tensor([0, 1]))
    assert len(calls) == 1
    assert calls[0]["backend"] == "reference" and calls[0]["scale"] == 0.25
    assert calls[0]["base"] is not None and calls[0]["base"].shape == (2, 3, 8)


def test_cpoly_linear_mixed_dtypes():
    """bf16 base layer and input, float32 adapters: LoRA path in float32, output bf16."""
    layer = make_layer("cpoly", dtype=torch.float32).eval()
    layer.base_layer.to(torch.bfloat16)
    randomize_(layer, seed=6)
    x, task_ids = torch.randn(2, 3, 12, dtype=torch.bfloat16), torch.tensor([0, 2])
    y = layer(x, task_ids)
    assert y.dtype == torch.bfloat16
    weights, excl = layer.router(task_ids)
    delta = reference.cpoly_lora(
        x.float(), weights, layer.lora_A, layer.lora_B, task_ids=task_ids, excl_weights=excl,
        excl_A=layer.excl_A, excl_B=layer.excl_B,
    )
    expected = (layer.base_layer(x).float() + delta).to(torch.bfloat16)
    torch.testing.assert_close(y, expected)


def test_cpoly_linear_bad_input():
    layer = make_layer("cpoly")
    x = torch.randn(4, 3, 12)
    with pytest.raises(ValueError, match=r"task_ids: expected shape \(4,\) .*got shape \(3,\)"):
        layer(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"task_ids: expected shape \(2,\) .*got shape \(2, 1\)"):
        layer(torch.randn(5, 12), torch.tensor([[0], [1]]), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(TypeError, match=r"task_ids: expected an integer torch.Tensor of shape \[b\], got list"):
        layer(x, [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, 3\), got min 0 and max 3"):
        layer(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"x: expected shape \[b, L, 12\].*got shape \(4, 12\)"):
        layer(torch.randn(4, 12), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected shape \[b\+1\] .*got shape \(1, 3\)"):
        layer(torch.randn(5, 12), torch.tensor([0, 1]), cu_seqlens=torch.tensor([[0, 2, 5]]))
    with pytest.raises(TypeError, match=r"cu_seqlens: expected a torch.Tensor \[b\+1\], got list"):
        layer(torch.randn(5, 12), torch.tensor([0, 1]), cu_seqlens=[0, 2, 5])
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets"):
        layer(torch.randn(5, 12), torch.tensor([0, 1]), cu_seqlens=torch.tensor([0, 2, 4]))


def test_cpoly_linear_bad_construction():
    base = nn.Linear(12, 8)
    with pytest.raises(TypeError, match=r"base_layer: expected an nn.Linear, got Conv1d"):
        CPolyLinear(nn.Conv1d(2, 2, 1), n_tasks=2, n_skills=2, r=2)
    with pytest.raises(ValueError, match=r"n_splits: expected a divisor of .* = 12 and .* = 8, got 3"):
        CPolyLinear(base, n_tasks=2, n_skills=2, r=2, n_splits=3)
    with pytest.raises(ValueError, match=r"variant: expected one of .*got 'mhr'"):
        CPolyLinear(base, n_tasks=2, n_skills=2, r=2, variant="mhr")
    with pytest.raises(ValueError, match=r"r: expected a positive int, got 0"):
        CPolyLinear(base, n_tasks=2, n_skills=2, r=0)
    with pytest.raises(ValueError, match=r"n_excl_skills, learn_excl_weights: only the 'cpoly' variant"):
        CPolyLinear(base, n_tasks=2, n_skills=2, r=2, n_excl_skills=2)


@pytest.mark.parametrize("training", [False, True])
def test_cpoly_linear_compiles_fullgraph(training):
    layer = make_layer("cpoly", n_splits=2).train(training)
    randomize_(layer, seed=8)
    x, task_ids = torch.randn(3, 4, 12), torch.tensor([2, 0, 1])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    y = compiled(x, task_ids)
    y.sum().backward()
    torch.manual_seed(0)
    assert_close(y, layer(x, task_ids))
    assert layer.lora_A.grad.abs().sum() > 0 and layer.router.module_logits.grad.abs().sum() > 0
