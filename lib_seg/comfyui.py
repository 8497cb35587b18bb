"""SEG as a ComfyUI model patch: the node's inputs (the webui controls' meaning and defaults), the
validation of its values, and a clone of the ``ModelPatcher`` that guides each sampling run.

The clone carries one ComfyUI wrapper around the sampler's outer sample (``WrappersMP.OUTER_SAMPLE``).
Each run it builds SEG for that run (``backends.model_patcher.guidance.build_guidance``, the code the
Forge-family webuis run) and puts its functions in the run's own copy of the model options, which
ComfyUI discards after the run: the patched model stays reusable (ComfyUI caches node outputs), no
hook outlives a run, and the model the node received is never changed.

Nothing here raises into the graph: a value the node cannot use, a model SEG does not know or a
block it lacks is named in ComfyUI's log and the model passes through unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

from .backends.model_patcher import comfyui as host
from .backends.model_patcher.guidance import GuidedPass, build_guidance, target_scopes
from .params import SCALE_RANGE, SEGParamError, SEGParams
from .target import Target, is_unet, transformer_target, unet_target, unknown_model_message
from .transformers import family_of
from .ui_spec import CONTROLS

log = logging.getLogger("sd_webui_seg")
WRAPPER_KEY = "sd_webui_seg"
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
NODE_TITLE = "Smoothed Energy Guidance"
NODE_DESCRIPTION = (f"{CONTROLS[0].info} (Hong, NeurIPS 2024: the self-attention's queries are blurred "
                    "in the second prediction.)")  # fmt: skip
# the node's input name -> the SEGParams field (ComfyUI's own nodes say start_percent/end_percent)
INPUTS = {"scale": "scale", "sigma": "sigma", "branch": "branch", "blocks": "layers",
          "start_percent": "start", "end_percent": "end"}  # fmt: skip
SIGMA_INFINITE_INPUT = -1.0  # a FLOAT widget cannot hold inf
SIGMA_INPUT_MAX = 10000.0  # above the reference's 9999: inf as well


def node_inputs() -> dict:
    """``INPUT_TYPES`` of the node: the webui controls' defaults, ranges and help."""
    defaults = SEGParams()
    info = {control.name: control for control in CONTROLS}
    sigma_help = f"{info['sigma'].info} Here -1 (the default) is inf."
    scale_range = {"min": SCALE_RANGE[0], "max": SCALE_RANGE[1], "step": 0.1}
    return {"required": {
        "model": ("MODEL", {"tooltip": "The model to guide (SD1.x, SD2.x, SDXL, Flux, Chroma, SD3.x, and the "
                                       "transformers listed in the README)."}),
        "scale": ("FLOAT", {"default": defaults.scale, **scale_range, "tooltip": info["scale"].info}),
        "sigma": ("FLOAT", {"default": SIGMA_INFINITE_INPUT, "min": SIGMA_INFINITE_INPUT,
                            "max": SIGMA_INPUT_MAX, "step": 0.1, "tooltip": sigma_help}),
        "branch": (list(info["branch"].choices), {"default": defaults.branch,
                                                  "tooltip": info["branch"].info}),
        "blocks": ("STRING", {"default": defaults.layers, "multiline": False,
                              "tooltip": info["layers"].info}),
        "start_percent": ("FLOAT", {"default": defaults.start, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": info["start"].info}),
        "end_percent": ("FLOAT", {"default": defaults.end, "min": 0.0, "max": 1.0, "step": 0.001,
                                  "tooltip": info["end"].info}),
    }}  # fmt: skip


def params_of(values: Mapping[str, object]) -> SEGParams:
    """SEGParams from the node's values (SEGParamError naming the input when one is unusable)."""
    unknown = [name for name in values if name not in INPUTS]
    if unknown:
        raise SEGParamError(unknown[0], values[unknown[0]], f"unknown input; known: {', '.join(INPUTS)}")
    named = {INPUTS[name]: value for name, value in values.items()}
    try:
        return SEGParams.from_values({**named, "enabled": True})
    except SEGParamError as error:  # name the node's input, not the webui's field
        node_name = next(name for name, field in INPUTS.items() if field == error.field)
        raise SEGParamError(node_name, error.value, error.reason) from None


def find_target(diffusion_model, params: SEGParams) -> tuple[Target | None, list[str]]:
    """What to smooth in a ComfyUI diffusion model, and the messages for the log."""
    if is_unet(diffusion_model):
        target = unet_target(diffusion_model, params)
        return (None, [target]) if isinstance(target, str) else (target, [])
    family = family_of(diffusion_model)
    if family is None:
        return None, [unknown_model_message("ComfyUI")]
    return transformer_target(diffusion_model, family, params)


def apply_seg(model, warn: Callable[[str], None] | None = None, **values):
    """``model`` (a ComfyUI ``ModelPatcher``) guided by SEG with the node's ``values``: a clone, or
    ``model`` itself when SEG cannot or need not act (each reason sent to ``warn``)."""
    warn = warn or (lambda message: log.warning("%s", message))
    try:
        params = params_of(values)
    except SEGParamError as error:
        warn(f"{error}; the model passes through without SEG")
        return model
    for note in params.notes:
        warn(note)
    chosen = params.for_pass(is_hires_pass=False)
    if chosen is None:  # scale 0, sigma 0, start >= end: nothing to add
        return model
    scale, sigma = chosen
    if not all(hasattr(model, name) for name in ("add_wrapper_with_key", "remove_wrappers_with_key")):
        warn("SEG: this ComfyUI has no sampling wrappers (older than autumn 2024: update it to use SEG); the "
             "model passes through without SEG")  # fmt: skip
        return model
    try:
        target, notes = find_target(model.get_model_object("diffusion_model"), params)
    except Exception as error:  # a ComfyUI release that moved something: never break the graph
        warn(f"SEG: cannot read this model ({error}); the model passes through without SEG")
        return model
    for note in notes:
        warn(note)
    if target is None:
        return model
    try:
        functions = host.entry_points()
        kernels = None
        if target.unet is None:
            kernels = host.transformer_kernels(target.family.name, target_scopes(target))
    except (ImportError, AttributeError, LookupError) as error:
        warn(f"SEG: {error}; the model passes through without SEG")
        return model
    settings = GuidedPass(scale, sigma, params.branch, params.start, params.end)
    run = SEGRuns(target, functions, kernels, settings)
    patched = model.clone()
    patched.remove_wrappers_with_key(OUTER_SAMPLE, WRAPPER_KEY)  # one SEG per model: the last node's
    patched.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, run.outer_sample)
    sigma_words = "inf" if math.isinf(sigma) else f"{sigma:g}"
    log.info("SEG: scale %g, sigma %s, %s", scale, sigma_words, target.describe())
    return patched


class SEGRuns:
    """The sampling runs of one patched model: SEG is built for each run and closed after it."""

    def __init__(self, target: Target, functions, kernels, settings: GuidedPass):
        self.target = target
        self.functions = functions  # guidance.HostFunctions of ComfyUI
        self.kernels = kernels
        self.settings = settings

    def outer_sample(self, executor, *args, **kwargs):
        options = getattr(executor.class_obj, "model_options", None)  # this run's copy (CFGGuider.sample)
        if not isinstance(options, dict):
            log.warning("SEG: this sampler has no model options SEG can add to; sampled without SEG")
            return executor(*args, **kwargs)
        warned: set[str] = set()

        def warn(message: str) -> None:
            if message not in warned:
                warned.add(message)
                log.warning("SEG: %s", message)

        guidance = build_guidance(self.target, self.functions, self.kernels, self.settings, warn,
                                  step_of=host.step_of)  # fmt: skip
        guidance.patch_options(options)
        options["sampler_post_cfg_function"] = [*options.get("sampler_post_cfg_function", []),
                                                guidance.post_cfg_function()]  # fmt: skip
        try:
            return executor(*args, **kwargs)
        finally:
            guidance.close()
            if guidance.paths:
                log.info("SEG: %d guided evaluations (%s)", sum(guidance.paths.values()),
                         ", ".join(f"{path}: {count}" for path, count in guidance.paths.items()))  # fmt: skip
