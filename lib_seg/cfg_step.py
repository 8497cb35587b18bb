"""SEG inside a webui's CFG denoiser step (A1111 ``CFGDenoiser.forward`` layout).

Per step the webui builds ``x_in = [cond rows of image 0, of image 1, ..., uncond rows]`` (several
cond rows per image with AND prompts), calls its model once or in chunks (``batch cond/uncond``
off, prompt/negative token-length mismatch), may skip the negative rows (skip early CFG, NGMS),
then combines. Through the CFG-denoiser callbacks this class

1. ``on_denoiser``: arms a recorder of the model calls of this step (their exact inputs and
   conditioning, padding included);
2. ``on_denoised``: re-runs the rows SEG smooths (a copy of the negative row of each image, or
   its positive rows) in one extra call with blurred queries, and computes the SEG term;
3. ``on_after_cfg``: adds that term to the webui's own CFG result.

It never changes the webui's combination, and never raises into the sampler: a step it cannot
map is left unguided with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batch_rows import CallRecord, gather_call
from .guidance import BRANCH_UNCOND, smoothed_source
from .patch import QueryBlurPatch
from .schedule import is_active_step

log = logging.getLogger("sd_webui_seg")


@dataclass
class PassSettings:
    """What one sampling pass runs with (the hires pass may differ)."""

    scale: float
    sigma: float
    branch: str
    start: float
    end: float
    attn1_modules: Sequence[nn.Module]
    unet: nn.Module


def batch_size_of(cond) -> int:
    """Rows of a text conditioning (tensor, or SDXL dict of tensors)."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn", next(iter(cond.values())))
    return int(cond.shape[0])


def cond_weights(denoiser, batch_size: int, cond_rows: int) -> list[list[float]]:
    """AND-prompt weights per image, in x_in row order (A1111 ``conds_list``)."""
    multicond = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", {}).get("cond")
    batch = getattr(multicond, "batch", None)
    if batch is not None and len(batch) == batch_size:
        weights = [[float(getattr(c, "weight", 1.0)) for c in prompts] for prompts in batch]
        if sum(len(w) for w in weights) == cond_rows:
            return weights
    if cond_rows % batch_size == 0:
        return [[1.0] * (cond_rows // batch_size) for _ in range(batch_size)]
    raise ValueError(f"cannot map {cond_rows} prompt rows onto {batch_size} images")


class CFGStepGuidance:
    """SEG for one sampling pass of an A1111-style CFG denoiser."""

    def __init__(self, settings: PassSettings, warn: Callable[[str], None] | None = None):
        self.settings = settings
        self.warn = warn or (lambda message: log.warning("SEG: %s", message))
        self.patch = QueryBlurPatch(settings.attn1_modules, settings.sigma, unet=settings.unet)
        self.steps_guided = 0
        self._warned: set[str] = set()
        self._recorder = None
        self._recorded_model: nn.Module | None = None
        self._records: list[CallRecord] = []
        self._recording = False
        self._step: dict | None = None
        self._term: torch.Tensor | None = None
        self._term_step: dict | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook this pass installed; safe to call more than once."""
        self.patch.remove()
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        self._recording = False
        self._records = []
        self._step = None
        self._term = None

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.warn(message)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording and args and isinstance(args[0], torch.Tensor):
            self._records.append(CallRecord(args, kwargs))

    # -- callbacks ---------------------------------------------------------------------------
    def on_denoiser(self, x_in, text_uncond, denoiser, sampling_step: int, total_steps: int) -> None:
        """CFGDenoiserParams time: decide whether this step is guided and arm the recorder."""
        self._step, self._term, self._records = None, None, []
        settings = self.settings
        if not is_active_step(sampling_step, total_steps, settings.start, settings.end):
            return
        model = getattr(denoiser, "inner_model", None)
        if not isinstance(model, nn.Module):
            self._warn_once("the denoiser has no model to call; SEG skipped")
            return
        if model is not self._recorded_model:
            if self._recorder is not None:
                self._recorder.remove()
            self._recorder = model.register_forward_pre_hook(self._record, with_kwargs=True)
            self._recorded_model = model
        self._step = {
            "rows": int(x_in.shape[0]),
            "batch": batch_size_of(text_uncond),
            "denoiser": denoiser,
            "model": model,
            "index": sampling_step,
        }
        self._recording = True

    def on_denoised(self, x_out: torch.Tensor) -> None:
        """CFGDenoisedParams time: run the smoothed rows and keep the SEG term for this step."""
        self._recording = False
        step, self._step = self._step, None
        if step is None:
            return
        try:
            self._term = self._smoothed_term(step, x_out)
            if self._term is not None:
                self._term_step = step
                self.steps_guided += 1
        except Exception as error:  # never break the user's generation
            self._term = None
            self._warn_once(f"step left unguided: {error}")
        finally:
            self._records = []

    def on_after_cfg(self, denoised: torch.Tensor) -> torch.Tensor:
        """AfterCFGCallbackParams time: the webui's CFG result plus the SEG term."""
        term, self._term = self._term, None
        if term is None or term.shape != denoised.shape:
            return denoised
        denoiser = self._term_step["denoiser"]
        if getattr(denoiser, "mask", None) is not None and not getattr(
            denoiser, "mask_before_denoising", False
        ):
            # the webui has already blended the kept area back in: guide only what it regenerates
            term = term * denoiser.nmask
        return denoised + term.to(denoised.dtype)

    # -- the smoothed rows ---------------------------------------------------------------------
    def _smoothed_term(self, step: dict, x_out: torch.Tensor) -> torch.Tensor | None:
        batch, rows = step["batch"], step["rows"]
        cond_rows = rows - batch
        # The webui's own calls come first and cover exactly `rows` rows (or `cond_rows` when it
        # skipped the negative pass); calls after them belong to other extensions.
        prefix_rows, records, found = 0, [], None
        for index, record in enumerate(self._records):
            prefix_rows += record.rows
            if prefix_rows == rows:
                found = index + 1
                break
            if prefix_rows == cond_rows and found is None:
                found = index + 1
        if found is None:
            raise ValueError(f"the model calls cover {prefix_rows} rows, expected {rows} or {cond_rows}")
        records = self._records[:found]
        recorded = sum(record.rows for record in records)
        has_uncond = recorded == rows
        source = smoothed_source(self.settings.branch, has_uncond)
        weights = cond_weights(step["denoiser"], batch, cond_rows)
        source_rows = list(range(cond_rows, rows) if source == BRANCH_UNCOND else range(cond_rows))
        args, kwargs = gather_call(records, source_rows)
        self.patch.rows = slice(None)
        try:
            with torch.no_grad():
                smoothed = step["model"](*args, **kwargs)
        finally:
            self.patch.rows = None
        if self.patch.failure is not None:
            self._warn_once(self.patch.failure)
            return None
        difference = x_out[source_rows] - smoothed.to(x_out.dtype)
        if source == BRANCH_UNCOND:
            return difference * self.settings.scale
        term = torch.zeros_like(x_out[:batch])
        row = 0
        for image, image_weights in enumerate(weights):
            norm = sum(abs(w) for w in image_weights) or 1.0
            for weight in image_weights:
                term[image] += difference[row] * (weight / norm)
                row += 1
        return term * self.settings.scale
