"""Flux.2 (Klein 4B: 5 double-stream and 20 single-stream blocks, hidden 3072, 24 heads; Klein
9B: 8 and 24, hidden 4096, 32 heads; dev: 8 and 48, hidden 6144, 48 heads): Flux.1's block
layout and token order in Forge Neo's same ``IntegratedFluxTransformer2DModel``, built with one
modulation shared by all blocks (``global_modulation``: ``double_stream_modulation_img`` on the
model, no ``img_mod`` in the blocks), which is how it is told apart from Flux.1 and Chroma.

Grid: the latent has 128 channels (the VAE's 32 channels, 2×2-packed, at 1/16 of the image) and
the model's ``patch_size`` is 1, so an ``h × w`` latent gives ``h × w`` image tokens, row-major,
right after the text tokens (``patch_size`` is read from the model, the padding rule is Flux's).
Reference images (Neo's ``ref_latents``, also the img2img source unless ``klein_no_reference``)
are appended after the image tokens on their own RoPE index and are left alone.

Default ``double a-b``: no Skip-Layer-Guidance convention is published for Flux.2, so SD3's
``joint 7-9`` of 24 (from 0.3 of the depth, three blocks) is carried to the double-stream list,
the side Flux.1's ``double 7-9`` smooths: ``double 2-4`` on Klein 4B, Klein 9B and dev."""

from __future__ import annotations

from torch import nn

from .family import is_module_list
from .flux import FluxFamily, has_global_modulation


class Flux2Family(FluxFamily):
    name = "Flux.2"
    default_blocks = "double 2-4"  # of Klein 4B and 9B
    follows_depth = True  # on the double blocks, the side Flux.1's default uses
    default_patch = 1

    def matches(self, model: nn.Module) -> bool:
        return (is_module_list(model, "double_blocks") and is_module_list(model, "single_blocks")
                and not hasattr(model, "distilled_guidance_layer")
                and has_global_modulation(model))  # fmt: skip



FLUX2 = Flux2Family()
