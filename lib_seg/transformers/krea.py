"""Krea-2 (Forge Neo's ``SingleStreamDiT``: 28 single-stream blocks in ``blocks`` at the default
width 6144, 48 query heads over 12 key/value heads): every block runs one attention over
``cat(text, image, references)``. The text first goes through a ``TextFusionTransformer``
(``txtfusion``: attention across the Qwen3-VL layers of each token, then over the text), which is
how the family is told apart; that attention is the text's own and never smoothed (it runs
before the blocks, outside their attention modules).

Grid: the latent (Wan 2.1's 16 channels; Neo hands a ``(B, C, 1, h, w)`` video latent, and the
model folds the frames into the batch) is padded up to the model's ``patch`` (2) and cut into
patch × patch tiles: ``ceil(h/2) × ceil(w/2)`` image tokens, row-major, after the text tokens
(the context's token axis). Reference latents (``ref_latents``) are appended after the image
tokens with their own modulation and are left alone. With references the model calls its
blocks' parts one by one (``block.mod``, ``block.attn``, ``block.mlp``) rather than the block, so
SEG's scope is each block's ``attn`` module, which both paths call.

Default ``block a-b``: no Skip-Layer-Guidance convention is published for Krea-2, so SD3's
``joint 7-9`` of 24 is carried to the depth (``family.default_at_depth``): ``block 8-10`` of 28."""

from __future__ import annotations

from torch import nn

from ..layers import BLOCK
from .family import CallLayout, Family, call_argument, is_module_list, latent_of, padded_grid


class Krea2Family(Family):
    name = "Krea-2"
    sides = ((BLOCK, "blocks"),)
    default_blocks = "block 8-10"
    follows_depth = True

    def matches(self, model: nn.Module) -> bool:
        return is_module_list(model, "blocks") and isinstance(getattr(model, "txtfusion", None), nn.Module)


    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        context = call_argument(args, kwargs, "context", 2)
        patch = int(getattr(model, "patch", 2))
        height, width = padded_grid(int(x.shape[-2]), int(x.shape[-1]), patch)
        return CallLayout(1, height, width, before=int(context.shape[-2]))

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        attention = getattr(block, "attn", None)
        return [attention] if isinstance(attention, nn.Module) else [block]


KREA2 = Krea2Family()
