"""Flux.1 (dev, schnell, Kontext and the Flux-architecture fine-tunes): 19 double-stream blocks
over ``cat(txt, img)`` and 38 single-stream blocks over the same sequence.

Grid: Forge pads an odd latent side to even and takes 2×2 patches, so an ``h × w`` latent gives
``ceil(h/2) × ceil(w/2)`` image tokens, row-major, right after the text tokens. Flux Kontext's
reference-image tokens follow the image tokens and are left alone (another image, on its own grid).

Default ``double 7-9``: ComfyUI's Skip Layer Guidance (``SkipLayerGuidanceDiT``) perturbs blocks
7, 8 and 9 on Flux, the nearest convention for a guidance that contrasts the model with a weakened
attention pass; early-middle blocks carry layout more than detail, the role of the UNet's middle
block in the paper."""

from __future__ import annotations

from torch import nn

from ..layers import DOUBLE, SINGLE
from .family import CallLayout, Family, call_argument, is_module_list, latent_of, padded_grid


class FluxFamily(Family):
    name = "Flux"
    sides = ((DOUBLE, "double_blocks"), (SINGLE, "single_blocks"))
    default_blocks = "double 7-9"

    def matches(self, model: nn.Module) -> bool:
        return (is_module_list(model, "double_blocks") and is_module_list(model, "single_blocks")
                and not hasattr(model, "distilled_guidance_layer"))  # fmt: skip

    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        context = call_argument(args, kwargs, "context", 2)
        height, width = padded_grid(int(x.shape[-2]), int(x.shape[-1]), 2)
        return CallLayout(1, height, width, before=int(context.shape[1]))


FLUX = FluxFamily()
