"""A minimal stand-in for the ``ldm_patched`` pieces of reForge (Panchovix, ``main``) and Forge
Classic (Haoming02, ``classic``) that SEG uses, written for these tests from their public
signatures. It reuses ``standin_forge`` where the two families behave alike and differs where
they differ:

- the patcher is ``modules_forge.unet_patcher.UnetPatcher``, a subclass of
  ``ldm_patched.modules.model_patcher.ModelPatcher`` (``clone``, ``model_options``,
  ``set_model_sampler_post_cfg_function``);
- ``ldm_patched.modules.samplers``: ComfyUI's list form ``calc_cond_batch(model, conds, x_in,
  timestep, model_options)`` (reForge, batched as ``standin_forge.calc_cond_batch`` with reForge's
  transformer options), Forge Classic's two-list ``calc_cond_uncond_batch``, and
  ``sampling_function`` in reForge's form (``sampler_calc_cond_batch_function``) or, without
  ``calc_cond_batch``, Forge Classic's (pre-CFG functions before the evaluation); its cfg1
  optimisation hands the post-CFG functions ``uncond=None`` (Forge and Forge Classic hand the
  negative conds and a zero prediction);
- ``ldm_patched.modules.model_management.get_free_memory``;
- ``ldm_patched.ldm.modules.diffusionmodules.openaimodel``: the UNet layout whose blocks' layers
  run through ``forward_timestep_embed`` (``ldm_patched_nn/openaimodel.py``);
- ``ldm_patched.ldm.modules.attention.optimized_attention(q, k, v, heads, mask=None,
  attn_precision=None, ...)``, and ``attn_precision`` in the ``extra_options`` a replace patch
  receives (``BasicTransformerBlock.forward``); ``ATTN_PRECISION`` sets it (SD2 upcasts to
  float32), ``precisions`` records what the attention got.
Nothing here is copied from either webui.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import standin_forge as sf
import torch

ATTN_PRECISION = None
precisions: list = []
EVALUATOR_MODULE = "ldm_patched.modules.samplers"
EVALUATOR = "calc_cond_batch"  # what SEG's smoothed evaluation calls there (list form, as reForge)
OPENAIMODEL = "ldm_patched.ldm.modules.diffusionmodules.openaimodel"
HERE = Path(__file__).parent / "ldm_patched_nn"


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
    return sf.calc_cond_batch(model, conds, x_in, timestep, model_options, layout="reforge")


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """Forge Classic's two-list evaluator (Forge's layout of transformer options)."""
    return tuple(sf.calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None,
                      evaluator=None):  # fmt: skip
    """reForge's when ``calc_cond_batch`` exists (or an ``evaluator`` of its form is given: ComfyUI's):
    ``sampler_calc_cond_batch_function`` replaces the evaluation, the pre-CFG functions (list form,
    after it) are not used by SEG. Forge Classic's otherwise: pre-CFG functions of Forge's form,
    then the two-list evaluator."""
    model_options = model_options or {}
    uncond_ = (
        None
        if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        else uncond
    )
    if evaluator is None and hasattr(sys.modules[EVALUATOR_MODULE], "calc_cond_batch"):
        evaluator = calc_cond_batch
    if evaluator is not None:
        conds = [cond, uncond_]
        if "sampler_calc_cond_batch_function" in model_options:
            args = {
                "conds": conds,
                "input": x,
                "sigma": timestep,
                "model": model,
                "model_options": model_options,
            }
            cond_pred, uncond_pred = model_options["sampler_calc_cond_batch_function"](args)
        else:
            cond_pred, uncond_pred = evaluator(model, conds, x, timestep, model_options)
    else:
        for fn in model_options.get("sampler_pre_cfg_function", []):
            model, cond, uncond_, x, timestep, model_options = fn(
                model, cond, uncond_, x, timestep, model_options
            )
        cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond_, "cond_scale": cond_scale,
                "model": model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}  # fmt: skip
        cfg_result = fn(args)
    return cfg_result


def ldm_patched_unet(ldm_unet):
    """ldm_patched's UNet layout (``ldm_patched_nn/openaimodel.py``) around an ldm UNet's layers."""
    module = sys.modules.get(OPENAIMODEL) or _load_openaimodel()
    if not hasattr(ldm_unet, "input_blocks") or type(ldm_unet).__module__ == OPENAIMODEL:
        return ldm_unet
    return module.UNetModel(ldm_unet).eval()


def _load_openaimodel():
    spec = importlib.util.spec_from_file_location(OPENAIMODEL, HERE / "openaimodel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[OPENAIMODEL] = module
    spec.loader.exec_module(module)
    return module


def forge_model(unet):
    return sf.forge_model(ldm_patched_unet(unet), UnetPatcher,
                          extra_options=lambda: {"attn_precision": ATTN_PRECISION})  # fmt: skip


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
    diffusionmodules = types.ModuleType("ldm_patched.ldm.modules.diffusionmodules")
    openaimodel = sys.modules.get(OPENAIMODEL) or _load_openaimodel()
    attention = types.ModuleType("ldm_patched.ldm.modules.attention")
    attention.optimized_attention = optimized_attention
    management = types.ModuleType("ldm_patched.modules.model_management")
    management.get_free_memory = sf.get_free_memory
    for package in (root, modules, ldm, ldm_modules, diffusionmodules):
        package.__path__ = []
    root.modules, root.ldm, modules.samplers, modules.model_management = modules, ldm, samplers, management
    ldm.modules, ldm_modules.attention = ldm_modules, attention
    ldm_modules.diffusionmodules, diffusionmodules.openaimodel = diffusionmodules, openaimodel
    for module in (root, modules, samplers, management, ldm, ldm_modules, attention, diffusionmodules,
                   openaimodel):  # fmt: skip
        monkeypatch.setitem(sys.modules, module.__name__, module)
