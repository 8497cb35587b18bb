"""Anima (CircleStone Labs / Comfy Org, on NVIDIA's Cosmos-Predict2 2B "MiniTrainDIT"): 28 blocks
(2048 wide, 16 heads of 128), each a self-attention over the image tokens, a cross-attention to
the text (the LLM adapter's output, computed in the text encoder) and an MLP.

Grid: the latent is (B, C, T, H, W), one frame for an image (Neo's Anima never makes video). The
model pads H and W to even and T to its temporal patch (1), appends a padding-mask channel and
cuts 1×2×2 patches, so an ``h × w`` latent gives ``ceil(h/2) × ceil(w/2)`` tokens per frame,
frames after one another, each row-major (T-H-W). No text is in the self-attention: its queries
are the image tokens and nothing before them. Anima's edit mode (Neo's "Anima Reference" option)
appends the reference latent as extra frames on the time axis, after the image: those tokens
follow the image span and are left alone. Only ``self_attn`` is smoothed; ``cross_attn`` (the
same attention class, same kernel) is a cross-attention to the text and is never touched.

Default: no Skip-Layer-Guidance or other convention exists for Anima or Cosmos-Predict2, so
``middle`` is SD3's SLG choice (joint 7-9 of 24) carried to the depth: ``block 8-10`` of 28."""

from __future__ import annotations

from torch import nn

from ..layers import BLOCK
from .family import CallLayout, Family, is_module_list, latent_of, padded_grid


class AnimaFamily(Family):
    name = "Anima"
    sides = ((BLOCK, "blocks"),)
    default_blocks = "block 8-10"  # of the real model's 28
    follows_depth = True

    def matches(self, model: nn.Module) -> bool:
        if not (is_module_list(model, "blocks") and hasattr(model, "patch_spatial")
                and hasattr(model, "patch_temporal") and len(model.blocks)):  # fmt: skip
            return False
        return all(hasattr(block, name) for block in model.blocks
                   for name in ("self_attn", "cross_attn", "adaln_modulation_self_attn"))  # fmt: skip


    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        if x.dim() != 5:
            raise ValueError(f"Anima takes a (B, C, T, H, W) latent, not one shaped {tuple(x.shape)}")
        spatial, temporal = int(model.patch_spatial), int(model.patch_temporal)
        height, width = padded_grid(int(x.shape[-2]), int(x.shape[-1]), spatial)
        frames = -(-int(x.shape[-3]) // temporal)
        return CallLayout(frames, height, width, before=0)

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]


ANIMA = AnimaFamily()
