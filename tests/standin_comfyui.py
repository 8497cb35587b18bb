"""A minimal stand-in for the pieces of ComfyUI (Comfy-Org/ComfyUI, ``a125cd84``) that SEG's node
uses, written for these tests from ComfyUI's public signatures. ComfyUI is where ``ldm_patched``
came from, so the stand-in reuses ``standin_forge`` / ``standin_ldm_patched`` where they behave
alike (the chunked list-form evaluator with reForge's transformer options, the attn1 replace
lookup, the test UNet of ``ldm_patched_nn/openaimodel.py``) and adds what is ComfyUI's own:

- ``comfy.model_patcher.ModelPatcher``: ``clone`` (deep-copied model options, copied wrappers),
  ``get_model_object``, ``add_wrapper_with_key`` / ``remove_wrappers_with_key``;
- ``comfy.patcher_extension``: ``WrappersMP``, ``WrapperExecutor`` (``class_obj``, calling the
  next wrapper), ``get_all_wrappers`` over ``transformer_options["wrappers"]``;
- ``comfy.ldm.modules.attention``: ``wrap_attn`` (a kernel called with ``transformer_options``
  holding ``optimized_attention_override`` calls ``override(kernel, *args, **kwargs)`` instead)
  and ``optimized_attention`` decorated with it;
- ``comfy.samplers``: ``calc_cond_batch`` (list form, ``memory_required * 1.5``),
  ``sampling_function`` (reForge's: ``sampler_calc_cond_batch_function``, then the post-CFG
  functions; the cfg1 optimisation hands ``uncond=None``)
  and ``CFGGuider.sample``: a copy of the model options for the run, the patcher's wrappers merged
  into its ``transformer_options``, the ``outer_sample`` wrappers around the run, and
  ``sample_sigmas`` in the sampler's options (an Euler sampler here);
- ``comfy.model_management.get_free_memory``.
Nothing here is copied from ComfyUI.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
import types

import standin_forge as sf
import standin_ldm_patched as slp
import torch

OPENAIMODEL = "comfy.ldm.modules.diffusionmodules.openaimodel"
OVERRIDE = "optimized_attention_override"
OUTER_SAMPLE = "outer_sample"
DIFFUSION_MODEL = "diffusion_model"
MEMORY_MARGIN = 1.5
override_calls: list = []  # (kernel name, q shape) of each call that went through an override


class ModelPatcher(sf.PatcherBase):
    def __init__(self, model, model_options=None, wrappers=None):
        super().__init__(model, model_options)
        self.wrappers = wrappers if wrappers is not None else {}

    def clone(self):
        wrappers = {kind: {key: list(w) for key, w in by_key.items()}
                    for kind, by_key in self.wrappers.items()}  # fmt: skip
        return type(self)(self.model, copy.deepcopy(self.model_options), wrappers)

    def get_model_object(self, name):
        return functools.reduce(getattr, name.split("."), self.model)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function


ModelPatcher.__module__ = "comfy.model_patcher"


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        following = WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1)
        return following.execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def get_all_wrappers(wrapper_type, options, is_model_options=False):
    if is_model_options:
        options = options.get("transformer_options", {})
    by_key = options.get("wrappers", {}).get(wrapper_type, {})
    return [wrapper for functions in by_key.values() for wrapper in functions]


def wrap_attn(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        options = kwargs.get("transformer_options")
        if "_inside_attn_wrapper" not in kwargs and isinstance(options, dict) and OVERRIDE in options:
            kwargs["_inside_attn_wrapper"] = True
            override_calls.append((func.__name__, tuple(args[0].shape)))
            return options[OVERRIDE](func, *args, **kwargs)
        return func(*args, **kwargs)

    return wrapper


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                      skip_output_reshape=False, **kwargs):  # fmt: skip
    slp.precisions.append(attn_precision)
    dtype = q.dtype
    if attn_precision == torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    return sf.attention_function(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                                 skip_output_reshape=skip_output_reshape).to(dtype)  # fmt: skip


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    free = sf.FREE_MEMORY
    try:  # ComfyUI keeps a 1.5 margin over the model's estimate
        sf.FREE_MEMORY = free / MEMORY_MARGIN
        return sf.calc_cond_batch(model, conds, x_in, timestep, model_options, layout="reforge")
    finally:
        sf.FREE_MEMORY = free


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None):
    """reForge's form, which is ComfyUI's (the list-form pre-CFG functions SEG does not use aside)."""
    return slp.sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options, seed,
                                 evaluator=calc_cond_batch)  # fmt: skip


def copy_options(options):
    """comfy.model_patcher.create_model_options_clone: nested dicts copied, lists shallow-copied."""
    out = dict(options)
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = copy_options(value)
        elif isinstance(value, list):
            out[key] = list(value)
    return out


class CFGGuider:
    """The run of one KSampler: ``sample(noise, sigmas)`` (Euler over ``sigmas``)."""

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    def sample(self, noise, sigmas):
        original = self.model_options
        self.model_options = copy_options(original)
        try:
            wrappers = self.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
            for kind, by_key in self.model_patcher.wrappers.items():
                for key, functions in by_key.items():
                    wrappers.setdefault(kind, {}).setdefault(key, []).extend(functions)
            executor = WrapperExecutor(self.outer_sample, self,
                                       get_all_wrappers(OUTER_SAMPLE, self.model_options, True))  # fmt: skip
            return executor.execute(noise, sigmas)
        finally:
            self.model_options = original

    def outer_sample(self, noise, sigmas):
        options = copy_options(self.model_options)
        options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        model = self.model_patcher.model
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i].expand(x.shape[0])
            negative, positive = self.conds.get("negative"), self.conds.get("positive")
            denoised = sampling_function(model, x, sigma, negative, positive, self.cfg, options)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x


def model_patcher(diffusion_model, extra_options=None):
    """A ComfyUI MODEL: a ModelPatcher of a KModel-like BaseModel around ``diffusion_model`` (UNets
    in ComfyUI's layout: ``ldm_patched_nn/openaimodel.py`` under ComfyUI's module name)."""
    return ModelPatcher(sf.KModel(comfy_unet(diffusion_model), extra_options))


def comfy_unet(ldm_unet):
    module = sys.modules.get(OPENAIMODEL) or _load_openaimodel()
    if not hasattr(ldm_unet, "input_blocks") or type(ldm_unet).__module__ == OPENAIMODEL:
        return ldm_unet
    return module.UNetModel(ldm_unet).eval()


def _load_openaimodel():
    spec = importlib.util.spec_from_file_location(OPENAIMODEL, slp.HERE / "openaimodel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[OPENAIMODEL] = module
    spec.loader.exec_module(module)
    return module


def install(monkeypatch):
    """ComfyUI's modules, as SEG imports them; returns ``comfy``."""
    names = ("comfy", "comfy.ldm", "comfy.ldm.modules", "comfy.ldm.modules.diffusionmodules")
    packages = {name: types.ModuleType(name) for name in names}
    for package in packages.values():
        package.__path__ = []
    attention = types.ModuleType("comfy.ldm.modules.attention")
    attention.wrap_attn, attention.attention_pytorch = wrap_attn, attention_pytorch
    attention.optimized_attention = attention_pytorch
    samplers = types.ModuleType("comfy.samplers")
    samplers.calc_cond_batch, samplers.sampling_function, samplers.CFGGuider = (
        calc_cond_batch, sampling_function, CFGGuider)  # fmt: skip
    management = types.ModuleType("comfy.model_management")
    management.get_free_memory = sf.get_free_memory
    extension = types.ModuleType("comfy.patcher_extension")
    extension.WrapperExecutor, extension.get_all_wrappers = WrapperExecutor, get_all_wrappers
    extension.WrappersMP = types.SimpleNamespace(OUTER_SAMPLE=OUTER_SAMPLE, DIFFUSION_MODEL=DIFFUSION_MODEL)
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    openaimodel = sys.modules.get(OPENAIMODEL) or _load_openaimodel()
    modules = [*packages.values(), attention, samplers, management, extension, patcher, openaimodel]
    for module in modules:
        monkeypatch.setitem(sys.modules, module.__name__, module)
        parent, _, child = module.__name__.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    override_calls.clear()
    return packages["comfy"]
