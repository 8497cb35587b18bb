"""A minimal stand-in for the ``ldm_patched`` pieces of reForge (Panchovix, ``main``) and Forge
Classic (Haoming02, ``classic``) that SEG uses, written for these tests from their public
signatures. It reuses ``standin_forge`` where the two families behave alike and differs where
they differ:

- the patcher is ``modules_forge.unet_patcher.UnetPatcher``, a subclass of
  ``ldm_patched.modules.model_patcher.ModelPatcher`` (``clone``, ``model_options``,
  ``set_model_sampler_post_cfg_function``);
- ``ldm_patched.modules.samplers``: ComfyUI's list form ``calc_cond_batch(model, conds, x_in,
  timestep, model_options)``, ``calc_cond_uncond_batch`` as its two-list wrapper, and reForge's
  ``sampling_function``, whose cfg1 optimisation hands the post-CFG functions ``uncond=None``
  (Forge and Forge Classic hand the negative conds and a zero prediction);
- ``ldm_patched.ldm.modules.attention.optimized_attention(q, k, v, heads, mask=None,
  attn_precision=None, ...)``, and ``attn_precision`` in the ``extra_options`` a replace patch
  receives (``BasicTransformerBlock.forward``); ``ATTN_PRECISION`` sets it (SD2 upcasts to
  float32), ``precisions`` records what the attention got.
Nothing here is copied from either webui.
"""

from __future__ import annotations

import math
import sys
import types

import standin_forge as sf
import torch

ATTN_PRECISION = None
precisions: list = []
EVALUATOR_MODULE = "ldm_patched.modules.samplers"
EVALUATOR = "calc_cond_batch"  # what SEG's smoothed evaluation calls there (list form, as reForge)


class ModelPatcher(sf.PatcherBase):
    pass


class UnetPatcher(ModelPatcher):
    pass


ModelPatcher.__module__ = "ldm_patched.modules.model_patcher"
UnetPatcher.__module__ = "modules_forge.unet_patcher"


def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                        skip_output_reshape=False):  # fmt: skip
    precisions.append(attn_precision)
    dtype = q.dtype
    if attn_precision == torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    return sf.attention_function(q, k, v, heads).to(dtype)


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    return sf.calc_cond_batch(model, conds, x_in, timestep, model_options, {"attn_precision": ATTN_PRECISION})


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None):
    model_options = model_options or {}
    uncond_ = (
        None
        if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        else uncond
    )
    cond_pred, uncond_pred = calc_cond_batch(model, [cond, uncond_], x, timestep, model_options)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond_, "cond_scale": cond_scale,
                "model": model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}  # fmt: skip
        cfg_result = fn(args)
    return cfg_result


def forge_model(unet):
    return sf.forge_model(unet, UnetPatcher)


def install(monkeypatch):
    """ldm_patched's modules, as SEG imports them."""
    root = types.ModuleType("ldm_patched")
    modules = types.ModuleType("ldm_patched.modules")
    samplers = types.ModuleType(EVALUATOR_MODULE)
    samplers.calc_cond_batch = calc_cond_batch
    samplers.calc_cond_uncond_batch = calc_cond_uncond_batch
    samplers.sampling_function = sampling_function
    ldm = types.ModuleType("ldm_patched.ldm")
    ldm_modules = types.ModuleType("ldm_patched.ldm.modules")
    attention = types.ModuleType("ldm_patched.ldm.modules.attention")
    attention.optimized_attention = optimized_attention
    for package in (root, modules, ldm, ldm_modules):
        package.__path__ = []
    root.modules, root.ldm, modules.samplers = modules, ldm, samplers
    ldm.modules, ldm_modules.attention = ldm_modules, attention
    for module in (root, modules, samplers, ldm, ldm_modules, attention):
        monkeypatch.setitem(sys.modules, module.__name__, module)
