"""A minimal stand-in for the pieces of Forge (lllyasviel/stable-diffusion-webui-forge, ``backend/``)
that SEG uses, written for these tests from Forge's public signatures:

- ``UnetPatcher.clone()`` / ``model_options`` / ``set_model_sampler_post_cfg_function``
  (``backend/patcher/base.py``);
- the attn1 replace-patch lookup of ``BasicTransformerBlock`` (key ``(block, id, index)`` falling
  back to ``(block, id)``; ``patch(q, k, v, extra_options)`` with ``n_heads`` and
  ``original_shape``; ``backend/nn/unet.py``), emulated on a real ldm UNet;
- ``calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options)`` (strength-weighted
  average of the cond entries) and ``sampling_function_inner``'s cfg1 optimisation and post-CFG
  arguments (``backend/sampling/sampling_function.py``);
- the Forge CFG denoiser's callback order (``on_cfg_denoiser`` -> sampling function ->
  ``on_cfg_after_cfg``; no ``on_cfg_denoised``) and the reset of ``forge_objects`` before every
  sampling pass (``modules/processing.py``).
Nothing here is copied from Forge. ``standin_ldm_patched`` reuses these pieces for reForge and
Forge Classic, with their module names and their differences.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import types

import torch
import torch.nn.functional as F

from lib_seg import parse_layers, resolve_attn1


class PatcherBase:
    """What Forge's and ldm_patched's patchers share (SEG picks the backend by the real class's
    module, so the webui-specific classes below carry their webui's module names)."""

    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options if model_options is not None else {"transformer_options": {}}

    def clone(self):
        return type(self)(self.model, copy.deepcopy(self.model_options))

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [
            *self.model_options.get("sampler_post_cfg_function", []),
            post_cfg_function,
        ]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True


class UnetPatcher(PatcherBase):
    pass


UnetPatcher.__module__ = "backend.patcher.unet"
EVALUATOR_MODULE = "backend.sampling.sampling_function"
EVALUATOR = "calc_cond_uncond_batch"  # what SEG's smoothed evaluation calls there


def attention_function(q, k, v, heads, mask=None, skip_reshape=False):
    """backend.attention.attention_function's signature: (B, N, heads*d) in and out, or with
    ``skip_reshape`` (Flux) q, k, v already (B, heads, N, d)."""
    if skip_reshape:
        b, _, n, d = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * d)
    b, n, c = q.shape

    def split(t):
        return t.view(b, -1, heads, c // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


@contextlib.contextmanager
def forge_attention(unet, transformer_options, latent_shape, extra_options=None):
    """Run the ldm UNet's attn1 layers the way Forge's transformer blocks do: a replace patch
    found under (block, id, index) or (block, id) gets to_q/to_k/to_v outputs and computes the
    attention; otherwise the layer's own attention runs."""
    replace = transformer_options.get("patches_replace", {}).get("attn1", {})
    patched = []
    for name, module in resolve_attn1(unet, parse_layers("all")):
        parts = name.split(".")
        side = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
        block = (side, 0 if side == "middle" else int(parts[1]))
        index = int(parts[parts.index("transformer_blocks") + 1])
        patch = replace.get((*block, index), replace.get(block))
        if patch is None:
            continue
        extra = {
            "n_heads": module.heads,
            "original_shape": list(latent_shape),
            "block": block,
            "block_index": index,
            **(extra_options or {}),
        }

        def forward(x, context=None, mask=None, module=module, patch=patch, extra=extra):
            q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
            return module.to_out(patch(q, k, v, extra))

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# per-row conditioning besides the text that Forge's KModel hands the diffusion model as keyword
# arguments (``extra_conds``): the pooled vector and Flux-dev's distilled guidance value
EXTRA_CONDS = ("y", "guidance")


def apply_model(model, x, sigma, context, model_options, extra_options=None, extra_conds=None):
    c_in = 1 / (sigma**2 + 1) ** 0.5
    t = (sigma * 100).round()
    net = model.diffusion_model
    transformer_options = model_options.get("transformer_options", {})
    if not hasattr(net, "input_blocks"):  # a diffusion transformer: no attn1 blocks to patch
        eps = net(x * c_in[:, None, None, None], t / 1000, context=context,
                  transformer_options=transformer_options, **(extra_conds or {}))  # fmt: skip
        return x - eps * sigma[:, None, None, None]
    with forge_attention(net, transformer_options, x.shape, extra_options):
        eps = net(x * c_in[:, None, None, None], t, context=context)
    return x - eps * sigma[:, None, None, None]


def extra_conds_of(entries):
    return {key: torch.cat([entry[key] for entry in entries]) for key in EXTRA_CONDS if key in entries[0]}


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """Strength-weighted average over cond entries (and over uncond entries), batched in one call."""
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def calc_cond_batch(model, conds, x_in, timestep, model_options, extra_options=None):
    """ComfyUI's list form: one strength-weighted average per list of cond entries (None: zeros)."""
    entries = [(entry, kind) for kind, group in enumerate(conds) for entry in (group or [])]
    contexts = [e["cross_attn"] for e, _ in entries]
    length = max(c.shape[1] for c in contexts)
    if all(c.shape[1] == length for c in contexts):
        outputs = apply_model(
            model,
            x_in.repeat(len(entries), 1, 1, 1),
            timestep.repeat(len(entries)),
            torch.cat(contexts),
            model_options,
            extra_options,
            extra_conds_of([e for e, _ in entries]),
        ).chunk(len(entries))
    else:
        outputs = [
            apply_model(
                model, x_in, timestep, e["cross_attn"], model_options, extra_options, extra_conds_of([e])
            )
            for e, _ in entries
        ]
    sums = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.full_like(x_in, 1e-37) for _ in conds]
    for (entry, kind), output in zip(entries, outputs, strict=True):
        strength = entry.get("strength", 1.0)
        sums[kind] += output * strength
        counts[kind] += strength
    return [total / count for total, count in zip(sums, counts, strict=True)]


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    uncond_ = (
        None
        if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization")
        else uncond
    )
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}  # fmt: skip
        cfg_result = fn(args)
    return cfg_result


