"""SD3 / SD3.5 (MMDiT, MMDiT-X): joint blocks over ``cat(context, x)`` with the register tokens,
if any, first.

Grid: the patch embedder is a stride-p convolution, ``(h // p) × (w // p)``; ComfyUI's pads the latent
to the patch first (``dynamic_img_pad``): ``ceil(h/p) × ceil(w/p)``. SD3.5 Medium's blocks
0–12 also run an image-only self-attention whose queries are all image tokens: blurred too (the
same image self-attention, computed separately). Default ``joint 7-9``: ComfyUI's
``SkipLayerGuidanceSD3`` perturbs joint blocks 7, 8 and 9."""

from __future__ import annotations

from torch import nn

from ..layers import JOINT
from .family import CallLayout, Family, call_argument, is_module_list, latent_of, padded_grid


class SD3Family(Family):
    name = "SD3"
    sides = ((JOINT, "joint_blocks"),)
    default_blocks = "joint 7-9"

    def matches(self, model: nn.Module) -> bool:
        return is_module_list(model, "joint_blocks")

    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        context = call_argument(args, kwargs, "context", 2)
        patch = patch_size(model)
        registers = int(getattr(model, "register_length", 0) or 0)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if getattr(getattr(model, "x_embedder", None), "dynamic_img_pad", False):
            height, width = padded_grid(height, width, patch)
        else:
            height, width = height // patch, width // patch
        return CallLayout(1, height, width, before=registers + int(context.shape[1]))


def patch_size(model: nn.Module) -> int:
    embedder = getattr(model, "x_embedder", None)
    size = getattr(embedder, "patch_size", None) or getattr(model, "patch_size", 2)
    return int(size[0] if isinstance(size, tuple | list) else size)


SD3 = SD3Family()
