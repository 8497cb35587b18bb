"""reForge and Forge Classic (``modules_forge`` over ``ldm_patched``, a port of ComfyUI's model
patcher and samplers): the entry points ``model_patcher`` runs on.

Their UNet patcher is ``modules_forge.unet_patcher.UnetPatcher``, a subclass of
``ldm_patched.modules.model_patcher.ModelPatcher``. Both keep
``ldm_patched.modules.samplers.calc_cond_uncond_batch(model, cond, uncond, x, sigma,
model_options)``; reForge marks it deprecated in favour of ComfyUI's list form
``calc_cond_batch(model, [cond, uncond], x, sigma, model_options)``, used where it exists (Forge
Classic has only the former). The attention is
``ldm_patched.ldm.modules.attention.optimized_attention``, chosen when that module is imported
(xformers, PyTorch SDPA, sub-quadratic, ...); it is read at each call, and reForge's
``attn_precision`` (SD2's float32 upcast, handed to replace patches in ``extra_options``) is
passed on where the function takes it, as the webui's own attention does. Both size each model
call with ``model.memory_required(shape)`` against
``ldm_patched.modules.model_management.get_free_memory(device)`` (reForge with a 1.5 margin). Their
UNet (``openaimodel.UNetModel``) runs each block's layers through ``forward_timestep_embed``, past
block hooks: the blocks SEG shares are hooked layer by layer
(``prefix_sharing.ldm_patched_unet_prefix``).
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from .guidance import HostFunctions

NAME = "ldm_patched"
PACKAGE = "ldm_patched"  # the top-level package its patcher classes live in


def entry_points():
    """The ``guidance.HostFunctions`` of reForge or Forge Classic."""
    import ldm_patched.ldm.modules.attention as attention_module
    import ldm_patched.modules.model_management as model_management
    import ldm_patched.modules.samplers as samplers

    from .prefix_sharing import ldm_patched_unet_prefix

    return lineage_functions(attention_module, model_management, samplers, ldm_patched_unet_prefix)


def lineage_functions(attention_module, model_management, samplers, unet_prefix) -> HostFunctions:
    """``HostFunctions`` from the modules of ComfyUI's lineage (``ldm_patched``, ComfyUI's
    ``comfy``): their attention, memory test and batch evaluator."""
    calc_cond_batch = getattr(samplers, "calc_cond_batch", None)
    if calc_cond_batch is not None:  # reForge, ComfyUI: the list form (the two-list wrapper is deprecated)

        def evaluate(model, cond, uncond, x, sigma, model_options):
            return tuple(calc_cond_batch(model, [cond, uncond], x, sigma, model_options))

        margin = 1.5  # their calc_cond_batch keeps this factor over the model's estimate
    else:  # Forge Classic
        evaluate = samplers.calc_cond_uncond_batch
        margin = 1.0

    def fits(model, input_shape, device) -> bool:
        estimate = getattr(model, "memory_required", None)
        if estimate is None:
            return True
        return estimate(input_shape) * margin < model_management.get_free_memory(device)

    def attention(q, k, v, heads, attn_precision=None):
        function = attention_module.optimized_attention
        if attn_precision is not None and _takes_precision(function):
            return function(q, k, v, heads, attn_precision=attn_precision)
        return function(q, k, v, heads)

    return HostFunctions(evaluate, attention, fits, calc_cond_batch=calc_cond_batch, unet_prefix=unet_prefix)


@lru_cache(maxsize=16)
def _takes_precision(function) -> bool:
    try:
        return "attn_precision" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
