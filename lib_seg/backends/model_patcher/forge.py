"""lllyasviel's Forge (``backend/`` architecture): the entry points ``model_patcher`` runs on.

Its UNet patcher is ``backend.patcher.unet.UnetPatcher`` (a ``backend.patcher.base``
``ModelPatcher``); its batch evaluator is ``backend.sampling.sampling_function``
``calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)``, which sizes each model call
with ``model.memory_required(shape) < backend.memory_management.get_free_memory(device)``; its
attention is ``backend.attention.attention_function(q, k, v, heads)``, and its UNet
``backend.nn.unet.IntegratedUNet2DConditionModel`` calls its blocks as modules. Imported only when a
Forge model is in use.

Forge's diffusion transformers (``backend/nn/flux.py``, ``chroma.py``, ``mmditx.py``) take no
patches, so SEG finds the kernel their blocks call by name in the blocks' own module:

- Flux and Chroma blocks call their module's ``attention(q, k, v, pe)`` (Chroma imports Flux's),
  which applies RoPE and then calls ``attention_function`` from Flux's module globals with
  ``q`` as (B, heads, tokens, d): that global is the slot, so the blur sees the roped queries;
- SD3's joint blocks (``block_mixing``) call ``mmditx.attention(q, k, v, heads)`` with ``q`` as
  (B, tokens, heads·d) after the QK-norm: that global is the slot.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from ...transformers import KernelSlot

NAME = "forge"
PACKAGE = "backend"  # the top-level package its patcher classes live in

# Per transformer family: the names to follow from a block's module to its kernel slot. Every
# name but the last is a function whose own module globals hold the next name. Forge Neo's
# families import ``attention_function`` from ``backend.attention`` into their own module and
# call it from there: that default needs no entry.
KERNEL_PATHS = {"Flux": ("attention", "attention_function"), "Chroma": ("attention", "attention_function"),
                "Flux.2": ("attention", "attention_function"),
                "SD3": ("attention",)}  # fmt: skip
DEFAULT_KERNEL_PATH = ("attention_function",)


def entry_points():
    """The ``model_patcher.HostFunctions`` of Forge."""
    from backend import memory_management
    from backend.attention import attention_function
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    from .guidance import HostFunctions
    from .prefix_sharing import forge_unet_prefix

    def fits(model, input_shape, device) -> bool:
        # calc_cond_uncond_batch's own test for the rows of one call
        return model.memory_required(input_shape) < memory_management.get_free_memory(device)

    return HostFunctions(calc_cond_uncond_batch, attention_function, fits, unet_prefix=forge_unet_prefix)


def transformer_kernels(family_name: str, modules: Sequence[nn.Module]) -> list[KernelSlot]:
    """The kernel slots the chosen blocks' self-attention modules (or the blocks) call, looked up
    from each module's own class module; LookupError when Forge's layout is not there."""
    path = KERNEL_PATHS.get(family_name, DEFAULT_KERNEL_PATH)
    slots = []
    for block in modules:
        module = sys.modules.get(type(block).__module__)
        namespace = vars(module) if module is not None else {}
        for name in path[:-1]:
            function = namespace.get(name)
            namespace = getattr(function, "__globals__", None)
            if namespace is None:
                raise LookupError(f"{type(block).__module__}.{name} is not the function SEG expects")
        if not callable(namespace.get(path[-1])):
            raise LookupError(f"{type(block).__module__} has no attention kernel {path[-1]!r}")
        slots.append(KernelSlot(namespace, path[-1]))
    return slots
