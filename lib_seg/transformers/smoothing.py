"""The query blur inside one smoothed evaluation of a diffusion transformer.

Smoothed self-attention blurs the **image tokens' queries** over the image token grid right
before the attention kernel, i.e. after the QK-norm and after RoPE: the logits are
``q_rope · k_rope``, and Prop. 3.1 (blurring the logits along the query axis = blurring the
queries) holds for what is multiplied. Text queries, tokens after the image (reference images,
padding), keys and values are untouched. A video's frames are blurred each over its own grid.
The host's kernels are handed in as ``KernelSlot`` s (a name in a module's globals the blocks call;
``backends/model_patcher/forge.py`` finds them), or as an ``AttentionOverride`` (ComfyUI: a
function put in each model call's ``transformer_options`` that its attention kernels call
through).

In a separate evaluation every row of the call is smoothed; when SEG's smoothed rows ride in the
webui's own call (``backends/shared_batch``), only the rows from the first copy on are."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from ..blur import blur_queries, is_identity_sigma
from .family import CallLayout, Family, latent_of


@dataclass(frozen=True)
class KernelSlot:
    """A name in a module namespace that the chosen blocks call as their attention kernel, with
    the queries as first argument and the token axis second to last."""

    namespace: MutableMapping[str, object]
    name: str


@dataclass(frozen=True)
class AttentionOverride:
    """A key of a model call's ``transformer_options`` through which the host's attention kernels
    call, as ``override(kernel, q, *args, **kwargs)`` (ComfyUI's ``optimized_attention_override``).
    SEG's override is put in a copy of the options of each call it smooths, before any override
    already there, which it then calls in turn."""

    key: str


class TransformerSmoothing:
    """Blurs the image-token queries of the chosen blocks during one model evaluation.

    Nothing is in place outside ``applied()``: the webui's own cond/uncond evaluation never meets
    a hook or a replaced kernel. Inside it, a forward pre-hook on the diffusion model reads the
    call's token layout, hooks on the chosen blocks' self-attention scopes mark when their
    attention runs, and each kernel slot holds a wrapper that blurs the queries of those calls
    only. Everything is put back on exit, also after an exception or an interrupt."""

    def __init__(self, model: nn.Module, family: Family, blocks: list[nn.Module],
                 slots: list[KernelSlot | AttentionOverride], sigma: float):  # fmt: skip
        self.model = model
        self.family = family
        self.blocks = blocks
        self.scopes = [scope for block in blocks for scope in family.attention_scopes(block)]
        self.slots = _unique([slot for slot in slots if isinstance(slot, KernelSlot)])
        self.overrides = list(dict.fromkeys(slot for slot in slots if isinstance(slot, AttentionOverride)))
        self.sigma = float(sigma)
        self.layout: CallLayout | None = None
        self.rows = 0  # the batch rows of the model call being run
        self.first_row = 0  # rows before it are the webui's own: never blurred
        self._inside = 0
        self.blurred_calls = 0

    def evaluate(self, evaluate: Callable, args: dict, conds) -> torch.Tensor:
        """The smoothed prediction for ``conds`` through the webui's batch evaluator."""
        with self.rows_smoothed(0):
            options = args["model_options"]
            return evaluate(args["model"], conds, None, args["input"], args["sigma"], options)[0]

    @contextlib.contextmanager
    def rows_smoothed(self, first_row: int) -> Iterator[None]:
        """Within: the model calls smooth their rows from ``first_row`` on; RuntimeError on exit
        when none of them reached the kernel (e.g. blocks run as copies by an offloader, or
        fused)."""
        blurred_before = self.blurred_calls
        with self.applied(first_row):
            yield
        if self.blurred_calls == blurred_before:
            raise RuntimeError(f"the chosen blocks' attention never reached the kernel SEG wraps (this "
                               f"{self.family.name} model runs its blocks or attention another "
                               "way)")  # fmt: skip

    @contextlib.contextmanager
    def applied(self, first_row: int = 0) -> Iterator[None]:
        handles = []
        originals: list[tuple[KernelSlot, object]] = []
        self.first_row = first_row
        try:
            handles.append(self.model.register_forward_pre_hook(self._read_call, with_kwargs=True))
            for scope in self.scopes:
                handles.append(scope.register_forward_pre_hook(self._enter))
                handles.append(scope.register_forward_hook(self._leave))
            for slot in self.slots:
                original = slot.namespace[slot.name]
                originals.append((slot, original))
                slot.namespace[slot.name] = self._wrap(original)
            yield
        finally:
            for slot, original in reversed(originals):
                slot.namespace[slot.name] = original
            for handle in handles:
                handle.remove()
            self._inside = 0
            self.layout = None
            self.rows = self.first_row = 0

    # -- hooks ---------------------------------------------------------------------------------
    def _read_call(self, module, args, kwargs):
        self.layout = self.family.layout(module, args, kwargs)
        self.rows = int(latent_of(args, kwargs).shape[0])
        options = kwargs.get("transformer_options")
        if not self.overrides or not isinstance(options, dict):
            return None  # no options to carry the override: no kernel call is reached, as reported
        options = dict(options)
        for override in self.overrides:
            options[override.key] = self._override(options.get(override.key))
        return args, {**kwargs, "transformer_options": options}

    def _enter(self, module, args):
        self._inside += 1

    def _leave(self, module, args, output):
        self._inside -= 1

    def _wrap(self, kernel: Callable) -> Callable:
        def smoothed_kernel(q, *args, **kwargs):
            if self._inside > 0:
                q = self.blur_image_queries(q)
            return kernel(q, *args, **kwargs)

        return smoothed_kernel

    def _override(self, previous: Callable | None) -> Callable:
        def seg_attention_override(kernel, q, *args, **kwargs):
            if self._inside > 0:
                q = self.blur_image_queries(q)
            if previous is not None:
                return previous(kernel, q, *args, **kwargs)
            return kernel(q, *args, **kwargs)

        return seg_attention_override

    def blur_image_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` (..., tokens, channels) with its image tokens blurred, each frame over its grid."""
        layout = self.layout
        if layout is None:
            raise RuntimeError("a smoothed block ran outside a call of its diffusion model")
        tokens = q.shape[-2]
        image = layout.image_tokens
        start = self.family.image_start(layout, tokens)
        if start < 0 or start + image > tokens:
            raise ValueError(f"an attention over {tokens} tokens cannot hold {layout.before} text "
                             f"tokens and a {_grid_words(layout)} image grid")  # fmt: skip
        self.blurred_calls += 1
        if is_identity_sigma(self.sigma):
            return q
        first = self.first_row
        if first:
            if q.shape[0] != self.rows:
                raise ValueError(f"attention queries arrive as {q.shape[0]} rows for a call of "
                                 f"{self.rows}; SEG cannot tell its rows apart")  # fmt: skip
            return torch.cat((q[:first], self._blur_span(q[first:], start, image, tokens)))
        return self._blur_span(q, start, image, tokens)

    def _blur_span(self, q: torch.Tensor, start: int, image: int, tokens: int) -> torch.Tensor:
        layout = self.layout
        span = q[..., start : start + image, :]
        frames = span.reshape(*span.shape[:-2], layout.frames, layout.height * layout.width, span.shape[-1])
        blurred = blur_queries(frames, layout.height, layout.width, self.sigma).reshape(span.shape)
        if tokens == image:
            return blurred
        return torch.cat((q[..., :start, :], blurred, q[..., start + image :, :]), dim=-2)


def _grid_words(layout: CallLayout) -> str:
    grid = f"{layout.height}x{layout.width}"
    return grid if layout.frames == 1 else f"{layout.frames}x{grid}"


def _unique(slots: list[KernelSlot]) -> list[KernelSlot]:
    seen, unique = set(), []
    for slot in slots:
        key = (id(slot.namespace), slot.name)
        if key not in seen:
            seen.add(key)
            unique.append(slot)
    return unique
