"""An SD UNet in the layout of ``ldm_patched.ldm.modules.diffusionmodules.openaimodel`` (reForge
``main``, Forge Classic ``classic``), written for these tests around the layers of an ldm
``UNetModel`` (shared, so every webui's path runs the very same weights). Loaded under that module
name by ``standin_ldm_patched``. What SEG relies on, as there:

- ``UNetModel.forward(x, timesteps, context, y, control, transformer_options, **kwargs)`` hands the
  call to ``_forward`` (reForge runs it through its wrapper executor, with the
  ``transformer_options["wrappers"]`` it finds; Forge Classic's forward is the body itself);
- the body runs each block through the *module function* ``forward_timestep_embed(ts, x, emb,
  context, transformer_options, output_shape, ...)``, which calls the block's layers one by one as
  modules, never the block itself; Forge Classic's ``block_modifiers`` run around each block and its
  ``block_inner_modifiers`` around each layer;
- ControlNet residuals are added after each block (``apply_control``), the between-block patches
  run on the whole batch, and ``original_shape``, ``block`` and ``transformer_index`` are written
  into the transformer options.
The ldm layers take fewer arguments than ldm_patched's (its ``SpatialTransformer`` also takes the
transformer options, its ``Upsample`` an ``output_shape``): the calls below give them what they take.
"""

from __future__ import annotations

import torch
from forge_nn.unet import IntegratedUNet2DConditionModel, apply_control
from torch import nn


def forward_timestep_embed(ts, x, emb, context=None, transformer_options=None, output_shape=None,
                           time_context=None, num_video_frames=None, image_only_indicator=None):  # fmt: skip
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import TimestepBlock

    transformer_options = {} if transformer_options is None else transformer_options
    modifiers = transformer_options.get("block_inner_modifiers", [])
    for index, layer in enumerate(ts):
        for modifier in modifiers:
            x = modifier(x, "before", layer, index, ts, transformer_options)
        if isinstance(layer, TimestepBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context)
            if "transformer_index" in transformer_options:
                transformer_options["transformer_index"] += 1
        else:
            x = layer(x)
        for modifier in modifiers:
            x = modifier(x, "after", layer, index, ts, transformer_options)
    return x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, *args, **kwargs):
        return forward_timestep_embed(self, *args, **kwargs)


class UNetModel(IntegratedUNet2DConditionModel):
    """The same layers as Forge's test UNet; the forward below is ldm_patched's."""

    def __init__(self, ldm_unet: nn.Module):
        super().__init__(ldm_unet, TimestepEmbedSequential)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                **kwargs):  # fmt: skip
        transformer_options = {} if transformer_options is None else transformer_options
        forward = self._forward
        wrappers = transformer_options.get("wrappers", {}).get("diffusion_model", {})
        for wrapper in reversed([w for functions in wrappers.values() for w in functions]):
            forward = _wrapped(forward, wrapper)
        return forward(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                 **kwargs):  # fmt: skip
        from ldm.modules.diffusionmodules.util import timestep_embedding

        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        patches = transformer_options.get("patches", {})
        block_modifiers = transformer_options.get("block_modifiers", [])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            for modifier in block_modifiers:
                h = modifier(h, "before", transformer_options)
            h = forward_timestep_embed(module, h, emb, context, transformer_options)
            h = apply_control(h, control, "input")
            for modifier in block_modifiers:
                h = modifier(h, "after", transformer_options)
            for patch in patches.get("input_block_patch", []):
                h = patch(h, transformer_options)
            hs.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        h = forward_timestep_embed(self.middle_block, h, emb, context, transformer_options)
        h = apply_control(h, control, "middle")
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            skip = apply_control(hs.pop(), control, "output")
            for patch in patches.get("output_block_patch", []):
                h, skip = patch(h, skip, transformer_options)
            h = torch.cat([h, skip], dim=1)
            output_shape = hs[-1].shape if hs else None
            h = forward_timestep_embed(module, h, emb, context, transformer_options, output_shape)
        return self.out(h).type(x.dtype)


def _wrapped(inner, wrapper):
    """reForge's wrapper executor, reduced to what a test needs: ``wrapper(executor, *args)``."""
    return lambda *args, **kwargs: wrapper(inner, *args, **kwargs)
