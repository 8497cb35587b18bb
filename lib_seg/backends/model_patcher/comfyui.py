"""ComfyUI (``comfy``, the source of reForge's and Forge Classic's ``ldm_patched``): the entry points
``guidance`` runs on. Imported by the ComfyUI node only; it imports ComfyUI's modules only when
called.

- Its ``ModelPatcher`` clones with deep-copied model options; ``comfy.samplers.calc_cond_batch``
  evaluates a step's entries in chunks sized by ``model.memory_required(shape) * 1.5`` against
  ``comfy.model_management.get_free_memory`` and hands each call to
  ``model_options["model_function_wrapper"]`` with ``cond_or_uncond``; its pre-CFG functions run
  after the evaluation, so SEG's plan is made in ``sampler_calc_cond_batch_function``, as on
  reForge.
- Its UNet (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``) takes ``attn1``
  replace patches and runs each block's layers through ``forward_timestep_embed``.
- Its transformers call ``comfy.ldm.modules.attention``'s kernels with the call's
  ``transformer_options``; every kernel there is decorated by ``wrap_attn``, which calls
  ``transformer_options["optimized_attention_override"](kernel, q, k, v, ...)`` when present:
  SEG's hook (``transformers.AttentionOverride``), in the options of the calls it smooths only.
- Its sampler has no step callback SEG can use: the step is read from each call's sigma and the
  schedule ComfyUI puts in ``transformer_options["sample_sigmas"]`` (``step_of``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from ...schedule import step_of_sigma
from ...transformers import AttentionOverride
from .guidance import HostFunctions
from .ldm_patched import lineage_functions
from .prefix_sharing import ldm_patched_unet_prefix

NAME = "comfyui"
PACKAGE = "comfy"
ATTENTION_OVERRIDE = "optimized_attention_override"


def entry_points() -> HostFunctions:
    """The ``guidance.HostFunctions`` of ComfyUI."""
    import comfy.ldm.modules.attention as attention_module
    import comfy.model_management as model_management
    import comfy.samplers as samplers

    return lineage_functions(attention_module, model_management, samplers,
                             partial(ldm_patched_unet_prefix, package=PACKAGE))  # fmt: skip


def transformer_kernels(family_name: str, modules: Sequence[nn.Module]) -> list[AttentionOverride]:
    """ComfyUI's attention override; LookupError on a ComfyUI too old to have it (before
    ``wrap_attn``, autumn 2025)."""
    import comfy.ldm.modules.attention as attention_module

    if not callable(getattr(attention_module, "wrap_attn", None)):
        raise LookupError(f"this ComfyUI's attention has no '{ATTENTION_OVERRIDE}' (update ComfyUI to use "
                          f"SEG on {family_name})")  # fmt: skip
    return [AttentionOverride(ATTENTION_OVERRIDE)]


def step_of(args: dict) -> tuple[int, int]:
    """(step, total) of a sampler call from its sigma and the run's schedule; (0, 1) when ComfyUI
    gives no schedule (SEG then follows start 0 / end 1 only)."""
    options = args.get("model_options", {}).get("transformer_options", {})
    schedule = options.get("sample_sigmas")
    sigma = args.get("sigma")
    if schedule is None or sigma is None:
        return 0, 1
    levels = schedule.tolist() if hasattr(schedule, "tolist") else list(schedule)  # one device read
    return step_of_sigma(float(sigma.flatten()[0]), [float(level) for level in levels])
