"""The SEG script's behaviour in A1111 and Forge, with webui objects passed in (duck-typed).

``scripts/sd_webui_seg.py`` only builds the UI and forwards the webui's hooks and callbacks here,
so everything below is testable with stand-ins. Lifecycle of one generation:

- ``process``: validate the arguments (UI list, API list or dict, XYZ overrides), check the model,
  write or clear the infotext entries, report problems to the user;
- ``start_pass`` (every sampling pass: first pass, hires pass): on A1111 install the query patch
  and the step guidance for the current UNet (``backends/a1111``); on a Forge-family webui,
  detected by the model's UNet patcher (Forge's ``backend``, or ``ldm_patched`` in reForge and
  Forge Classic), clone that patcher with SEG's post-CFG function (``backends/model_patcher``);
- ``on_cfg_*``: the CFG-denoiser callbacks drive ``CFGStepGuidance`` (Forge family: they give the
  step);
- ``end_pass`` (``post_sample``, ``postprocess_batch``, ``postprocess``, and the next
  generation's ``process``): remove every hook, whatever happened in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from . import transformers
from .backends import A1111, backend_of, patcher_backend_of, unet_patcher_of
from .backends.a1111.cfg_step import CFGStepGuidance, PassSettings
from .backends.model_patcher.guidance import GuidedPass, PatcherGuidance, build_guidance, target_scopes
from .params import (
    INFOTEXT_KEYS,
    INFOTEXT_WARNING_KEY,
    SEGParamError,
    SEGParams,
    parse_bool,
    values_from_args,
)
from .target import Target, transformer_target, unet_target, unknown_model_message
from .xyz_axes import overrides_of

log = logging.getLogger("sd_webui_seg")
RUN_ATTRIBUTE = "seg_run"


def find_unet(sd_model) -> nn.Module | None:
    """The SD1/SD2/SDXL UNet of a webui model (ldm/sgm on A1111, the patcher's UNet on the Forge
    family), or None when SEG cannot work on it (SD3, Flux, instruct-pix2pix, anything without
    UNet blocks)."""
    if sd_model is None or getattr(sd_model, "is_sd3", False):
        return None
    if getattr(sd_model, "cond_stage_key", None) == "edit":  # instruct-pix2pix: 3-way CFG layout
        return None
    patcher = unet_patcher_of(sd_model)
    holder = getattr(patcher if patcher is not None else sd_model, "model", None)
    unet = getattr(holder, "diffusion_model", None)
    if not isinstance(unet, nn.Module) or not all(
        hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")
    ):
        return None
    return unet


def find_transformer(sd_model) -> tuple[transformers.Family, nn.Module] | None:
    """A Forge-family model's diffusion transformer (``transformers.FAMILIES``) and its family, or
    None."""
    patcher = unet_patcher_of(sd_model)
    model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    family = transformers.family_of(model)
    return (family, model) if family is not None else None


@dataclass
class Run:
    """One generation's SEG state, kept on ``p``."""

    params: SEGParams | None
    messages: list[str] = field(default_factory=list)


