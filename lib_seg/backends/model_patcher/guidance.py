"""SEG on a model-patcher host (Forge's ``backend/``, ``ldm_patched`` in reForge and Forge
Classic, ComfyUI's ``comfy``): their own extension points, no module hooks.

For each sampling pass the webui script clones ``p.sd_model.forge_objects.unet`` (ComfyUI: the
node's per-run wrapper fills the run's copy of the model options) and adds one post-CFG
function, which adds the SEG term to the CFG result at a guided step. The smoothed prediction
comes from one of two paths:

- by default, SEG's rows ride in the webui's own batched model calls
  (``shared_batch.SharedBatch``: a ``model_function_wrapper``, a planning hook run right before the
  step's evaluation, and a post-CFG function first in the list that ends the step's calls), with
  the blocks before the first smoothed one shared (``prefix_sharing``);
- otherwise (a step that path cannot map, the Settings switch off) the post-CFG function re-runs
  the smoothed branch's conditioning through the webui's batch evaluator with the smoothing in
  place: an ``attn1`` replace patch on the selected blocks (``Attn1Smoothing``:
  it blurs the queries the webui hands it, then runs the webui's attention), or on Forge's
  diffusion transformers ``transformers.TransformerSmoothing``.

The host's regular rows never meet a blurred query. The host's functions are passed in
(``forge.entry_points``, ``ldm_patched.entry_points``, ``comfyui.entry_points``), so this module
imports nothing from a host.

Order among post-CFG functions: SEG's is appended after those already on the patcher (built-ins
set up before it, e.g. SAG). Its term is computed from the cond/uncond predictions and the smoothed
evaluation only, never from the ``denoised`` it receives, and is added to that ``denoised``: any
other additive post-CFG guidance (SAG, PAG) composes with it to the same result in either order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...blur import blur_queries
from ...grid import token_grid
from ...guidance import BRANCH_UNCOND, seg_term, smoothed_source
from ...layers import INPUT, MIDDLE, OUTPUT
from ...memory import free_cached_memory, is_out_of_memory
from ...schedule import is_active_step
from ...transformers import TransformerSmoothing, block_lists
from .compiled import eager
from .prefix_sharing import transformer_prefix
from .shared_batch import PATH_SEPARATE, Attn1Rows, SharedBatch, TransformerRows

log = logging.getLogger("sd_webui_seg")
MARKER = "_sd_webui_seg"
_SIDES = {"input_blocks": INPUT, "middle_block": MIDDLE, "output_blocks": OUTPUT}


def patch_keys(attn1_names: Sequence[str]) -> list[tuple[str, int]]:
    """Forge's replace-patch keys ``(block name, block id)`` for qualified attn1 names such as
    ``input_blocks.4.1.transformer_blocks.0.attn1``; a key covers every transformer index."""
    keys: list[tuple[str, int]] = []
    for name in attn1_names:
        parts = name.split(".")
        side = _SIDES[parts[0]]
        key = (side, 0 if side == MIDDLE else int(parts[1]))
        if key not in keys:
            keys.append(key)
    return keys


def with_attn1_replace(model_options: dict, patch: Callable, keys: Sequence[tuple[str, int]]) -> dict:
    """A copy of ``model_options`` with ``patch`` as the attn1 replacement for ``keys``; the
    original dicts are left untouched (Forge shares them with its regular evaluation). Forge looks
    up a ``(block, id, transformer index)`` key before ``(block, id)``: such keys another extension
    set on our blocks (SAG records the middle block's attention that way) are ours too in this
    evaluation, or they would hide our patch."""
    options = dict(model_options)
    transformer = dict(options.get("transformer_options", {}))
    replace = dict(transformer.get("patches_replace", {}))
    attn1 = dict(replace.get("attn1", {}))
    chosen = set(keys)
    for key in list(attn1):
        if len(key) == 3 and tuple(key[:2]) in chosen:
            attn1[key] = patch
    for key in keys:
        attn1[key] = patch
    replace["attn1"] = attn1
    transformer["patches_replace"] = replace
    options["transformer_options"] = transformer
    return options


def make_attn1_replace(sigma: float, attention: Callable) -> Callable:
    """The attn1 replace signature: ``(q, k, v, extra_options) -> out``; q is (B, N, heads*d).
    ``attn_precision`` (ldm_patched's SD2 upcast) is passed on when the webui hands one."""

    def smoothed_attention(q, k, v, extra_options):
        batch, _, latent_h, latent_w = extra_options["original_shape"]
        if q.shape[0] != batch:  # a patch before ours split the images (tiles): no grid to blur
            raise ValueError(f"attn1 queries arrive as {q.shape[0]} rows for {batch} images (tiled by "
                             "another extension); SEG cannot blur them")  # fmt: skip
        height, width = token_grid(q.shape[-2], latent_h, latent_w)
        precision = extra_options.get("attn_precision")
        extra = {} if precision is None else {"attn_precision": precision}
        return attention(blur_queries(q, height, width, sigma), k, v, extra_options["n_heads"], **extra)

    return smoothed_attention


class Attn1Smoothing:
    """UNets: the smoothed evaluation runs with an attn1 replace patch on the chosen blocks, in a
    copy of the step's model options."""

    def __init__(self, keys: Sequence[tuple[str, int]], sigma: float, attention: Callable):
        self.keys = list(keys)
        self.patch = make_attn1_replace(sigma, attention)

    def evaluate(self, evaluate: Callable, args: dict, conds) -> torch.Tensor:
        options = with_attn1_replace(args["model_options"], self.patch, self.keys)
        return evaluate(args["model"], conds, None, args["input"], args["sigma"], options)[0]


@dataclass
class HostFunctions:
    """What SEG calls in a host (a Forge-family webui, ComfyUI)."""

    evaluate: Callable  # calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)
    attention: Callable  # (q, k, v, heads[, attn_precision]) on (B, N, heads*d)
    fits: Callable  # (model, input shape, device) -> whether the webui's memory estimate fits
    # reForge, ComfyUI: the list-form evaluator; SEG's plan is made in sampler_calc_cond_batch_function
    # (its pre-CFG functions run after the evaluation). Forge, Forge Classic: None, the plan is
    # made in a sampler_pre_cfg_function.
    calc_cond_batch: Callable | None = None
    # (unet, smoothed attn1 modules) -> prefix_sharing.PrefixSharing: where this host's UNet runs
    # its blocks, for sharing the ones before the first smoothed block
    unet_prefix: Callable | None = None


@dataclass
class GuidedPass:
    scale: float
    sigma: float
    branch: str
    start: float
    end: float


class PatcherGuidance:
    """SEG for one sampling pass on a patcher host: the post-CFG function and the step it is on."""

    def __init__(
        self,
        settings: GuidedPass,
        evaluate: Callable,
        smoothing,
        warn: Callable[[str], None] | None = None,
        batched: SharedBatch | None = None,
        calc_cond_batch: Callable | None = None,
        step_of: Callable[[dict], tuple[int, int]] | None = None,
    ):
        self.settings = settings
        self.evaluate = evaluate  # the webui's calc_cond_uncond_batch
        self.smoothing = smoothing  # Attn1Smoothing or transformers.TransformerSmoothing
        self.warn = warn or (lambda message: log.warning("SEG: %s", message))
        self.batched = batched  # the rows in the webui's own calls, or None (always separate)
        self.calc_cond_batch = calc_cond_batch
        # the hosts whose sampler gives no step callback (ComfyUI) read the step from the
        # arguments of each call instead
        self.step_of = step_of
        self.paths: Counter[str] = Counter()
        self.step = (0, 1)
        self.failed = False
        self._original_unet = None
        self._installed_unet = None
        self._sd_model = None

    def on_denoiser(self, sampling_step: int, total_steps: int) -> None:
        self.step = (sampling_step, total_steps)

    def follow_step(self, args: dict) -> None:
        if self.step_of is not None:
            self.step = self.step_of(args)

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        settings = self.settings
        self.follow_step(args)
        if self.failed or not is_active_step(*self.step, settings.start, settings.end):
            return denoised
        try:
            uncond_pred = args.get("uncond_denoised")
            # with the cfg1 optimisation there is no negative pass: Forge and Forge Classic hand
            # zeros here, reForge None
            has_uncond = (
                args.get("uncond") is not None and uncond_pred is not None and bool(uncond_pred.any())
            )
            source = smoothed_source(settings.branch, has_uncond)
            taken = self.batched.take(source) if self.batched is not None else None
            if taken is None:
                conds = args["uncond"] if source == BRANCH_UNCOND else args["cond"]
                with eager(args.get("model")):  # never SEG's blur inside a compiled graph
                    smoothed, path = self.smoothing.evaluate(self.evaluate, args, conds), PATH_SEPARATE
            else:
                smoothed, path = taken
            self.paths[path] += 1
            prediction = uncond_pred if source == BRANCH_UNCOND else args["cond_denoised"]
            return denoised + seg_term(prediction, smoothed, settings.scale).to(denoised.dtype)
        except Exception as error:  # never break the user's generation
            if is_out_of_memory(error):
                free_cached_memory()
                self.warn("out of memory evaluating the smoothed branch: steps without room are left "
                          "unguided")  # fmt: skip
                return denoised
            self.failed = True
            self.warn(f"guidance stopped for this pass: {error}")
            return denoised

    def install(self, sd_model) -> None:
        """Clone the pass's UnetPatcher with our functions (idempotent: Forge calls the pass hook
        twice in the hires pass, and a clone of a clone keeps our functions once)."""
        unet = sd_model.forge_objects.unet
        patched = unet.clone()
        self.patch_options(patched.model_options)
        patched.set_model_sampler_post_cfg_function(self.post_cfg_function())
        sd_model.forge_objects.unet = patched
        self._sd_model, self._original_unet, self._installed_unet = sd_model, unet, patched

    def post_cfg_function(self) -> Callable:
        """The post-CFG function to append to the model options, marked as SEG's."""
        return _marked(self.post_cfg)

    def patch_options(self, options: dict) -> None:
        """Put SEG's step functions in ``options`` (a patcher's model options, or one sampling
        run's copy of them), replacing any an earlier SEG left there; the post-CFG function that
        adds the SEG term is the caller's to append (``post_cfg``)."""
        for key in ("sampler_post_cfg_function", "sampler_pre_cfg_function"):
            if key in options:
                options[key] = [f for f in options[key] if not hasattr(f, MARKER)]
        for key in ("model_function_wrapper", "sampler_calc_cond_batch_function"):
            if hasattr(options.get(key), MARKER):
                del options[key]
        if self.batched is not None:
            self._install_batched(options)

    def _install_batched(self, options: dict) -> None:
        batched = self.batched
        if "model_function_wrapper" in options:  # another extension's: plans see it is not ours
            batched.wrapper = _marked(batched.wrap)
        else:
            batched.wrapper = options["model_function_wrapper"] = _marked(batched.wrap)

        def end_of_evaluation(args):
            batched.disarm()
            return args["denoised"]

        # first, so that other post-CFG guidance's own evaluations get no SEG rows
        options["sampler_post_cfg_function"] = [_marked(end_of_evaluation),
                                                *options.get("sampler_post_cfg_function", [])]  # fmt: skip
        if self.calc_cond_batch is None:

            def plan_step(model, cond, uncond, x, timestep, model_options):
                self.plan_step(model, cond, uncond, model_options)
                return model, cond, uncond, x, timestep, model_options

            options["sampler_pre_cfg_function"] = [*options.get("sampler_pre_cfg_function", []),
                                                   _marked(plan_step)]  # fmt: skip
            return
        evaluate_list = options.get("sampler_calc_cond_batch_function")
        calc_cond_batch = self.calc_cond_batch

        def plan_and_evaluate(args):
            model, conds, options = args["model"], args["conds"], args["model_options"]
            self.follow_step(args)
            self.plan_step(model, conds[0], conds[1] if len(conds) > 1 else None, options)
            try:
                if evaluate_list is not None:
                    return evaluate_list(args)
                return calc_cond_batch(model, conds, args["input"], args["sigma"], options)
            finally:
                batched.disarm()

        options["sampler_calc_cond_batch_function"] = _marked(plan_and_evaluate)

    def plan_step(self, model, cond, uncond, model_options: dict) -> None:
        """Right before the webui evaluates a step: whether SEG's rows ride in its calls."""
        settings = self.settings
        if self.failed or not is_active_step(*self.step, settings.start, settings.end):
            self.batched.plan = None
            return
        self.batched.make_plan(model, cond, uncond, model_options, settings.branch)

    def close(self) -> None:
        """Put the unpatched UnetPatcher back if ours is still in place."""
        if self.batched is not None:
            self.batched.close()
        sd_model = self._sd_model
        if sd_model is not None and getattr(sd_model.forge_objects, "unet", None) is self._installed_unet:
            sd_model.forge_objects.unet = self._original_unet
        self._sd_model = self._original_unet = self._installed_unet = None


def target_scopes(target) -> list:
    """The modules inside which a transformer target's attention calls are image self-attention
    (Nunchaku's swapped-in attention classes call their own module's kernel, not the block's)."""
    return [scope for block in target.blocks for scope in target.family.attention_scopes(block)]


def build_guidance(
    target, host: HostFunctions, kernels, settings: GuidedPass, warn: Callable[[str], None],
    one_call: bool = True, share_prefix: bool = True, step_of=None,
) -> PatcherGuidance:  # fmt: skip
    """SEG for one sampling pass on a patcher host: ``target`` (``lib_seg.target.Target``) smoothed
    by the host's attention (UNets) or through ``kernels`` (a transformer's kernel slots or
    attention override); the smoothed rows ride in the host's calls when ``one_call``, the blocks
    before the first smoothed one shared when also ``share_prefix``."""
    prefix = None
    if target.unet is not None:
        keys = patch_keys(target.names)
        smoothing = Attn1Smoothing(keys, settings.sigma, host.attention)
        rows = Attn1Rows(settings.sigma, keys, host.attention)
        if one_call and share_prefix and host.unet_prefix is not None:
            prefix = host.unet_prefix(target.unet, target.attn1_modules)
    else:
        smoothing = TransformerSmoothing(target.transformer, target.family, target.blocks, kernels,
                                         settings.sigma)  # fmt: skip
        rows = TransformerRows(smoothing)
        if one_call and share_prefix:
            lists = block_lists(target.transformer, target.family).values()
            prefix = transformer_prefix(list(lists), target.blocks)
    batched = SharedBatch(rows, host.fits, prefix) if one_call else None
    if prefix is not None and prefix.reason is not None:
        log.info("SEG: no blocks shared with the smoothed rows: %s", prefix.reason)
    return PatcherGuidance(settings, host.evaluate, smoothing, warn=warn, batched=batched,
                           calc_cond_batch=host.calc_cond_batch, step_of=step_of)  # fmt: skip


def _marked(function: Callable) -> Callable:
    """A plain function calling ``function``, marked as SEG's (a clone's deep copy of the model
    options keeps plain functions as they are)."""

    def seg_function(*args, **kwargs):
        return function(*args, **kwargs)

    setattr(seg_function, MARKER, True)
    return seg_function
