"""Forge family: SEG's smoothed rows inside the webui's own batched evaluation of a step.

Forge (``backend/``), reForge and Forge Classic evaluate a step's conditioning entries as *chunks*:
one chunk is one entry (the negative prompt, one AND part of the prompt) for every image of the
batch. Their batch evaluator (``calc_cond_uncond_batch``; reForge ``calc_cond_batch``) puts as many
chunks into one model call as its memory estimate allows, and hands each call to
``model_options["model_function_wrapper"]`` with the chunks' kinds (``cond_or_uncond``: 0 for a
prompt chunk, 1 for a negative one).

SEG's wrapper appends to such a call a copy of every chunk of the kind SEG smooths this step. The
copies' queries are blurred, and only theirs (``RowSmoothing``): on a UNet by an attn1 replace
patch that exists only in the enlarged call's options and touches only the rows from ``ROWS_KEY``
on (``Attn1Rows``); on a diffusion transformer, which takes no patches, by SEG's kernel wrapper,
in place during the enlarged call only (``TransformerRows``). The webui gets back exactly the rows
it asked for, and the copies' predictions are averaged the way the webui averages its entries. The
blocks before the first smoothed block are shared between a row and its copy (``prefix_sharing``)
where that is provably valid.

A plan made right before the step's evaluation (``plan``) fixes the kind and checks that the
webui's average is known: every entry of that kind covers the whole image at every step with one
strength (no regional areas or masks, AND parts of equal weight), and no other extension replaces
the attention of a smoothed block or wraps the model call. A step without a plan, or whose copies
did not all come back, is evaluated separately by the caller, as before.

Memory: the webui sized its call without SEG's rows. The enlarged call is made only when the
webui's own estimate for it fits the free memory the webui reports (``fits``); otherwise, or when
the enlarged call runs out of memory after all, the webui's call runs as it was and the copies run
in calls of their own right after it (one chunk at a time when all of them do not fit).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...blur import blur_queries
from ...grid import token_grid
from ...guidance import BRANCH_UNCOND, smoothed_source
from ...memory import free_cached_memory, is_out_of_memory
from ..batch_rows import select_rows
from .compiled import is_compiled

log = logging.getLogger("sd_webui_seg")

ROWS_KEY = "sd_webui_seg_first_smoothed_row"  # in an enlarged call's transformer_options
COND, UNCOND = 0, 1  # the webuis' chunk kinds
PATH_SHARED_PREFIX = "shared-prefix"
PATH_ONE_CALL = "one-call"
PATH_SEPARATE = "separate"
# entry keys that make a chunk's weight vary over the image or skip steps (regional prompting)
SHAPED_ENTRY_KEYS = ("area", "mask", "timestep_start", "timestep_end", "default", "hooks")


def why_not_plain(entries: Sequence[dict]) -> str | None:
    """None when the webui's average over ``entries`` is a plain equal-weight mean of one chunk
    per entry, else the reason."""
    for entry in entries:
        for key in SHAPED_ENTRY_KEYS:
            if entry.get(key) is not None:
                return f"a conditioning entry has '{key}' (regional prompting)"
    if len({float(entry.get("strength", 1.0)) for entry in entries}) > 1:
        return "the AND parts of the prompt have different weights"
    return None


def foreign_attn1_replace(transformer_options: dict, keys: Sequence[tuple[str, int]]) -> str | None:
    """The key of another extension's attn1 replace patch on a smoothed block, if any: its
    attention must run for the webui's rows, and SEG's for the copies, in one call."""
    chosen = set(keys)
    for key in transformer_options.get("patches_replace", {}).get("attn1", {}):
        if tuple(key[:2]) in chosen:
            return str(tuple(key))
    return None


def append_rows(value, rows: torch.Tensor, batch: int):
    """``value`` with copies of its rows ``rows`` appended to every batch-sized tensor inside it
    (tensors, lists, tuples, dicts); anything else is passed through."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return torch.cat([value, value.index_select(0, rows.to(value.device))])
        return value
    if isinstance(value, dict):
        return {key: append_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(append_rows(item, rows, batch) for item in value)
    return value


def options_for_chunks(transformer_options: dict, order: list[int], kinds: list, chunk_rows: int) -> dict:
    """A copy of a call's transformer options for a call made of the call's chunks ``order``
    (indices into ``kinds``, repeats being SEG's copies): the layout keys the webuis write are
    rewritten to match."""
    options = dict(transformer_options)
    call_kinds = [kinds[i] for i in order]
    options["cond_or_uncond"] = call_kinds
    if "uuids" in options:  # reForge
        options["uuids"] = [options["uuids"][i] for i in order]
    row_kinds = [kind for kind in call_kinds for _ in range(chunk_rows)]
    mark = options.get("cond_mark")
    if isinstance(mark, torch.Tensor):  # Forge, Forge Classic
        options["cond_mark"] = torch.tensor(row_kinds, dtype=mark.dtype, device=mark.device)
    if "cond_indices" in options:
        options["cond_indices"] = [row for row, kind in enumerate(row_kinds) if kind == COND]
        options["uncond_indices"] = [row for row, kind in enumerate(row_kinds) if kind != COND]
    return options


def chunk_rows_of(chunks: list[int], chunk_rows: int, device) -> torch.Tensor:
    """The call's row indices of ``chunks``."""
    return torch.tensor([i * chunk_rows + r for i in chunks for r in range(chunk_rows)], device=device)


def make_rows_attn1_replace(sigma: float, attention: Callable) -> Callable:
    """An attn1 replace patch that blurs the queries of the rows from ``extra_options[ROWS_KEY]``
    on and runs the webui's attention over every row."""

    def seg_rows_attention(q, k, v, extra_options):
        first = extra_options[ROWS_KEY]
        batch, _, latent_h, latent_w = extra_options["original_shape"]
        if q.shape[0] != batch:
            raise ValueError(f"attn1 queries arrive as {q.shape[0]} rows for {batch} images (tiled by "
                             "another extension); SEG cannot blur them")  # fmt: skip
        height, width = token_grid(q.shape[-2], latent_h, latent_w)
        smoothed = q[first:]
        blurred = blur_queries(smoothed, height, width, sigma)
        if blurred is not smoothed:
            if q.requires_grad:
                q = q.clone()
            q[first:] = blurred
        precision = extra_options.get("attn_precision")
        extra = {} if precision is None else {"attn_precision": precision}
        return attention(q, k, v, extra_options["n_heads"], **extra)

    return seg_rows_attention


class Attn1Rows:
    """UNets: an attn1 replace patch on the smoothed blocks, in the enlarged call's options only."""

    def __init__(self, sigma: float, keys: Sequence[tuple[str, int]], attention: Callable):
        self.keys = list(keys)
        self.patch = make_rows_attn1_replace(sigma, attention)

    def foreign(self, transformer_options: dict) -> str | None:
        foreign = foreign_attn1_replace(transformer_options, self.keys)
        return (
            None
            if foreign is None
            else f"another extension replaces the attention of a smoothed block {foreign}"
        )

    def options(self, transformer_options: dict, first: int) -> dict:
        options = dict(transformer_options)
        replace = dict(options.get("patches_replace", {}))
        attn1 = dict(replace.get("attn1", {}))
        attn1.update(dict.fromkeys(self.keys, self.patch))
        replace["attn1"] = attn1
        options["patches_replace"] = replace
        options[ROWS_KEY] = first
        return options

    def smoothed(self, first: int):
        return contextlib.nullcontext()


class TransformerRows:
    """Diffusion transformers: SEG's kernel wrapper (``transformers.TransformerSmoothing``), in
    place during the enlarged call, blurs the rows from the first copy on."""

    def __init__(self, smoothing):
        self.smoothing = smoothing

    def foreign(self, transformer_options: dict) -> str | None:
        return None

    def options(self, transformer_options: dict, first: int) -> dict:
        return transformer_options

    def smoothed(self, first: int) -> contextlib.AbstractContextManager:
        return self.smoothing.rows_smoothed(first)


@dataclass
class StepPlan:
    """One step's smoothed rows: which kind is copied, and what came back."""

    source: str  # guidance.BRANCH_COND / BRANCH_UNCOND
    kind: int
    entries: int
    strength: float
    model: object
    armed: bool = True
    outputs: list = field(default_factory=list)
    paths: set = field(default_factory=set)
    error: Exception | None = None
    out_of_memory: bool = False


class SharedBatch:
    """SEG's rows in the webui's own model calls, for one sampling pass."""

    def __init__(
        self,
        rows: Attn1Rows | TransformerRows,
        fits: Callable[[object, list, torch.device], bool],
        prefix=None,
        note: Callable[[str], None] | None = None,
    ):
        self.rows = rows
        self.fits = fits
        self.prefix = prefix  # prefix_sharing.PrefixSharing or None
        self.note = note or (lambda message: log.info("SEG: %s", message))
        self.plan: StepPlan | None = None
        self.wrapper: Callable | None = None  # the model_function_wrapper installed with this pass
        self.enlarge = True  # False after an out-of-memory error: copies get calls of their own
        self._noted: set[str] = set()

    def _note_once(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            self.note(message)

    # -- planning (right before the webui's evaluation of a step) -----------------------------
    def make_plan(self, model, cond, uncond, model_options: dict, branch: str) -> None:
        self.plan = None
        if model_options.get("model_function_wrapper") is not self.wrapper:
            self._note_once("another extension wraps the model call (e.g. MultiDiffusion): the smoothed "
                            "rows are evaluated separately")  # fmt: skip
            return
        if is_compiled(model):
            self._note_once("the model call is compiled (torch.compile): the smoothed rows are evaluated "
                            "separately, uncompiled")  # fmt: skip
            return
        source = smoothed_source(branch, bool(uncond))
        entries = uncond if source == BRANCH_UNCOND else cond
        reason = why_not_plain(entries or [])
        foreign = self.rows.foreign(model_options.get("transformer_options", {}))
        if foreign is not None:
            reason = foreign
        if not entries or reason is not None:
            self._note_once(f"{reason}: the smoothed rows are evaluated separately")
            return
        self.plan = StepPlan(source, UNCOND if source == BRANCH_UNCOND else COND, len(entries),
                             float(entries[0].get("strength", 1.0)), model)  # fmt: skip

    def disarm(self) -> None:
        """The webui's own evaluation of the step is over: later calls (other guidance's) are
        left alone."""
        if self.plan is not None:
            self.plan.armed = False

    def take(self, source: str) -> tuple[torch.Tensor, str] | None:
        """The step's smoothed prediction and the path it took, or None for a separate
        evaluation. Raises the error an enlarged call met (the caller stops guidance)."""
        plan, self.plan = self.plan, None
        if plan is None:
            return None
        if plan.error is not None:
            raise plan.error
        if plan.out_of_memory:
            raise RuntimeError("out of memory evaluating SEG's rows in the webui's model call")
        if plan.source != source or len(plan.outputs) != plan.entries:
            return None
        total = torch.zeros_like(plan.outputs[0])
        count = torch.full_like(total, 1e-37)  # the webuis' running count starts there
        for output in plan.outputs:
            total += output * plan.strength
            count += plan.strength
        path = next(p for p in (PATH_SEPARATE, PATH_ONE_CALL, PATH_SHARED_PREFIX) if p in plan.paths)
        return total / count, path

    # -- the webui's model calls -----------------------------------------------------------
    def wrap(self, apply_model: Callable, args: dict) -> torch.Tensor:
        x, timestep, c, kinds = args["input"], args["timestep"], args["c"], list(args["cond_or_uncond"])
        plan = self.plan
        chunks = len(kinds)
        if plan is None or not plan.armed or plan.error is not None or not chunks or x.shape[0] % chunks:
            return apply_model(x, timestep, **c)
        sources = [index for index, kind in enumerate(kinds) if kind == plan.kind]
        if not sources:
            return apply_model(x, timestep, **c)
        chunk_rows = x.shape[0] // chunks
        rows = chunk_rows_of(sources, chunk_rows, x.device)
        batch = x.shape[0]
        if self.enlarge and self.fits(plan.model, [batch + len(rows), *x.shape[1:]], x.device):
            try:
                out = self._enlarged_call(plan, apply_model, x, timestep, c, kinds, sources, rows)
            except Exception as error:
                if not is_out_of_memory(error):
                    plan.error = error
                    return apply_model(x, timestep, **c)  # the webui's call as it was
                self.enlarge = False
                self._note_once("out of memory with SEG's rows in the webui's model call: this pass "
                                "evaluates them in calls of their own")  # fmt: skip
                free_cached_memory()
            else:
                plan.outputs.extend(out[batch:].chunk(len(sources)))
                return out[:batch]
        out = apply_model(x, timestep, **c)
        try:
            plan.outputs.extend(self._own_calls(plan, apply_model, x, timestep, c, kinds, sources))
            plan.paths.add(PATH_SEPARATE)
        except Exception as error:
            if is_out_of_memory(error):
                plan.out_of_memory = True
                free_cached_memory()
            else:
                plan.error = error
        return out

    def _options(self, c: dict, order: list[int], kinds: list, chunk_rows: int, first: int) -> dict:
        options = options_for_chunks(c.get("transformer_options", {}), order, kinds, chunk_rows)
        return self.rows.options(options, first)

    def _enlarged_call(self, plan, apply_model, x, timestep, c, kinds, sources, rows):
        batch = x.shape[0]
        order = list(range(len(kinds))) + sources
        options = self._options(c, order, kinds, batch // len(kinds), first=batch)
        enlarged = {key: value if key in ("transformer_options", "control_model") else
                    append_rows(value, rows, batch) for key, value in c.items()}  # fmt: skip
        enlarged["transformer_options"] = options
        prefix = self.prefix
        sharing = prefix.sharing(batch, rows, options) if prefix is not None else contextlib.nullcontext()
        with sharing as shared, self.rows.smoothed(batch):
            out = apply_model(append_rows(x, rows, batch), append_rows(timestep, rows, batch), **enlarged)
        plan.paths.add(PATH_SHARED_PREFIX if shared else PATH_ONE_CALL)
        if prefix is not None and not shared and prefix.reason is None:
            why = prefix.why_not(options) or "a call inside another"
            self._note_once(f"no blocks shared with the smoothed rows: {why}")
        return out

    def _own_calls(self, plan, apply_model, x, timestep, c, kinds, sources) -> list[torch.Tensor]:
        """The copies without the webui's rows: all in one call when the estimate allows."""
        batch = x.shape[0]
        chunk_rows = batch // len(kinds)
        together = self.fits(plan.model, [len(sources) * chunk_rows, *x.shape[1:]], x.device)
        groups = [sources] if together else [[source] for source in sources]
        outputs = []
        for group in groups:
            rows = chunk_rows_of(group, chunk_rows, x.device)
            options = self._options(c, group, kinds, chunk_rows, first=0)
            own = {key: value if key in ("transformer_options", "control_model") else
                   select_rows(value, rows, batch) for key, value in c.items()}  # fmt: skip
            own["transformer_options"] = options
            with self.rows.smoothed(0):
                out = apply_model(select_rows(x, rows, batch), select_rows(timestep, rows, batch), **own)
            outputs.extend(out.chunk(len(group)))
        return outputs

    def close(self) -> None:
        self.plan = None
        if self.prefix is not None:
            self.prefix.remove()
