"""An SD UNet in the layout of Forge's ``backend/nn/unet.py``, written for these tests around the
layers of an ldm ``UNetModel`` (shared, so both webuis' paths run the very same weights):

- ``IntegratedUNet2DConditionModel.forward(x, timesteps, context, y, control, transformer_options)``
  calls each block *as a module* with ``(h, emb, context, transformer_options[, output_shape])``,
  adds ControlNet residuals after each block (``apply_control`` pops them from the end of each
  list), runs the between-block patches on the whole batch and writes ``original_shape``,
  ``block`` and ``transformer_index`` into the transformer options, as Forge's does;
- ``TimestepEmbedSequential`` hands each layer what it takes.
The attn1 replace-patch lookup happens in ``standin_forge.forge_attention`` around the call.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_control(h, control, name):
    if control is not None and name in control and len(control[name]) > 0:
        residual = control[name].pop()
        if residual is not None:
            h = h + residual
    return h


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None, transformer_options=None, output_shape=None):
        from ldm.modules.attention import SpatialTransformer
        from ldm.modules.diffusionmodules.openaimodel import TimestepBlock

        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
                if transformer_options is not None and "transformer_index" in transformer_options:
                    transformer_options["transformer_index"] += 1
            else:
                x = layer(x)
        return x


class IntegratedUNet2DConditionModel(nn.Module):
    def __init__(self, ldm_unet: nn.Module, sequential: type[nn.Sequential] = TimestepEmbedSequential):
        """The ldm UNet's layers, each block rebuilt as ``sequential`` (the webui's own block
        class: ``tests/ldm_patched_nn`` passes ldm_patched's)."""
        super().__init__()
        self.model_channels = ldm_unet.model_channels
        self.num_classes = ldm_unet.num_classes
        self.time_embed = ldm_unet.time_embed
        if self.num_classes is not None:
            self.label_emb = ldm_unet.label_emb
        self.input_blocks = nn.ModuleList(sequential(*block) for block in ldm_unet.input_blocks)
        self.middle_block = sequential(*ldm_unet.middle_block)
        self.output_blocks = nn.ModuleList(sequential(*block) for block in ldm_unet.output_blocks)
        self.out = ldm_unet.out

    def forward(
        self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs
    ):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        transformer_options = {} if transformer_options is None else transformer_options
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        patches = transformer_options.get("patches", {})
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = module(h, emb, context, transformer_options)
            h = apply_control(h, control, "input")
            for patch in patches.get("input_block_patch", []):
                h = patch(h, transformer_options)
            hs.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options)
        h = apply_control(h, control, "middle")
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            skip = apply_control(hs.pop(), control, "output")
            for patch in patches.get("output_block_patch", []):
                h, skip = patch(h, skip, transformer_options)
            h = torch.cat([h, skip], dim=1)
            h = module(h, emb, context, transformer_options, hs[-1].shape if hs else None)
        return self.out(h).type(x.dtype)
