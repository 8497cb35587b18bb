"""SEG on diffusion transformers: one small module per family (its block lists, token order,
grid and default blocks: pure facts, no webui imports), the block resolver and the query blur
inside one smoothed evaluation. ``docs/transformers.md`` has the method and its reasons.

Adding a family: write ``<family>.py`` with a ``Family`` subclass instance and put it in
``FAMILIES`` below (more specific families first: the first whose ``matches`` is true wins). The
webui's kernel for it is found by that webui's backend (``backends/model_patcher/forge.py``)."""

from __future__ import annotations

from torch import nn

from .anima import ANIMA
from .blocks import block_lists, describe_blocks, resolve_blocks
from .chroma import CHROMA
from .ernie import ERNIE_IMAGE
from .family import CallLayout, Family, default_at_depth
from .flux import FLUX
from .flux2 import FLUX2
from .krea import KREA2
from .lumina import LUMINA2, Z_IMAGE
from .qwen_image import QWEN_IMAGE
from .sd3 import SD3
from .smoothing import AttentionOverride, KernelSlot, TransformerSmoothing
from .wan import WAN

FAMILIES: tuple[Family, ...] = (SD3, CHROMA, FLUX2, FLUX, KREA2, QWEN_IMAGE, Z_IMAGE, LUMINA2,
                                 WAN, ANIMA, ERNIE_IMAGE)  # fmt: skip


def family_of(model: object) -> Family | None:
    """The family of a diffusion model, or None (not a transformer SEG knows)."""
    if not isinstance(model, nn.Module):
        return None
    return next((family for family in FAMILIES if _matches(family, model)), None)


def _matches(family: Family, model: nn.Module) -> bool:
    """A webui release whose layout moved never breaks detection: that family just does not match."""
    try:
        return bool(family.matches(model))
    except Exception:
        return False


__all__ = [
    "ANIMA",
    "CHROMA",
    "ERNIE_IMAGE",
    "FAMILIES",
    "FLUX",
    "FLUX2",
    "KREA2",
    "LUMINA2",
    "QWEN_IMAGE",
    "SD3",
    "WAN",
    "Z_IMAGE",
    "AttentionOverride",
    "CallLayout",
    "Family",
    "KernelSlot",
    "TransformerSmoothing",
    "block_lists",
    "default_at_depth",
    "describe_blocks",
    "family_of",
    "resolve_blocks",
]
