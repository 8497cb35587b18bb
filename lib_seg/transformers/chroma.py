"""Chroma: Flux's block layout and token order (``cat(txt, img)``, 2×2 patches of the padded
latent) with a distilled modulation network (``distilled_guidance_layer``) in place of Flux's
per-block modulation, which is how it is told apart. Default ``double 7-9``, as Flux."""

from __future__ import annotations

from torch import nn

from .family import is_module_list
from .flux import FluxFamily


class ChromaFamily(FluxFamily):
    name = "Chroma"

    def matches(self, model: nn.Module) -> bool:
        return (is_module_list(model, "double_blocks") and is_module_list(model, "single_blocks")
                and hasattr(model, "distilled_guidance_layer"))  # fmt: skip


CHROMA = ChromaFamily()
