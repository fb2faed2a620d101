"""cpoly_kernels.peft: PEFT Poly layers computed by cpoly_lora, patched vs PEFT's own forward.

The model is a tiny Transformers T5 built from a config (no download) wrapped
with PEFT's Poly tuner; every Poly parameter is randomised (PEFT starts
lora_B at zero, which would make the gradients of lora_A and the router zero)
and every parameter, base model included, is trainable, so that the gradient
of every parameter is compared.
"""
import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PolyConfig, get_peft_model  # noqa: E402
from peft.tuners.poly.layer import Linear as PolyLinear  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

import cpoly_kernels  # noqa: E402
import cpoly_kernels.peft as ckpeft  # noqa: E402

N_TASKS, VOCAB = 3, 50
TARGETS = ["q", "k", "v", "o", "wi", "wo"]
# encoder: 2 layers x (q, k, v, o, wi, wo); decoder: 2 layers x (self q k v o, cross q k v o, wi, wo)
N_POLY_LAYERS = 2 * 6 + 2 * 10


def assert_close(actual, expected, name="", rtol=1e-5, atol=1e-6):
    """Every element within rtol, plus atol scaled by the expected tensor's magnitude."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def make_model(n_splits, r=2, seed=0, train_base=True):
    """Tiny T5 with Poly adapters, every Poly parameter random; the base model trainable
    too unless `train_base=False` (PEFT's default: only the adapters are)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2, d_ff=64,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    poly = PolyConfig(
        task_type="SEQ_2_SEQ_LM", poly_type="poly", r=r, n_tasks=N_TASKS, n_skills=3, n_splits=n_splits,
        target_modules=TARGETS,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(T5ForConditionalGeneration(config), poly)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_router" in name:
                p.copy_(torch.randn(p.shape, generator=g))  # non-uniform mixing weights
            elif "poly_lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if train_base:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(2, VOCAB, (4, 7), generator=g),
        labels=torch.randint(2, VOCAB, (4, 5), generator=g),
        task_ids=torch.tensor([2, 0, 2, 1]),
    )


def loss_and_grads(model, batch, seed=123):
    """Loss and every parameter's gradient of one step, the RNG reseeded first."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


def poly_layers(model):
    return [m for m in model.modules() if isinstance(m, PolyLinear)]


def make_layer(seed=0):
    """One PEFT Poly Linear with random parameters, in eval mode."""
    torch.manual_seed(seed)
    layer = PolyLinear(nn.Linear(16, 8), "default", PolyConfig(r=2, n_tasks=3, n_skills=2, n_splits=2))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer.eval()


@pytest.fixture
def op_calls(monkeypatch):
    """Records the keyword arguments of every cpoly_lora call made by the patch."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return cpoly_kernels.cpoly_lora(*args, **kwargs)

    monkeypatch.setattr(ckpeft, "cpoly_lora", spy)
    return calls


