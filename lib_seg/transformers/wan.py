"""Wan 2.1 / 2.2 (video): ``WanModel.blocks`` of ``WanAttentionBlock`` s, each a self-attention over
the video tokens (``self_attn``), a cross-attention to the text (``cross_attn``; I2V models have a
second key/value set there for CLIP image tokens) and an MLP. Wan 2.1 1.3B: 30 blocks, 1536 wide,
12 heads; Wan 2.1 14B (T2V, I2V, FLF2V) and each of Wan 2.2 A14B's two experts (high noise, then
low noise, a separate model each, the low-noise one loaded as Neo's Refiner): 40 blocks, 5120 wide,
40 heads; Wan 2.2 TI2V 5B: 30 blocks, 3072 wide, 24 heads (same layout; Neo 2.26 has no VAE for its
latent).

Grid: the latent is (B, C, T, H, W). The model pads it circularly to its patch (1, 2, 2) and cuts
it with a stride-patch 3-D convolution, so ``T`` latent frames of ``h × w`` give ``T`` frames of
``ceil(h/2) × ceil(w/2)`` tokens, frames after one another, each row-major (T-H-W order), with a
3-axis RoPE applied after the QK-norm. No text is in the self-attention: its queries are the video
tokens and nothing before them. Each frame is blurred over its own grid; the time axis is never
blurred. I2V's conditioning (mask and first/last-frame latents) is concatenated on the channels, so
it changes no token. ``time_dim_concat`` latents (reference frames; Neo passes none, ComfyUI's
Phantom does) are appended as extra frames after the video and cut from the output: those tokens
follow the video span and are left alone. Wan Fun's ``reference_latent`` (through ``ref_conv``)
is put before the video: the span starts after its tokens. Only ``self_attn`` is smoothed;
``cross_attn`` calls the same kernel but attends to the text.

Radial Attention (Forge Neo's built-in ``sd_forge_radial``) replaces the module's ``attention``,
which the self-attention calls, with its own sparse kernel for the blocks from its "Dense Block"
on; that kernel never reaches ``attention_function``, where SEG blurs the queries, so SEG would
silently do nothing there. While it is on (``radial_attn`` in the call's transformer options, or
the module's ``attention`` replaced by a wrapper) the layout is refused with a ValueError: the pass
is generated without SEG and the user is told why.

Default ``block 9`` on the 30- and 40-block models: Skip Layer Guidance on Wan 2.1 skips block 9 by
default (Wan2GP, where SLG for Wan was introduced; its author found skipping any block other than 8
or 9 detrimental); ComfyUI users of ``SkipLayerGuidanceDiT`` on Wan skip 9 or 9-10, and Kijai's
``WanVideoSLG`` defaults to 10. It is the nearest convention for a guidance that contrasts the
model with a weakened attention pass. A smaller model (none is released) gets SD3's SLG choice
carried to its depth."""

from __future__ import annotations

import sys

from torch import nn

from ..layers import BLOCK
from .family import CallLayout, Family, call_argument, default_at_depth, is_module_list, latent_of

SLG_BLOCK = 9
CONVENTION_DEPTH = 30  # the smallest released Wan (1.3B, 5B); the 14B models have 40 blocks

RADIAL = ("Radial Attention replaces Wan's self-attention kernel, so SEG cannot blur its queries; "
          "turn Radial Attention off to use SEG on Wan")  # fmt: skip


class WanFamily(Family):
    name = "Wan"
    sides = ((BLOCK, "blocks"),)
    default_blocks = f"block {SLG_BLOCK}"

    def matches(self, model: nn.Module) -> bool:
        if not (is_module_list(model, "blocks") and len(model.blocks)
                and isinstance(getattr(model, "patch_embedding", None), nn.Conv3d)):  # fmt: skip
            return False
        return all(hasattr(block, "self_attn") and hasattr(block, "cross_attn") for block in model.blocks)

    def default(self, model: nn.Module) -> str:
        count = len(model.blocks)
        return self.default_blocks if count >= CONVENTION_DEPTH else default_at_depth(count)

    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        if x.dim() != 5:
            raise ValueError(f"Wan takes a (B, C, T, H, W) latent, not one shaped {tuple(x.shape)}")
        options = call_argument(args, kwargs, "transformer_options", 5) or {}
        if "radial_attn" in options or _kernel_replaced(model):
            raise ValueError(RADIAL)
        temporal, height, width = patch_size(model)
        return CallLayout(-(-int(x.shape[-3]) // temporal), -(-int(x.shape[-2]) // height),
                          -(-int(x.shape[-1]) // width), before=reference_tokens(model, kwargs))  # fmt: skip

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]


def reference_tokens(model: nn.Module, kwargs: dict) -> int:
    """Wan Fun (``ref_conv``): a ``reference_latent`` image is cut by a stride-patch convolution and
    put *before* the video tokens."""
    reference = kwargs.get("reference_latent")
    if getattr(model, "ref_conv", None) is None or reference is None:
        return 0
    _, height, width = patch_size(model)
    return (int(reference.shape[-2]) // height) * (int(reference.shape[-1]) // width)


def patch_size(model: nn.Module) -> tuple[int, int, int]:
    """(t, h, w) of the model's 3-D patches: its ``patch_size``, else its patch embedder's stride."""
    size = getattr(model, "patch_size", None)
    if not (isinstance(size, tuple | list) and len(size) == 3):
        size = model.patch_embedding.stride
    return int(size[0]), int(size[1]), int(size[2])


def _kernel_replaced(model: nn.Module) -> bool:
    """True when the ``attention`` the self-attention calls in the model's module is a wrapper put
    there by another extension (Radial Attention's ``functools.wraps`` of the original, which it
    leaves in place after a generation whose last step was not dense)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(getattr(module, "attention", None), "__wrapped__", None) is not None


WAN = WanFamily()
