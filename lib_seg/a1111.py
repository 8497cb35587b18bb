"""The SEG script's behaviour in an A1111-style webui, with webui objects passed in (duck-typed).

``scripts/sd_webui_seg.py`` only builds the UI and forwards the webui's hooks and callbacks here,
so everything below is testable with stand-ins. Lifecycle of one generation:

- ``process``: validate the arguments (UI list, API list or dict, XYZ overrides), check the model,
  write or clear the infotext entries, report problems to the user;
- ``start_pass`` (every sampling pass: first pass, hires pass): install the query patch and the
  step guidance for the current UNet;
- ``on_cfg_*``: the CFG-denoiser callbacks drive ``CFGStepGuidance``;
- ``end_pass`` (``post_sample``, ``postprocess_batch``, ``postprocess``, and the next
  generation's ``process``): remove every hook, whatever happened in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .cfg_step import CFGStepGuidance, PassSettings
from .layers import resolve_attn1
from .params import INFOTEXT_KEYS, INFOTEXT_WARNING_KEY, SEGParamError, SEGParams, values_from_args
from .xyz_axes import overrides_of

log = logging.getLogger("sd_webui_seg")
RUN_ATTRIBUTE = "seg_run"


def find_unet(sd_model) -> nn.Module | None:
    """The ldm/sgm UNet of a webui model, or None when SEG cannot work on it."""
    if sd_model is None or getattr(sd_model, "is_sd3", False):
        return None
    if getattr(sd_model, "cond_stage_key", None) == "edit":  # instruct-pix2pix: 3-way CFG layout
        return None
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if not isinstance(unet, nn.Module) or not all(
        hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")
    ):
        return None
    return unet


@dataclass
class Run:
    """One generation's SEG state, kept on ``p``."""

    params: SEGParams | None
    messages: list[str] = field(default_factory=list)


class SEGController:
    def __init__(self, current_model: Callable[[], object]):
        self.current_model = current_model
        self.guidance: CFGStepGuidance | None = None
        self.pass_p = None

    # -- reporting -----------------------------------------------------------------------------
    def report(self, p, run: Run, message: str) -> None:
        """One log line, the UI's generation comments, and the ``SEG warning`` infotext entry
        (the API's ``info`` omits comments)."""
        if message in run.messages:
            return
        run.messages.append(message)
        log.warning(message)
        if hasattr(p, "comment"):
            p.comment(message)
        extra = getattr(p, "extra_generation_params", None)
        if isinstance(extra, dict):
            extra[INFOTEXT_WARNING_KEY] = "; ".join(run.messages)

    # -- generation --------------------------------------------------------------------------
    def process(self, p, args: Sequence[object]) -> Run:
        self.end_pass()  # a pass a crashed generation left behind
        extra = getattr(p, "extra_generation_params", None)
        if isinstance(extra, dict):  # xyz shares this dict between cells: no stale entries
            for key in (*INFOTEXT_KEYS.values(), INFOTEXT_WARNING_KEY):
                extra.pop(key, None)
        run = Run(params=None)
        setattr(p, RUN_ATTRIBUTE, run)
        try:
            values = values_from_args(args)
            values.update(overrides_of(p))
            params = SEGParams.from_values(values)
        except SEGParamError as error:
            if _enabled_hint(args, p):
                self.report(p, run, f"{error}; SEG skipped")
            return run
        if not params.enabled:
            return run
        for note in params.notes:
            self.report(p, run, note)
        unet = find_unet(self.current_model())
        if unet is None:
            self.report(p, run, "SEG: this model has no SD1/SD2/SDXL UNet self-attention to smooth; "
                        "generated without SEG")  # fmt: skip
            return run
        matched = resolve_attn1(unet, params.selection)
        if not matched:
            self.report(p, run, f"SEG layers '{params.layers}' match no self-attention in this model; "
                        "generated without SEG")  # fmt: skip
            return run
        log.info("SEG: %d attn1 layers: %s", len(matched), ", ".join(name for name, _ in matched))
        run.params = params
        if isinstance(extra, dict):
            extra.update(params.to_infotext())
        return run

    def start_pass(self, p) -> None:
        """Install SEG for the sampling pass about to run (``p.is_hr_pass`` says which)."""
        self.end_pass()
        run = getattr(p, RUN_ATTRIBUTE, None)
        if run is None or run.params is None:
            return
        chosen = run.params.for_pass(bool(getattr(p, "is_hr_pass", False)))
        if chosen is None:
            return
        self._install(p, run, *chosen)

    def _install(self, p, run: Run, scale: float, sigma: float) -> None:
        unet = find_unet(self.current_model())
        if unet is None:
            self.report(p, run, "SEG: the model changed to one without a UNet SEG supports; SEG off")
            return
        modules = [module for _, module in resolve_attn1(unet, run.params.selection)]
        if not modules:
            self.report(p, run, f"SEG layers '{run.params.layers}' match no self-attention in this model")
            return
        params = run.params
        settings = PassSettings(scale, sigma, params.branch, params.start, params.end, modules, unet)
        self.guidance = CFGStepGuidance(settings, warn=lambda message: self.report(p, run, f"SEG: {message}"))
        self.pass_p = p

    def end_pass(self) -> None:
        if self.guidance is not None:
            self.guidance.close()
        self.guidance = None
        self.pass_p = None

    # -- CFG denoiser callbacks ------------------------------------------------------------------
    def _guidance_for(self, denoiser) -> CFGStepGuidance | None:
        guidance = self.guidance
        if guidance is None:
            return None
        if denoiser is not None and getattr(denoiser, "p", self.pass_p) is not self.pass_p:
            return None  # another processing object (e.g. a nested generation) is sampling
        unet = find_unet(self.current_model())
        if unet is not None and unet is not guidance.settings.unet:  # refiner switch
            run = getattr(self.pass_p, RUN_ATTRIBUTE, None)
            settings = guidance.settings
            p = self.pass_p
            self.end_pass()
            if run is not None and run.params is not None:
                self._install(p, run, settings.scale, settings.sigma)
            guidance = self.guidance
        return guidance

    def on_cfg_denoiser(self, params) -> None:
        guidance = self._guidance_for(params.denoiser)
        if guidance is not None:
            guidance.on_denoiser(
                params.x,
                params.text_uncond,
                params.denoiser,
                params.sampling_step,
                params.total_sampling_steps,
            )

    def on_cfg_denoised(self, params) -> None:
        if self.guidance is not None:
            self.guidance.on_denoised(params.x)

    def on_cfg_after_cfg(self, params) -> None:
        if self.guidance is not None:
            params.x = self.guidance.on_after_cfg(params.x)


def _enabled_hint(args: Sequence[object], p) -> bool:
    """Whether the user meant SEG on, for deciding to report an invalid request."""
    if overrides_of(p):
        return True
    try:
        values = values_from_args(args)
    except SEGParamError:
        return True
    enabled = values.get("enabled")
    return enabled is True or (
        isinstance(enabled, str) and enabled.strip().lower() not in ("false", "0", "", "no", "off")
    )