class SEGController:
    def __init__(self, current_model: Callable[[], object]):
        self.current_model = current_model
        # how the smoothed rows are evaluated (A1111 and the Forge family alike): inside the webui's
        # own model calls when the batch layout allows it (sharing the UNet blocks before the first
        # smoothed layer), else in one extra evaluation. Both off = always the extra evaluation.
        self.one_call = True
        self.share_prefix = True
        self.guidance: CFGStepGuidance | PatcherGuidance | None = None
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
        target = self.target(p, run, params, self.current_model(), announce=True)
        if target is None:
            return run
        log.info("SEG: %d %s: %s", len(target.names), "attn1 layers" if target.unet is not None else
                 f"{target.family.name} blocks", ", ".join(target.names))  # fmt: skip
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

    def target(self, p, run: Run, params: SEGParams, sd_model, announce: bool) -> Target | None:
        """What to smooth in ``sd_model``, or None after telling the user why nothing is.
        ``announce``: also report blocks named that this model lacks (once, at ``process``)."""
        unet = find_unet(sd_model)
        if unet is not None:
            if backend_of(sd_model) is None:
                self.report(p, run, unknown_patcher_message(sd_model))
                return None
            target = unet_target(unet, params)
            if isinstance(target, str):
                self.report(p, run, target)
                return None
            return target
        transformer = find_transformer(sd_model)
        if transformer is None:
            self.report(p, run, unknown_model_message("Forge and Forge Neo"))
            return None
        family, model = transformer
        backend = patcher_backend_of(unet_patcher_of(sd_model))
        if backend is None:
            self.report(p, run, unknown_patcher_message(sd_model))
            return None
        if not hasattr(backend, "transformer_kernels"):
            self.report(p, run, f"SEG: {family.name} models are supported on Forge (backend/) only; "
                        "generated without SEG")  # fmt: skip
            return None
        target, notes = transformer_target(model, family, params)
        for note in notes if (announce or target is None) else ():
            self.report(p, run, note)
        return target

    def _install(self, p, run: Run, scale: float, sigma: float) -> None:
        sd_model = self.current_model()
        params = run.params
        target = self.target(p, run, params, sd_model, announce=False)
        if target is None:
            return
        unet = target.unet

        def warn(message: str) -> None:
            self.report(p, run, f"SEG: {message}")

        if backend_of(sd_model) != A1111:
            backend = patcher_backend_of(unet_patcher_of(sd_model))
            try:
                webui = backend.entry_points()
            except (AttributeError, ImportError) as error:
                self.report(p, run, f"SEG: this webui's sampling functions are not where SEG looks "
                            f"({error}); generated without SEG")  # fmt: skip
                return
            kernels = None
            if unet is None:
                try:
                    kernels = backend.transformer_kernels(target.family.name, target_scopes(target))
                except LookupError as error:
                    self.report(p, run, f"SEG: {error}; generated without SEG")
                    return
            guided = GuidedPass(scale, sigma, params.branch, params.start, params.end)
            guidance = build_guidance(target, webui, kernels, guided, warn, self.one_call, self.share_prefix)
            guidance.install(sd_model)
            self.guidance = guidance
        else:
            settings = PassSettings(scale, sigma, params.branch, params.start, params.end,
                                    target.attn1_modules, unet)  # fmt: skip
            self.guidance = CFGStepGuidance(settings, warn=warn, one_call=self.one_call,
                                            share_prefix=self.share_prefix)  # fmt: skip
        self.pass_p = p

    def end_pass(self) -> None:
        if self.guidance is not None:
            self.guidance.close()
            paths = getattr(self.guidance, "paths", None)
            if paths:
                log.info("SEG: %d guided evaluations (%s)", sum(paths.values()),
                         ", ".join(f"{path}: {count}" for path, count in paths.items()))  # fmt: skip
            tiled = getattr(getattr(self.guidance, "patch", None), "tiled_calls", 0)  # A1111 only
            if tiled:
                log.info("SEG: %d smoothed attention calls arrived in tiles (Hypertile); their queries "
                         "were blurred over the whole image grid", tiled)  # fmt: skip
        self.guidance = None
        self.pass_p = None

    # -- CFG denoiser callbacks ------------------------------------------------------------------
    def _guidance_for(self, denoiser) -> CFGStepGuidance | PatcherGuidance | None:
        guidance = self.guidance
        if guidance is None:
            return None
        if denoiser is not None and getattr(denoiser, "p", self.pass_p) is not self.pass_p:
            return None  # another processing object (e.g. a nested generation) is sampling
        if isinstance(guidance, PatcherGuidance):
            return guidance
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
        if isinstance(guidance, PatcherGuidance):
            guidance.on_denoiser(params.sampling_step, params.total_sampling_steps)
        elif guidance is not None:
            guidance.on_denoiser(params)

    def on_cfg_denoised(self, params) -> None:
        if isinstance(self.guidance, CFGStepGuidance):
            self.guidance.on_denoised(params.x)

    def on_cfg_after_cfg(self, params) -> None:
        if isinstance(self.guidance, CFGStepGuidance):
            params.x = self.guidance.on_after_cfg(params.x)


def unknown_patcher_message(sd_model) -> str:
    cls = type(unet_patcher_of(sd_model))
    return (f"SEG: this webui's model patcher ({cls.__module__}.{cls.__qualname__}) is not one SEG "
            "knows; generated without SEG")  # fmt: skip


def _enabled_hint(args: Sequence[object], p) -> bool:
    """Whether the user meant SEG on, for deciding to report an invalid request: an XYZ override,
    args that cannot be read, or an ``enabled`` that is on or is no boolean at all."""
    if overrides_of(p):
        return True
    try:
        enabled = values_from_args(args).get("enabled")
        return enabled is not None and parse_bool("enabled", enabled)
    except SEGParamError:
        return True
