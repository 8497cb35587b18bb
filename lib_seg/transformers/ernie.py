"""Ernie-Image (Baidu): 36 single-stream layers (``ErnieImageSharedAdaLNBlock``, 4096 wide, 32
heads of 128, one adaLN shared by all layers) over ``cat(image, text)``: the image tokens come
FIRST, then the text projected to the model width.

Grid: the patch embedder is a stride-p convolution (p = 1 for the released model, on Flux.2's
128-channel latent), so an ``h × w`` latent gives ``(h // p) × (w // p)`` image tokens, row-major,
starting at token 0; nothing precedes them. The text tokens after the image are never blurred.
The kernel receives q flattened to (B, tokens, heads·d), after the QK-norm and the 3-axis RoPE;
Neo passes no attention mask (the layers are called without one).

Default: no Skip-Layer-Guidance or other convention exists for Ernie-Image, so ``middle`` is
SD3's SLG choice (joint 7-9 of 24) carried to the depth: ``block 11-13`` of 36."""

from __future__ import annotations

from torch import nn

from ..layers import BLOCK
from .family import CallLayout, Family, is_module_list, latent_of


class ErnieImageFamily(Family):
    name = "Ernie-Image"
    sides = ((BLOCK, "layers"),)
    default_blocks = "block 11-13"  # of the real model's 36
    follows_depth = True

    def matches(self, model: nn.Module) -> bool:
        if not (is_module_list(model, "layers") and len(model.layers)):
            return False
        return all(
            hasattr(layer, "self_attention") and hasattr(layer, "adaLN_sa_ln") for layer in model.layers
        )


    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        patch = int(getattr(model, "patch_size", 1) or 1)
        return CallLayout(1, int(x.shape[-2]) // patch, int(x.shape[-1]) // patch, before=0)

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attention]


ERNIE_IMAGE = ErnieImageFamily()
