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


def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):  # fmt: skip
    """backend.attention.attention_function's signature (Forge and Forge Neo's
    ``attention_pytorch``): q, k, v (B, N, heads*d), or with ``skip_reshape`` already
    (B, heads, N, d); a boolean or additive ``mask`` broadcast to (B, heads, Nq, Nk); output
    (B, N, heads*d), or (B, heads, N, d) with ``skip_output_reshape``. Neo passes
    ``transformer_options`` too, which the kernel ignores."""
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, c = q.shape
        d = c // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * d)


@contextlib.contextmanager
def forge_attention(unet, transformer_options, latent_shape, extra_options=None):
    """Run the ldm UNet's attn1 layers the way Forge's transformer blocks do: a replace patch
    found under (block, id, index) or (block, id) gets to_q/to_k/to_v outputs and computes the
    attention, with the call's transformer options (but the patches) in its ``extra_options``;
    otherwise the layer's own attention runs."""
    replace = transformer_options.get("patches_replace", {}).get("attn1", {})
    call_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
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
            **call_options,
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
FREE_MEMORY = math.inf  # what get_free_memory reports; tests lower it to make Forge split calls
MEMORY_PER_ROW_AREA = 1000.0  # KModel.memory_required's bytes per row and latent pixel


class KModel:
    """backend.modules.k_model.KModel's surface: ``apply_model(x, t, c_crossattn, control,
    transformer_options, **extra_conds)`` (k-diffusion eps scaling) and ``memory_required``.
    ``calls`` records each call's rows; ``extra_options`` is what the attention blocks add to a
    replace patch's ``extra_options`` (ldm_patched: ``attn_precision``)."""

    def __init__(self, diffusion_model, extra_options=None):
        self.diffusion_model = diffusion_model
        self.extra_options = extra_options
        self.calls: list[int] = []

    def memory_required(self, input_shape):
        return input_shape[0] * input_shape[2] * input_shape[3] * MEMORY_PER_ROW_AREA

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        self.calls.append(int(x.shape[0]))
        sigma = t
        c_in = 1 / (sigma**2 + 1) ** 0.5
        net = self.diffusion_model
        per_row = (-1,) + (1,) * (x.dim() - 1)  # images (B, C, H, W) and videos (B, C, T, H, W)
        c_in, sigma_rows = c_in.view(per_row), sigma.view(per_row)
        options = transformer_options if transformer_options is not None else {}
        extra = self.extra_options() if callable(self.extra_options) else (self.extra_options or {})
        if not hasattr(net, "input_blocks"):  # a diffusion transformer: no attn1 blocks to patch
            eps = net(x * c_in, t / 1000, context=c_crossattn, transformer_options=options, **kwargs)
            return x - eps * sigma_rows
        steps = (sigma * 100).round()
        with forge_attention(net, options, x.shape, extra):
            if type(net).__module__ != "ldm.modules.diffusionmodules.openaimodel":  # a webui's layout
                eps = net(x * c_in, steps, context=c_crossattn, control=control,
                          transformer_options=options, **kwargs)  # fmt: skip
            else:
                eps = net(x * c_in, steps, context=c_crossattn)
        return x - eps * sigma_rows


def as_kmodel(model):
    return model if isinstance(model, KModel) else KModel(model.diffusion_model)


def apply_model(model, x, sigma, context, model_options, extra_options=None, extra_conds=None):
    kmodel = KModel(model.diffusion_model, extra_options)
    options = dict(model_options.get("transformer_options", {}))
    return kmodel.apply_model(
        x, sigma, c_crossattn=context, transformer_options=options, **(extra_conds or {})
    )


def extra_conds_of(entries):
    return {key: torch.cat([entry[key] for entry in entries]) for key in EXTRA_CONDS if key in entries[0]}


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_MEMORY


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """Forge's two-list evaluator: a strength-weighted average over the cond entries and over the
    uncond entries."""
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def _can_concat(entry, first):
    return (
        entry["cross_attn"].shape == first["cross_attn"].shape
        and entry.get("control") is first.get("control")
        and [key for key in EXTRA_CONDS if key in entry] == [key for key in EXTRA_CONDS if key in first]
    )


