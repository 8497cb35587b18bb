"""lllyasviel's Forge (``backend/`` architecture): the entry points ``model_patcher`` runs on.

Its UNet patcher is ``backend.patcher.unet.UnetPatcher`` (a ``backend.patcher.base``
``ModelPatcher``); its batch evaluator is ``backend.sampling.sampling_function``
``calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)`` and its attention
``backend.attention.attention_function(q, k, v, heads)``. Imported only when a Forge model is in use.
"""

from __future__ import annotations

NAME = "forge"
PACKAGE = "backend"  # the top-level package its patcher classes live in


def entry_points():
    """``(evaluate, attention)`` for ``model_patcher.ForgeGuidance``."""
    from backend.attention import attention_function
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    return calc_cond_uncond_batch, attention_function
