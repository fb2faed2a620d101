"""cpoly_kernels: fused kernels for C-Poly / Poly / MHR multi-task LoRA.

    import cpoly_kernels as ck
    delta = ck.cpoly_lora(x, weights, lora_A, lora_B, task_ids=..., ...)

See OP_SPEC §6 for the contract, `ck.reference.cpoly_lora` for the ground
truth and `ck.backends()` for which backends this process can use.
"""
from . import modules, peft, reference
from ._backends import cuda as _cuda, reference as _reference, triton as _triton  # noqa: F401  (register)
from ._dispatch import BackendUnavailable, backends
from ._op import cpoly_lora

__all__ = ["cpoly_lora", "backends", "BackendUnavailable", "reference", "modules", "peft"]
__version__ = "0.1.0"
