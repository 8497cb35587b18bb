"""SEG inside a webui's CFG denoiser step (A1111 ``CFGDenoiser.forward`` layout).

Per step the webui builds ``x_in = [cond rows of image 0, of image 1, ..., uncond rows]`` (several
cond rows per image with AND prompts), calls its model once or in chunks (``batch cond/uncond``
off, prompt/negative token-length mismatch), may skip the negative rows (skip early CFG, NGMS),
then combines. Through the CFG-denoiser callbacks this class

1. ``on_denoiser``: inserts copies of the rows SEG smooths (each image's negative row, or its
   positive rows) between the cond and uncond rows, so they are evaluated *in the webui's own
   model call* ("one call"); their queries are blurred by the ``attn1`` patch, and the UNet blocks
   before the first smoothed layer are computed once for a row and its copy ("shared prefix",
   see ``prefix``). Where the layout does not allow it (the negative prompt has another token
   length), it only arms a recorder of the webui's calls;
2. ``on_denoised``: reads the smoothed predictions from the webui's output, or computes them in
   one extra call from the recorded inputs ("separate" path, also the fallback when the webui
   skipped the negative pass after all), and computes the SEG term;
3. ``on_after_cfg``: adds that term to the webui's own CFG result.

The webui's combination only reads the cond rows by index and the uncond rows at the end, so the
inserted rows never enter it. Three cases keep the webui's batch as it is and take the separate
path: a UNet whose forward another extension replaced (ControlNet's hook reads per-row control data
and may assume the webui's own ``[cond, uncond]`` layout; the separate call is shaped like the
webui's own calls with *batch cond/uncond* off, which such wrappers support), a CFG combination
another extension replaced (Dynamic Thresholding reads every row before the uncond rows as a cond
prediction, so inserted rows would enter its result), and a pass in which the
enlarged call ran out of memory (that call is then finished as two calls, and the rest of the pass
evaluates the smoothed rows separately). A step this class cannot map is left unguided with one warning; it
never raises into the sampler.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...guidance import BRANCH_UNCOND, smoothed_source
from ...memory import free_cached_memory, is_out_of_memory
from ...schedule import is_active_step
from ..batch_rows import CallRecord, concat_rows, gather_call, insert_rows, select_rows
from .patch import QueryBlurPatch
from .prefix import PrefixSharing

log = logging.getLogger("sd_webui_seg")

PATH_SHARED_PREFIX = "shared-prefix"
PATH_ONE_CALL = "one-call"
PATH_SEPARATE = "separate"


WEBUI_DENOISER = "CFGDenoiser"  # the class whose combination reads the cond rows by index


def combination_is_replaced(denoiser) -> bool:
    """Whether another extension replaced the webui's CFG combination (``combine_denoised``).

    The webui's own combination reads each cond row by its index and the uncond rows at the end,
    so rows inserted between them never enter it. A replacement may read every row before the
    uncond rows as a cond prediction (Dynamic Thresholding's does): SEG's rows would then be
    mixed into the result as if they were extra AND prompts."""
    if denoiser is None:
        return False
    if "combine_denoised" in vars(denoiser):
        return True
    owner = next((cls for cls in type(denoiser).__mro__ if "combine_denoised" in vars(cls)), None)
    return owner is not None and owner.__name__ != WEBUI_DENOISER


def why_not_one_call(unet: nn.Module, denoiser=None) -> str | None:
    """None when SEG's rows may join the webui's own UNet call, else the reason."""
    if "forward" in vars(unet):
        return "the UNet's forward is replaced by another extension (e.g. ControlNet)"
    if combination_is_replaced(denoiser):
        return (
            "the CFG combination is replaced by another extension (e.g. Dynamic Thresholding), "
            "which may read every row of the webui's batch"
        )
    return None


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


def token_length_of(cond) -> int:
    if isinstance(cond, dict):
        cond = cond.get("crossattn", next(iter(cond.values())))
    return int(cond.shape[1]) if cond.dim() > 2 else 1


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


@dataclass
class _Step:
    denoiser: object
    model: nn.Module
    batch: int  # images
    cond_rows: int  # rows of positive predictions (AND parts included)
    weights: list[list[float]]
    inserted: int = 0  # smoothed rows put into the webui's own call
    inserted_source: str | None = None
    shared_before: int = 0


class CFGStepGuidance:
    """SEG for one sampling pass of an A1111-style CFG denoiser."""

    def __init__(
        self,
        settings: PassSettings,
        warn: Callable[[str], None] | None = None,
        one_call: bool = True,
        share_prefix: bool = True,
    ):
        self.settings = settings
        self.warn = warn or (lambda message: log.warning("SEG: %s", message))
        self.one_call = one_call
        self.patch = QueryBlurPatch(settings.attn1_modules, settings.sigma, unet=settings.unet)
        self.prefix = (
            PrefixSharing(settings.unet, settings.attn1_modules) if one_call and share_prefix else None
        )
        self.paths: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._hooks: list = []
        self._hooked_model: nn.Module | None = None
        self._guarded_forward = None
        self._call_rows: tuple[list[int], int] | None = None  # smoothed rows of the running call
        self._step_failed = False
        self._records: list[CallRecord] = []
        self._recording = False
        self._offset = 0
        self._step: _Step | None = None
        self._term: torch.Tensor | None = None
        self._term_denoiser = None

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook this pass installed; safe to call more than once."""
        self.patch.remove()
        if self.prefix is not None:
            self.prefix.remove()
        self._unhook_model()
        self._recording = False
        self._records = []
        self._step = None
        self._term = None

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.warn(message)

    # -- the webui's model calls --------------------------------------------------------------
    def _hook_model(self, model: nn.Module) -> None:
        if model is self._hooked_model:
            return
        self._unhook_model()
        self._hooks = [
            model.register_forward_pre_hook(self._before_call, with_kwargs=True),
            model.register_forward_hook(self._after_call),
        ]
        self._hooked_model = model
        if self.one_call:
            self._guarded_forward = self._guard_out_of_memory(model.forward)
            model.forward = self._guarded_forward

    def _unhook_model(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        model, self._hooked_model = self._hooked_model, None
        guarded, self._guarded_forward = self._guarded_forward, None
        if model is not None and guarded is not None and vars(model).get("forward") is guarded:
            original = guarded.original
            if getattr(original, "__self__", None) is model and original.__func__ is type(model).forward:
                del model.forward
            else:
                model.forward = original
        self._call_rows = None

    def _guard_out_of_memory(self, forward: Callable) -> Callable:
        """The model's forward, finishing a call that ran out of memory because of SEG's rows
        without them, then evaluating those rows on their own."""

        def seg_guarded_forward(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            except Exception as error:
                if self._call_rows is None or not is_out_of_memory(error):
                    raise
            # outside the except block: the failed call's activations are freed with the error
            return self._split_call(forward, args, kwargs)

        seg_guarded_forward.original = forward
        return seg_guarded_forward

    def _split_call(self, forward: Callable, args: tuple, kwargs: dict):
        smoothed, batch = self._call_rows
        self._after_call(None, args, None)
        self.one_call = False  # the rest of this pass keeps the webui's batch as it is
        self._warn_once(
            "out of memory with SEG's rows in the webui's model call: this pass evaluates them in a "
            "separate call (turn 'Evaluate SEG's smoothed rows in the webui's own model call' off to "
            "start that way)"
        )
        free_cached_memory()
        smoothed_set = set(smoothed)
        kept = torch.tensor([row for row in range(batch) if row not in smoothed_set])
        rows = torch.tensor(smoothed)
        kept_out = forward(*select_rows(args, kept, batch), **select_rows(kwargs, kept, batch))
        out = kept_out.new_zeros((batch, *kept_out.shape[1:]))
        out[kept.to(out.device)] = kept_out
        del kept_out
        self.patch.rows = slice(None)
        try:
            smoothed_args, smoothed_kwargs = select_rows(args, rows, batch), select_rows(kwargs, rows, batch)
            out[rows.to(out.device)] = forward(*smoothed_args, **smoothed_kwargs)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            self._step_failed = True
        finally:
            self.patch.rows = None
        return out

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self._step
        if not self._recording or step is None or not args or not isinstance(args[0], torch.Tensor):
            return
        record = CallRecord(args, kwargs)
        self._records.append(record)
        start, self._offset = self._offset, self._offset + record.rows
        if not step.inserted:
            return
        # the calls cover the step's rows in order: find the smoothed rows inside this one
        first = step.cond_rows
        smoothed = [
            row - start for row in range(first, first + step.inserted) if start <= row < start + record.rows
        ]
        self.patch.rows = smoothed or None
        self._call_rows = (smoothed, record.rows) if smoothed else None
        if self.prefix is not None and smoothed:
            sources = [self._source_row(step, row + start) - start for row in smoothed]
            inside = all(0 <= source < record.rows for source in sources)
            self.prefix.plan = (smoothed, sources) if inside else None

    def _after_call(self, module: nn.Module, args: tuple, output) -> None:
        self.patch.rows = None
        self._call_rows = None
        if self.prefix is not None:
            self.prefix.plan = None

    @staticmethod
    def _source_row(step: _Step, row: int) -> int:
        """Row (in the step's layout with inserted rows) that inserted ``row`` copies."""
        index = row - step.cond_rows
        if step.inserted_source == BRANCH_UNCOND:
            return step.cond_rows + step.inserted + index
        return index

    # -- callbacks ---------------------------------------------------------------------------
    def on_denoiser(self, params) -> None:
        """CFGDenoiserParams time: decide whether this step is guided; put the smoothed rows into
        the webui's batch where its layout allows it; arm the call recorder."""
        self._step, self._term, self._records, self._offset = None, None, [], 0
        self._step_failed = False
        settings = self.settings
        if not is_active_step(
            params.sampling_step, params.total_sampling_steps, settings.start, settings.end
        ):
            return
        denoiser = params.denoiser
        model = getattr(denoiser, "inner_model", None)
        if not isinstance(model, nn.Module):
            self._warn_once("the denoiser has no model to call; SEG skipped")
            return
        self._hook_model(model)
        batch = batch_size_of(params.text_uncond)
        cond_rows = int(params.x.shape[0]) - batch
        try:
            weights = cond_weights(denoiser, batch, cond_rows)
        except ValueError as error:
            self._warn_once(f"step left unguided: {error}")
            return
        step = _Step(denoiser, model, batch, cond_rows, weights)
        if self.one_call and self._one_call_allowed(denoiser):
            self._insert_smoothed_rows(params, step)
        if self.prefix is not None:
            step.shared_before = self.prefix.shared_calls
        self._step = step
        self._recording = True

    def _one_call_allowed(self, denoiser) -> bool:
        reason = why_not_one_call(self.settings.unet, denoiser)
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            log.info("SEG: smoothed rows in a separate call: %s", reason)
        return reason is None

    def _insert_smoothed_rows(self, params, step: _Step) -> None:
        source = smoothed_source(self.settings.branch, True)
        if source == BRANCH_UNCOND:
            if token_length_of(params.text_cond) != token_length_of(params.text_uncond):
                return  # the webui runs these rows in separate calls: no room for ours
            rows = torch.arange(step.cond_rows, step.cond_rows + step.batch)
            text = params.text_uncond
        else:
            rows = torch.arange(step.cond_rows)
            text = params.text_cond
        at = step.cond_rows
        params.x = insert_rows(params.x, rows, at)
        params.sigma = insert_rows(params.sigma, rows, at)
        if isinstance(params.image_cond, torch.Tensor) and params.image_cond.shape[0] == params.x.shape[
            0
        ] - len(rows):
            params.image_cond = insert_rows(params.image_cond, rows, at)
        params.text_cond = concat_rows([params.text_cond, text])
        step.inserted, step.inserted_source = len(rows), source

    def on_denoised(self, x_out: torch.Tensor) -> None:
        """CFGDenoisedParams time: the smoothed predictions, and the SEG term for this step."""
        self._recording = False
        step, self._step = self._step, None
        if step is None:
            return
        try:
            self._term = self._smoothed_term(step, x_out)
            self._term_denoiser = step.denoiser
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
        denoiser = self._term_denoiser
        if getattr(denoiser, "mask", None) is not None and not getattr(
            denoiser, "mask_before_denoising", False
        ):
            # the webui has already blended the kept area back in: guide only what it regenerates
            term = term * denoiser.nmask
        return denoised + term.to(denoised.dtype)

    # -- the smoothed rows ---------------------------------------------------------------------
    def _webui_calls(self, step: _Step) -> tuple[list[CallRecord], bool]:
        """The webui's own calls of this step (calls after them belong to other extensions) and
        whether they included the negative rows."""
        full = step.cond_rows + step.inserted + step.batch
        without_uncond = step.cond_rows + step.inserted
        total, found, has_uncond = 0, None, False
        for index, record in enumerate(self._records):
            total += record.rows
            if total == full:
                found, has_uncond = index + 1, True
                break
            if total == without_uncond and found is None:
                found = index + 1
        if found is None:
            raise ValueError(f"the model calls cover {total} rows, expected {full} or {without_uncond}")
        return self._records[:found], has_uncond

    def _smoothed_term(self, step: _Step, x_out: torch.Tensor) -> torch.Tensor | None:
        if self._step_failed:
            self._warn_once("out of memory also for SEG's rows on their own: steps without room are "
                            "left unguided")  # fmt: skip
            return None
        records, has_uncond = self._webui_calls(step)
        source = smoothed_source(self.settings.branch, has_uncond)
        if step.inserted and step.inserted_source == source:
            first = step.cond_rows
            smoothed = x_out[first : first + step.inserted]
            source_rows = [self._source_row(step, row) for row in range(first, first + step.inserted)]
            shared = self.prefix is not None and self.prefix.shared_calls > step.shared_before
            path = PATH_SHARED_PREFIX if shared else PATH_ONE_CALL
        else:
            # rows not in the webui's call (or copies of a negative pass the webui then skipped):
            # evaluate them in one extra call from the recorded inputs
            layout_rows = step.cond_rows + step.inserted
            source_rows = list(range(layout_rows, layout_rows + step.batch) if source == BRANCH_UNCOND else
                               range(step.cond_rows))  # fmt: skip
            args, kwargs = gather_call(records, source_rows)
            self.patch.rows = slice(None)
            try:
                with torch.no_grad():
                    smoothed = step.model(*args, **kwargs)
            finally:
                self.patch.rows = None
            path = PATH_SEPARATE
        if self.patch.failure is not None:
            self._warn_once(self.patch.failure)
            return None
        difference = x_out[source_rows] - smoothed.to(x_out.dtype)
        self.paths[path] += 1
        if source == BRANCH_UNCOND:
            return difference * self.settings.scale
        term = torch.zeros_like(x_out[: step.batch])
        row = 0
        for image, image_weights in enumerate(step.weights):
            norm = sum(abs(w) for w in image_weights) or 1.0
            for weight in image_weights:
                term[image] += difference[row] * (weight / norm)
                row += 1
        return term * self.settings.scale
