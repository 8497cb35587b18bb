"""What SEG must know of a diffusion-transformer family: pure facts, no webui imports.

A family says which block lists the model has (and the side names users give them), which blocks
``middle`` stands for, how to read one model call's image token layout from that call's inputs
(the model's own patchification of the latent, never √N), and which submodules of a block run
the image's *self*-attention (a block's cross-attention to the text is never smoothed).

Each family is one small module beside this one (``flux.py``, ``qwen_image.py``, …) holding a
``Family`` subclass instance; ``transformers/__init__.py`` lists them in detection order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import BLOCK


@dataclass(frozen=True)
class CallLayout:
    """Where one model call's image tokens sit in the token sequence of its attentions.

    ``frames`` × ``height`` × ``width`` image tokens, row-major per frame, frames one after
    another (1 frame for an image model); ``before`` tokens (text, registers) precede them in a
    joint attention. Tokens after the image (reference images, padding) are never blurred."""

    frames: int
    height: int
    width: int
    before: int = 0

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width


class Family(ABC):
    """A diffusion-transformer family. Subclasses override what differs from Flux's conventions.

    ``sides``: ``(side, attribute)`` pairs, the side being the name users write (``double``,
    ``single``, ``joint``, ``block``) and the attribute the model's ``ModuleList``.
    ``default_blocks``: what ``middle`` means on the real model (with the reason in the family's
    module). ``follows_depth``: the field has no convention for the family, so ``middle`` is SD3's
    choice carried to the loaded model's depth (``default_at_depth`` of its first block list), and
    ``default_blocks`` is what that gives on the real model."""

    name: str = "?"
    sides: tuple[tuple[str, str], ...] = ()
    default_blocks: str = ""
    follows_depth: bool = False

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """True when ``model`` (the webui's diffusion model object) is of this family."""

    def default(self, model: nn.Module) -> str:
        """The blocks ``middle`` stands for on ``model``."""
        if not self.follows_depth:
            return self.default_blocks
        side, attribute = self.sides[0]
        return default_at_depth(len(getattr(model, attribute)), side)

    @abstractmethod
    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        """The image token layout of the call ``model(*args, **kwargs)``."""

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        """The submodules of ``block`` inside which every kernel call is an image self-attention
        (joint or image-only); the block itself when it has no cross-attention."""
        return [block]

    def image_start(self, layout: CallLayout, tokens: int) -> int:
        """Where the image tokens start in an attention over ``tokens`` tokens: an image-only
        attention holds exactly them; a joint one has ``layout.before`` tokens first."""
        return 0 if tokens == layout.image_tokens else layout.before

    def __repr__(self) -> str:
        return f"<transformer family {self.name}>"


def call_argument(args: tuple, kwargs: dict, name: str, position: int, default=None):
    """A model call's argument by keyword or position (``forward(x, timestep, context, ...)``)."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def latent_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return call_argument(args, kwargs, "x", 0)


def padded_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """The token grid of a latent padded up to a multiple of ``patch`` (Forge's
    ``pad_to_patch_size``) and cut into ``patch`` × ``patch`` tiles."""
    return -(-height // patch), -(-width // patch)


def is_module_list(model: object, attribute: str) -> bool:
    return isinstance(getattr(model, attribute, None), nn.ModuleList)


def default_at_depth(count: int, side: str = BLOCK, fraction: float = 0.3, span: int = 3) -> str:
    """``block a-b`` (or another ``side``): ``span`` consecutive blocks starting at ``fraction`` of a
    ``count``-block list, SD3's Skip-Layer-Guidance choice (joint 7-9 of 24: from 0.3 of the depth)
    carried over to a block list of any depth."""
    if count <= 0:
        return f"{side} 0"
    first = min(round(fraction * count), max(count - span, 0))
    last = min(first + span - 1, count - 1)
    return f"{side} {first}" if first == last else f"{side} {first}-{last}"
