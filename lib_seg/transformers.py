"""SEG on diffusion transformers (Flux, Chroma, SD3.5 as Forge builds them): which blocks, which
tokens, and the query blur inside one smoothed evaluation. Pure torch; the webui's attention
kernels are handed in as ``KernelSlot`` s (``backends/forge.py`` finds them).

Method (``docs/transformers.md`` has the reasons):

- smoothed self-attention blurs the **image tokens' queries** over the image token grid right
  before the attention kernel, i.e. after the QK-norm and after RoPE: the logits are
  ``q_rope · k_rope``, and Prop. 3.1 (blurring the logits along the query axis = blurring the
  queries) holds for what is multiplied. Text queries, tokens after the image (reference images),
  keys and values are untouched;
- the grid is the model's own patchification of the call's latent (Flux and Chroma pad to even
  and take 2×2 patches: ``((h + 1) // 2, (w + 1) // 2)``; SD3's patch embedder is a stride-p conv:
  ``(h // p, w // p)``), never √N;
- the text tokens come first in every joint attention (Flux: ``cat(txt, img)``; SD3:
  ``cat(context, x)`` with its register tokens in front); an attention over exactly the image
  tokens (SD3.5's extra x-only self-attention) blurs them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from .blur import blur_queries, is_identity_sigma
from .layers import DOUBLE, JOINT, SINGLE, TRANSFORMER_SIDES, LayerSelection, format_indices, parse_layers


@dataclass(frozen=True)
class Family:
    """A diffusion-transformer family: its block lists and the blocks ``middle`` stands for.

    The defaults follow the nearest convention in the field, ComfyUI's SkipLayerGuidanceDiT /
    SkipLayerGuidanceSD3 (blocks 7, 8, 9): early-middle blocks that carry layout more than detail,
    the role the UNet middle block plays in the paper."""

    name: str
    sides: tuple[tuple[str, str], ...]  # (side, attribute of the model holding that ModuleList)
    default: str

    def grid(self, model: nn.Module, latent_height: int, latent_width: int) -> tuple[int, int]:
        """The image token grid of a call whose latent is ``latent_height`` × ``latent_width``."""
        if self.name == SD3.name:
            patch = _patch_size(model)
            return latent_height // patch, latent_width // patch
        return (latent_height + 1) // 2, (latent_width + 1) // 2

    def text_tokens(self, model: nn.Module, context: torch.Tensor) -> int:
        """How many tokens precede the image tokens in a joint attention."""
        registers = int(getattr(model, "register_length", 0) or 0) if self.name == SD3.name else 0
        return registers + int(context.shape[1])


FLUX = Family("Flux", ((DOUBLE, "double_blocks"), (SINGLE, "single_blocks")), "double 7-9")
CHROMA = Family("Chroma", FLUX.sides, "double 7-9")
SD3 = Family("SD3", ((JOINT, "joint_blocks"),), "joint 7-9")


def _patch_size(model: nn.Module) -> int:
    embedder = getattr(model, "x_embedder", None)
    size = getattr(embedder, "patch_size", None) or getattr(model, "patch_size", 2)
    return int(size[0] if isinstance(size, tuple | list) else size)


def family_of(model: object) -> Family | None:
    """The family of a diffusion model, from its block lists, or None (not a transformer SEG knows)."""
    if not isinstance(model, nn.Module):
        return None
    if isinstance(getattr(model, "joint_blocks", None), nn.ModuleList):
        return SD3
    lists = (getattr(model, "double_blocks", None), getattr(model, "single_blocks", None))
    if all(isinstance(blocks, nn.ModuleList) for blocks in lists):
        return CHROMA if hasattr(model, "distilled_guidance_layer") else FLUX
    return None


def block_lists(model: nn.Module, family: Family) -> dict[str, nn.ModuleList]:
    return {side: getattr(model, attribute) for side, attribute in family.sides}


def describe_blocks(model: nn.Module, family: Family) -> str:
    """e.g. ``double 0-18, single 0-37``: the blocks this model has, for messages."""
    return ", ".join(
        f"{side} {format_indices(frozenset(range(len(blocks))))}" if len(blocks) else f"{side} (none)"
        for side, blocks in block_lists(model, family).items()
    )


def resolve_blocks(
    model: nn.Module, family: Family, selection: LayerSelection
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The chosen blocks as ``(qualified name, block)``, and the named blocks this model lacks
    (``"double 19-20"``, ``"input 7"``) so the user hears about them; a whole side of another
    kind of model (``input``, ``joint`` on Flux) just names nothing.

    ``middle`` is the family default here; ``all`` every block; UNet sides name nothing."""
    wanted = {side: selection.indices(side) for side in TRANSFORMER_SIDES}
    if selection.middle:
        default = parse_layers(family.default)
        for side in TRANSFORMER_SIDES:
            extra = default.indices(side)
            if wanted[side] is not None and extra:
                wanted[side] = wanted[side] | extra
    lists = block_lists(model, family)
    chosen: list[tuple[str, nn.Module]] = []
    missing: list[str] = []
    for side in TRANSFORMER_SIDES:
        indices = wanted[side]
        blocks = lists.get(side)
        if blocks is None:
            if indices:  # a whole side (``all``, ``joint``) of another family names nothing here
                missing.append(f"{side} {format_indices(indices)}")
            continue
        available = frozenset(range(len(blocks)))
        picked = available if indices is None else indices & available
        absent = frozenset() if indices is None else indices - available
        if absent:
            missing.append(f"{side} {format_indices(absent)}")
        attribute = dict(family.sides)[side]
        chosen.extend((f"{attribute}.{index}", blocks[index]) for index in sorted(picked))
    for side in ("input", "output"):
        indices = selection.indices(side)
        if indices:
            missing.append(f"{side} {format_indices(indices)}")
    return chosen, missing


