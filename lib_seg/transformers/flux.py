"""Flux.1 (dev, schnell, Kontext, Krea-1 and the other Flux.1-architecture fine-tunes): 19
double-stream blocks over ``cat(txt, img)`` and 38 single-stream blocks over the same sequence,
each block with its own modulation.

Grid: the model pads an odd latent side up to its patch size and takes patch × patch tiles
(``patch_size``, 2 on Flux.1; Forge's older class has no attribute and uses 2), so an ``h × w``
latent gives ``ceil(h/2) × ceil(w/2)`` image tokens, row-major, right after the text tokens. Flux
Kontext's reference-image tokens follow the image tokens and are left alone (another image, on its
own grid). Flux.2 uses the same class in Forge Neo with one modulation shared by all blocks
(``global_modulation``): that is the ``Flux.2`` family, never this one.

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
    default_patch = 2  # when the model has no ``patch_size`` (Forge's Flux class)

    def matches(self, model: nn.Module) -> bool:
        return (is_module_list(model, "double_blocks") and is_module_list(model, "single_blocks")
                and not hasattr(model, "distilled_guidance_layer")
                and not has_global_modulation(model) and not is_hunyuan(model))  # fmt: skip

    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        context = call_argument(args, kwargs, "context", 2)
        patch = patch_size(model, self.default_patch)
        height, width = padded_grid(int(x.shape[-2]), int(x.shape[-1]), patch)
        return CallLayout(1, height, width, before=int(context.shape[1]))


def patch_size(model: nn.Module, default: int = 2) -> int:
    """The side of the model's square latent patches (``patch_size``; Flux.1 2, Flux.2 1)."""
    size = getattr(model, "patch_size", None) or default
    return int(size[0] if isinstance(size, tuple | list) else size)


def is_hunyuan(model: nn.Module) -> bool:
    """ComfyUI's HunyuanVideo / HunyuanImage 2.1 (double and single blocks too, but the image
    before the text: ``flipped_img_txt``, and a list ``patch_size``) and Hunyuan3D 2.0 (shape
    latents, no ``img_in``): not Flux's token layout."""
    blocks = model.double_blocks
    return (not isinstance(getattr(model, "img_in", None), nn.Module)
            or isinstance(getattr(model, "patch_size", None), list)
            or (len(blocks) > 0 and bool(getattr(blocks[0], "flipped_img_txt", False))))  # fmt: skip


def has_global_modulation(model: nn.Module) -> bool:
    """Flux.2: one modulation for all double blocks (``double_stream_modulation_img``) in place
    of each block's own (Forge Neo's ``global_modulation``)."""
    return (isinstance(getattr(model, "double_stream_modulation_img", None), nn.Module)
            or getattr(model, "global_modulation", False) is True)  # fmt: skip


FLUX = FluxFamily()