@pytest.mark.parametrize("n_splits, r", [(1, 2), (4, 3)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_patched_matches_peft(n_splits, r, training, op_calls):
    model = make_model(n_splits, r).train(training)
    batch = make_batch()
    loss0, logits0, grads0 = loss_and_grads(model, batch)
    assert op_calls == []

    assert ckpeft.patch(model, backend="reference") == N_POLY_LAYERS
    loss1, logits1, grads1 = loss_and_grads(model, batch)
    assert len(op_calls) == N_POLY_LAYERS  # every Poly layer ran the op, once
    assert all(c["backend"] == "reference" and c["base"] is not None and c["scale"] == 1 / r for c in op_calls)

    assert_close(loss1, loss0, "loss")
    assert_close(logits1, logits0, "logits")
    assert grads1.keys() == grads0.keys()
    assert all(g is not None for g in grads0.values())
    for name, g0 in grads0.items():
        assert_close(grads1[name], g0, name)
    # the comparison is not vacuous: router, A and B gradients are nonzero
    for part in ("poly_router", "poly_lora_A", "poly_lora_B"):
        assert all(g.abs().sum() > 0 for n, g in grads0.items() if part in n), part
    if training:  # the router samples: another seed gives another loss
        loss2, _, _ = loss_and_grads(model, batch, seed=124)
        assert not torch.allclose(loss2, loss0)


def test_unpatch_restores_peft_forward(op_calls):
    model = make_model(n_splits=2).eval()
    batch = make_batch(1)
    _, logits0, grads0 = loss_and_grads(model, batch)
    assert ckpeft.patch(model) == N_POLY_LAYERS
    layers = poly_layers(model)
    assert all("forward" in layer.__dict__ for layer in layers)
    assert ckpeft.unpatch(model) == N_POLY_LAYERS
    assert ckpeft.unpatch(model) == 0
    for layer in layers:
        assert "forward" not in layer.__dict__
        assert layer.forward.__func__ is PolyLinear.forward
    _, logits1, grads1 = loss_and_grads(model, batch)
    assert op_calls == []  # PEFT's own forward: the op is not called
    assert torch.equal(logits1, logits0)
    assert all(torch.equal(grads1[n], g) for n, g in grads0.items())


def test_patch_twice_is_idempotent(op_calls):
    model = make_model(n_splits=1).eval()
    batch = make_batch(2)
    assert ckpeft.patch(model) == N_POLY_LAYERS
    _, logits0, _ = loss_and_grads(model, batch)
    assert ckpeft.patch(model, backend="reference") == N_POLY_LAYERS
    op_calls.clear()
    _, logits1, _ = loss_and_grads(model, batch)
    assert len(op_calls) == N_POLY_LAYERS  # not wrapped twice
    assert all(c["backend"] == "reference" for c in op_calls)  # the second patch's backend
    assert torch.equal(logits1, logits0)
    assert ckpeft.unpatch(model) == N_POLY_LAYERS
    assert all("forward" not in layer.__dict__ for layer in poly_layers(model))


def test_disabled_adapters_use_the_base_model(op_calls):
    model = make_model(n_splits=2).eval()
    batch = make_batch(3)
    with model.disable_adapter():
        _, logits0, _ = loss_and_grads(model, batch)
    ckpeft.patch(model)
    with model.disable_adapter():
        _, logits1, _ = loss_and_grads(model, batch)
    assert op_calls == []
    assert torch.equal(logits1, logits0)
    _, logits2, _ = loss_and_grads(model, batch)
    assert len(op_calls) == N_POLY_LAYERS
    assert not torch.allclose(logits2, logits0)  # adapters on again


def test_missing_task_ids_raise_as_in_peft():
    model = make_model(n_splits=1)
    batch = make_batch()
    del batch["task_ids"]
    ckpeft.patch(model)
    with pytest.raises(ValueError, match="task_ids should not be None"):
        model(**batch)


def test_training_updates_peft_parameters_in_place():
    model = make_model(n_splits=2, train_base=False)
    reference = make_model(n_splits=2, train_base=False)  # the same model, trained unpatched
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("poly_" in n for n in trainable)
    keys = list(model.state_dict())
    assert ckpeft.patch(model) == N_POLY_LAYERS
    assert list(model.state_dict()) == keys  # patching adds no state
    layer = poly_layers(model)[0]
    A, logits = layer.poly_lora_A["default"], layer.poly_router["default"].module_logits
    ptr, before, logits_before = A.data_ptr(), A.detach().clone(), logits.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_ref = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        for m, o in ((model, opt), (reference, opt_ref)):
            loss_and_grads(m, make_batch(step), seed=step)
            o.step()
    assert layer.poly_lora_A["default"] is A and A.data_ptr() == ptr  # the same tensor, updated in place
    assert not torch.allclose(A, before)
    assert layer.poly_router["default"].module_logits is logits and not torch.allclose(logits, logits_before)
    state = model.state_dict()
    assert list(state) == keys
    ref_state = reference.state_dict()
    for name, value in state.items():
        assert_close(value, ref_state[name], name, rtol=1e-4, atol=1e-5)


def test_single_layer_several_adapters(op_calls):
    """Two active adapters (different r and n_splits) on one layer, task_ids passed directly."""
    torch.manual_seed(0)
    layer = PolyLinear(nn.Linear(16, 24), "a", PolyConfig(r=2, n_tasks=3, n_skills=2, n_splits=2))
    layer.update_layer("b", PolyConfig(r=3, n_tasks=3, n_skills=4, n_splits=4))
    layer.update_layer("c", PolyConfig(r=1, n_tasks=3, n_skills=2, n_splits=1))
    layer.set_adapter(["a", "b", "missing"])
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
            p.requires_grad_(True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    task_ids = torch.tensor([1, 0, 2])

    def run():
        torch.manual_seed(0)  # training mode: the routers sample
        y = layer(x, task_ids=task_ids)
        dy = torch.arange(y.numel()).reshape(y.shape).sin()
        grads = torch.autograd.grad((y * dy).sum(), [x, *layer.parameters()], allow_unused=True)
        return y, grads

    y0, g0 = run()
    ckpeft.patch(layer)
    y1, g1 = run()
    assert len(op_calls) == 2
    assert [c["scale"] for c in op_calls] == [1 / 2, 1 / 3]
    assert_close(y1, y0, "output")
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g1, g0):
        if ".c" in name:  # inactive adapter: no gradient on either side
            assert a is None and b is None, name
        else:
            assert_close(a, b, name)


@pytest.mark.parametrize("fused", [False, True], ids=["bf16-base-fp32-adapter", "all-bf16"])
def test_dtypes_follow_peft(fused, op_calls):
    """bf16 x and base layer.  Adapters in float32: PEFT casts x to float32 and adds the
    delta in place into the bf16 result, and so does the patch (the same numbers).  Adapters
    in bf16: the base output is fused into the op, which rounds once (PEFT rounds the rank-r
    activations, the delta and the sum): at least as close to the float64 result as PEFT."""
    layer = make_layer()
    layer.base_layer.to(torch.bfloat16)
    if fused:
        layer.to(torch.bfloat16)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    task_ids = torch.tensor([2, 1])
    y0 = layer(x, task_ids=task_ids)
    exact = copy.deepcopy(layer).double()(x.double(), task_ids=task_ids)
    ckpeft.patch(layer)
    y1 = layer(x, task_ids=task_ids)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert (op_calls[0].get("base") is not None) == fused
    if fused:
        err_patched, err_peft = (y1.double() - exact).abs().max(), (y0.double() - exact).abs().max()
        assert err_patched <= err_peft
        torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2.0 ** -7 * y0.abs().max().item())
    else:
        assert torch.equal(y1, y0)


def test_autocast_follows_peft(op_calls):
    layer = make_layer()
    x, task_ids = torch.randn(2, 3, 16), torch.tensor([2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = layer(x, task_ids=task_ids)
        ckpeft.patch(layer)
        y1 = layer(x, task_ids=task_ids)
    assert len(op_calls) == 1
    assert y1.dtype == y0.dtype == torch.float32  # PEFT casts back to x's dtype
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2.0 ** -7 * y0.abs().max().item())


def test_patched_layer_survives_deepcopy_pickle_and_compile(op_calls):
    layer = make_layer()
    x, task_ids = torch.randn(2, 3, 16), torch.tensor([0, 2])
    y0 = layer(x, task_ids=task_ids)
    ckpeft.patch(layer)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.forward.args[0] is clone  # patched, and bound to the copy, not to the original
        op_calls.clear()
        assert_close(clone(x, task_ids=task_ids), y0, "copy")
        assert len(op_calls) == 1
        assert ckpeft.unpatch(clone) == 1
    op_calls.clear()
    compiled = torch.compile(layer, backend="aot_eager")  # PEFT's router breaks the graph (.item())
    assert_close(compiled(x, task_ids=task_ids), y0, "compiled")
    assert len(op_calls) == 1


def test_patch_bad_arguments():
    model = make_model(n_splits=1)
    with pytest.raises(ValueError, match=r"backend: expected one of 'auto', .*got 'tpu'"):
        ckpeft.patch(model, backend="tpu")
    with pytest.raises(TypeError, match=r"backend: expected a str, got int"):
        ckpeft.patch(model, backend=1)
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module, got str"):
        ckpeft.patch("model")
    layers = poly_layers(model)
    layers[3].forward = lambda *a, **k: None  # e.g. some other library's hook
    with pytest.raises(RuntimeError, match=r"already has an instance attribute `forward`"):
        ckpeft.patch(model)
    assert not any("forward" in layer.__dict__ for i, layer in enumerate(layers) if i != 3)  # nothing patched
    assert ckpeft.patch(nn.Linear(2, 2)) == 0


def test_import_without_peft():
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import torch, cpoly_kernels, cpoly_kernels.modules, cpoly_kernels.peft\n"
        "try:\n"
        "    cpoly_kernels.peft.patch(torch.nn.Linear(2, 2))\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: cpoly_kernels.peft: the `peft` package is needed" in out.stdout
