"""Small random-weight UNets built from the real ldm classes A1111 runs (SD1/SD2 and an
SDXL-shaped tree), for tests on the real architecture without downloading weights."""

from __future__ import annotations

import math

import torch
from torch import nn


def _unzero(model: nn.Module, seed: int) -> None:
    # ldm zero-initialises output projections (zero_module); with them at zero the attention
    # output never reaches the UNet output and every SEG test would pass vacuously.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 1 and not parameter.any():
                fan_in = parameter[0].numel() if parameter.dim() > 1 else parameter.numel()
                parameter.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)


def sd1_unet(model_channels: int = 32, context_dim: int = 32, seed: int = 0) -> nn.Module:
    """SD1.x layout (4 levels, 12 input / 12 output blocks, attention at levels 0-2)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
        num_heads=8, use_spatial_transformer=True, transformer_depth=1,
        context_dim=context_dim, legacy=False,
    )  # fmt: skip
    _unzero(unet, seed)
    return unet.eval()


def sd2_unet(model_channels: int = 32, context_dim: int = 48, seed: int = 0) -> nn.Module:
    """SD2.x layout: like SD1 but fixed head width and linear transformer projections."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
        num_head_channels=8, use_spatial_transformer=True, use_linear_in_transformer=True,
        transformer_depth=1, context_dim=context_dim, legacy=False,
    )  # fmt: skip
    _unzero(unet, seed)
    return unet.eval()


def sdxl_like_unet(model_channels: int = 32, context_dim: int = 32, seed: int = 0) -> nn.Module:
    """The sgm SDXL tree shape from ldm blocks: 3 levels (9 input / 9 output blocks), no
    attention at level 0, transformer depth 2 at level 1 and 10 at level 2 and in the middle
    (so the middle block holds 10 attn1), fixed head width, linear projections. Module names
    match sgm's (``middle_block.1.transformer_blocks.9.attn1``); the label embedding is left out.
    """
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    head_channels = 8
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=[2, 4], num_res_blocks=2, channel_mult=(1, 2, 4),
        num_head_channels=head_channels, use_spatial_transformer=True,
        use_linear_in_transformer=True, transformer_depth=1, context_dim=context_dim, legacy=False,
    )  # fmt: skip

    def deepen(block: nn.Sequential, depth: int) -> None:
        channels = block[1].in_channels
        # ldm's SpatialTransformer takes one context per transformer block (a list): see
        # SDXL_CONTEXT_DEPTH and sdxl_like_forward.
        block[1] = SpatialTransformer(
            channels, channels // head_channels, head_channels, depth=depth,
            context_dim=[context_dim] * depth, use_linear=True,
        )  # fmt: skip

    for block in (*unet.input_blocks[4:6], *unet.output_blocks[3:6]):
        deepen(block, 2)
    for block in (*unet.input_blocks[7:9], *unet.output_blocks[0:3], unet.middle_block):
        deepen(block, SDXL_CONTEXT_DEPTH)
    _unzero(unet, seed)
    return unet.eval()


SDXL_CONTEXT_DEPTH = 10


def forward(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
    """Call any of these UNets; the SDXL-shaped tree takes its context once per depth."""
    if (
        getattr(unet.middle_block[1], "transformer_blocks", None) is not None
        and len(unet.middle_block[1].transformer_blocks) == SDXL_CONTEXT_DEPTH
    ):
        return unet(x, t, context=[context] * SDXL_CONTEXT_DEPTH)
    return unet(x, t, context=context)