@dataclass(frozen=True)
class KernelSlot:
    """A name in a module namespace that the chosen blocks call as their attention kernel, with
    the queries as first argument and the token axis second to last."""

    namespace: MutableMapping[str, object]
    name: str


class TransformerSmoothing:
    """Blurs the image-token queries of the chosen blocks during one model evaluation.

    Nothing is in place outside ``applied()``: the webui's own cond/uncond evaluation never meets
    a hook or a replaced kernel. Inside it, a forward pre-hook on the diffusion model reads the
    call's latent and text length, hooks on the chosen blocks mark when their attention runs, and
    each kernel slot holds a wrapper that blurs the queries of those calls only. Everything is put
    back on exit, also after an exception or an interrupt."""

    def __init__(self, model: nn.Module, family: Family, blocks: list[nn.Module], slots: list[KernelSlot],
                 sigma: float):  # fmt: skip
        self.model = model
        self.family = family
        self.blocks = blocks
        self.slots = _unique(slots)
        self.sigma = float(sigma)
        self.grid: tuple[int, int] | None = None
        self.text_tokens = 0
        self._inside = 0
        self.blurred_calls = 0

    def evaluate(self, evaluate: Callable, args: dict, conds) -> torch.Tensor:
        """The smoothed prediction for ``conds`` through the webui's batch evaluator."""
        with self.applied():
            options = args["model_options"]
            return evaluate(args["model"], conds, None, args["input"], args["sigma"], options)[0]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        handles = []
        originals: list[tuple[KernelSlot, object]] = []
        try:
            handles.append(self.model.register_forward_pre_hook(self._read_call, with_kwargs=True))
            for block in self.blocks:
                handles.append(block.register_forward_pre_hook(self._enter))
                handles.append(block.register_forward_hook(self._leave))
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
            self.grid = None

    # -- hooks ---------------------------------------------------------------------------------
    def _read_call(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        context = kwargs["context"] if "context" in kwargs else args[2]
        self.grid = self.family.grid(module, int(x.shape[-2]), int(x.shape[-1]))
        self.text_tokens = self.family.text_tokens(module, context)

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

    def blur_image_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` (..., tokens, channels) with its image tokens blurred over the image grid."""
        if self.grid is None:
            raise RuntimeError("a smoothed block ran outside a call of its diffusion model")
        height, width = self.grid
        image = height * width
        tokens = q.shape[-2]
        start = 0 if tokens == image else self.text_tokens
        if start + image > tokens:
            raise ValueError(f"an attention over {tokens} tokens cannot hold {self.text_tokens} text "
                             f"tokens and a {height}x{width} image grid")  # fmt: skip
        self.blurred_calls += 1
        if is_identity_sigma(self.sigma):
            return q
        blurred = blur_queries(q[..., start : start + image, :], height, width, self.sigma)
        if tokens == image:
            return blurred
        return torch.cat((q[..., :start, :], blurred, q[..., start + image :, :]), dim=-2)


def _unique(slots: list[KernelSlot]) -> list[KernelSlot]:
    seen, unique = set(), []
    for slot in slots:
        key = (id(slot.namespace), slot.name)
        if key not in seen:
            seen.add(key)
            unique.append(slot)
    return unique