def forge_model(unet, patcher_class=None):
    patcher = (patcher_class or UnetPatcher)(types.SimpleNamespace(diffusion_model=unet))
    model = types.SimpleNamespace(
        forge_objects=types.SimpleNamespace(unet=patcher),
        forge_objects_after_applying_lora=types.SimpleNamespace(unet=patcher),
        is_sd1=True, is_sdxl=False, is_sd3=False, cond_stage_key="txt",
    )  # fmt: skip
    return model


def sample(webui, p, x, sigmas, cond, uncond, cond_scale, sampling_function=None):
    """Forge's CFG denoiser loop (Euler): callbacks, then the patched UnetPatcher's options."""
    cb, state = webui.callbacks, webui.shared.state
    sd_model = webui.shared.sd_model
    denoiser = types.SimpleNamespace(p=p)
    state.sampling_steps = len(sigmas) - 1
    x = x * sigmas[0]
    for i in range(len(sigmas) - 1):
        state.sampling_step = i
        sigma = sigmas[i].expand(x.shape[0])
        params = cb.CFGDenoiserParams(
            x, None, sigma, state.sampling_step, state.sampling_steps, cond, uncond, denoiser
        )
        cb.cfg_denoiser_callback(params)
        unet = sd_model.forge_objects.unet
        denoised = (sampling_function or sampling_function_inner)(
            unet.model, x, sigma, uncond, cond, cond_scale, unet.model_options
        )
        after = cb.AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cb.cfg_after_cfg_callback(after)
        x = x + (x - after.x) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def reset_forge_objects(sd_model):
    """Forge restores the UnetPatcher from forge_objects_after_applying_lora before sampling."""
    sd_model.forge_objects = types.SimpleNamespace(unet=sd_model.forge_objects_after_applying_lora.unet)


def install(monkeypatch):
    """Forge's backend modules, as SEG imports them."""
    backend = types.ModuleType("backend")
    backend.__path__ = []
    attention = types.ModuleType("backend.attention")
    attention.attention_function = attention_function
    sampling = types.ModuleType("backend.sampling")
    sampling.__path__ = []
    function = types.ModuleType(EVALUATOR_MODULE)
    function.calc_cond_uncond_batch = calc_cond_uncond_batch
    for name, module in {"backend": backend, "backend.attention": attention, "backend.sampling": sampling,
                         EVALUATOR_MODULE: function}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
