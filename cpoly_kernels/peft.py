"""Drop-in acceleration of Hugging Face PEFT's Poly tuner.

    import cpoly_kernels.peft
    model = get_peft_model(model, PolyConfig(...))
    cpoly_kernels.peft.patch(model)     # every PEFT Poly Linear now runs cpoly_lora
    ...
    cpoly_kernels.peft.unpatch(model)   # PEFT's own forward again

`patch` sets an instance attribute `forward` on every
`peft.tuners.poly.layer.Linear` inside the module; `unpatch` deletes it, so the
class's forward is used again.  The patched forward computes what PEFT's
`Linear.forward` computes (peft 0.21), from the layer's own parameters
`poly_lora_A[adapter]`, `poly_lora_B[adapter]` and `poly_router[adapter]` (no
copies: optimizers, checkpoints and `state_dict()` keys are unaffected):

- adapters disabled, or merged adapters: PEFT's own forward is called;
- the base layer gets `x, *args, **kwargs`, as in PEFT;
- each active adapter that this layer has, in order: the router is called as
  PEFT calls it (`poly_router[adapter](task_ids=task_ids, input_ids=x)`, so
  forward hooks, the `task_ids is None` error and the training-mode
  RelaxedBernoulli sampling, RNG consumption included, are PEFT's), x is cast
  to the adapter's dtype (`x = x.to(A.dtype)`, kept for the next adapter), and
  `x_i A_i B_i / r` is added to the result by `cpoly_kernels.cpoly_lora` with
  `scale = 1/r`: fused into the op (`base=`) when the result already has the
  adapter's dtype, else added in place to the result as PEFT does (so the
  result keeps the base layer's dtype);
- the result is cast back to the dtype x had on entry.

The `peft` package is imported only when `patch` or `unpatch` is called.
"""
from __future__ import annotations

import functools

from torch import Tensor, nn

from ._dispatch import AUTO_ORDER
from ._op import cpoly_lora

__all__ = ["patch", "unpatch"]

BACKENDS = ("auto",) + AUTO_ORDER


def _poly_linear_class() -> type:
    try:
        from peft.tuners.poly.layer import Linear
    except ImportError as e:
        raise ImportError(
            "cpoly_kernels.peft: the `peft` package is needed to patch PEFT Poly layers "
            "(pip install peft)"
        ) from e
    return Linear


def _poly_forward(layer: nn.Module, backend: str, x: Tensor, *args, task_ids: Tensor = None, **kwargs) -> Tensor:
    """PEFT's `peft.tuners.poly.layer.Linear.forward`, with the LoRA path run by `cpoly_lora`."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, task_ids=task_ids, **kwargs)
    previous_dtype = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    for active_adapter in layer.active_adapters:
        if active_adapter not in layer.poly_lora_A.keys():
            continue
        r = layer.r[active_adapter]
        poly_lora_A = layer.poly_lora_A[active_adapter]
        poly_lora_B = layer.poly_lora_B[active_adapter]
        mixing_weights = layer.poly_router[active_adapter](task_ids=task_ids, input_ids=x)
        x = x.to(poly_lora_A.dtype)
        if result.dtype == x.dtype:
            result = cpoly_lora(
                x, mixing_weights, poly_lora_A, poly_lora_B, scale=1.0 / r, base=result, backend=backend
            )
        else:
            result += cpoly_lora(x, mixing_weights, poly_lora_A, poly_lora_B, scale=1.0 / r, backend=backend)
    return result.to(previous_dtype)


def _is_patched(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _poly_forward


def patch(module: nn.Module, backend: str = "auto") -> int:
    """Make every PEFT Poly `Linear` inside `module` (itself included; a
    `PeftModel` works) run its LoRA path with `cpoly_kernels.cpoly_lora`.

    `backend` is passed to every call of the op ("auto", "reference",
    "triton" or "cuda").  Patching a patched layer again only updates its
    backend.  Returns the number of Poly layers in `module` (all of them are
    patched on return; 0 when there is none).  Raises RuntimeError, naming the
    layer, if a Poly layer already has an instance `forward` that is not this
    patch (e.g. an accelerate hook), which patching would silently drop.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    linear = _poly_linear_class()
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, linear)]
    for name, layer in layers:
        if "forward" in layer.__dict__ and not _is_patched(layer):
            raise RuntimeError(
                f"module: the Poly layer {name or type(layer).__name__!r} already has an instance attribute "
                f"`forward` ({layer.__dict__['forward']!r}); expected none, so as not to drop it"
            )
    for _, layer in layers:
        layer.forward = functools.partial(_poly_forward, layer, backend)
    return len(layers)


def unpatch(module: nn.Module) -> int:
    """Restore PEFT's own forward on every patched Poly `Linear` inside
    `module`; returns the number of layers unpatched (0 when none was)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    linear = _poly_linear_class()
    count = 0
    for layer in module.modules():
        if isinstance(layer, linear) and _is_patched(layer):
            del layer.forward
            count += 1
    return count