def calc_cond_batch(model, conds, x_in, timestep, model_options, layout="forge"):
    """ComfyUI's list form, batched as Forge batches: every entry is one chunk (x_in's rows);
    chunks that can be concatenated share a call, taken in reverse order and as many as
    ``memory_required`` allows against ``get_free_memory``; each call goes through
    ``model_function_wrapper`` when set, with the chunks' kinds in ``cond_or_uncond`` and the
    transformer options Forge (``layout="forge"``: ``cond_mark``, ``cond_indices``) or reForge
    (``"reforge"``: ``uuids``) writes. Lists that are None give zeros."""
    model = as_kmodel(model)
    to_run = [(entry, kind) for kind, group in enumerate(conds) for entry in (group or [])]
    sums = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.full_like(x_in, 1e-37) for _ in conds]
    rows = x_in.shape[0]
    while to_run:
        first = to_run[0][0]
        compatible = [i for i, (entry, _) in enumerate(to_run) if _can_concat(entry, first)][::-1]
        chosen = compatible[:1]
        free = get_free_memory(x_in.device)
        for split in range(1, len(compatible) + 1):
            amount = compatible[: len(compatible) // split]
            if model.memory_required([len(amount) * rows, *x_in.shape[1:]]) < free:
                chosen = amount
                break
        picked = [to_run.pop(i) for i in chosen]
        entries, kinds = [e for e, _ in picked], [k for _, k in picked]
        c = {"c_crossattn": torch.cat([e["cross_attn"] for e in entries]), **extra_conds_of(entries)}
        options = dict(model_options.get("transformer_options", {}))
        options["cond_or_uncond"] = kinds[:]
        options["sigmas"] = timestep
        if layout == "forge":
            options["cond_mark"] = torch.tensor([k for k in kinds for _ in range(rows)], dtype=timestep.dtype)
            options["cond_indices"] = [r for r in range(len(kinds) * rows) if kinds[r // rows] == 0]
            options["uncond_indices"] = [r for r in range(len(kinds) * rows) if kinds[r // rows] != 0]
        else:
            options["uuids"] = [e.get("uuid") for e in entries]
        c["transformer_options"] = options
        input_x = torch.cat([x_in] * len(entries))
        timestep_ = torch.cat([timestep] * len(entries))
        control = first.get("control")
        if control is not None:
            c["control"] = control.get_control(input_x, timestep_, dict(c), len(kinds))
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            args = {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": kinds}
            output = wrapper(model.apply_model, args)
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for (entry, kind), chunk in zip(picked, output.chunk(len(kinds)), strict=True):
            strength = entry.get("strength", 1.0)
            sums[kind] += chunk * strength
            counts[kind] += strength
    return [total / count for total, count in zip(sums, counts, strict=True)]


class ControlNet:
    """A ControlNet-like ``control`` entry: per-row residuals for the first input block and the
    middle block, a function of each row's latent (Forge's ``get_control`` output layout: lists
    popped from the end, None where a block gets nothing)."""

    def __init__(self, strength=0.5):
        self.strength = strength
        self.calls: list[int] = []

    def get_control(self, x_noisy, t, cond, batched_number):
        self.calls.append(int(x_noisy.shape[0]))
        base = x_noisy.mean(dim=1, keepdim=True) * self.strength
        middle = F.avg_pool2d(base, 8, ceil_mode=True)
        return {"input": [None] * 11 + [base], "middle": [middle], "output": []}


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    uncond_ = (
        None
        if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization")
        else uncond
    )
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(
            model, cond, uncond_, x, timestep, model_options
        )
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}  # fmt: skip
        cfg_result = fn(args)
    return cfg_result


def forge_unet(ldm_unet):
    """Forge's UNet layout around an ldm UNet's layers (the same weights)."""
    from forge_nn.unet import IntegratedUNet2DConditionModel

    if not hasattr(ldm_unet, "input_blocks") or type(ldm_unet).__name__ == "IntegratedUNet2DConditionModel":
        return ldm_unet
    return IntegratedUNet2DConditionModel(ldm_unet).eval()


def forge_model(unet, patcher_class=None, extra_options=None):
    """A Forge sd_model: Forge's UNet layout for an ldm UNet (ldm_patched passes its own
    ``patcher_class`` and UNet layout)."""
    net = unet if patcher_class not in (None, UnetPatcher) else forge_unet(unet)
    patcher = (patcher_class or UnetPatcher)(KModel(net, extra_options))
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
    memory = types.ModuleType("backend.memory_management")
    memory.get_free_memory = get_free_memory
    backend.memory_management = memory
    modules = {"backend": backend, "backend.attention": attention, "backend.sampling": sampling,
               EVALUATOR_MODULE: function, "backend.memory_management": memory}  # fmt: skip
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
