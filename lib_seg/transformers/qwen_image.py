"""Qwen-Image and Qwen-Image-Edit (Forge Neo's ``backend/nn/qwen.py``, and the Nunchaku SVDQuant
build in ``svdq.py``, a subclass of it): one list of 60 dual-stream blocks, ``transformer_blocks``,
each running one joint attention over ``cat(txt, img)`` (``block.attn``).

Grid: the latent comes from a video VAE and is 5-D, (B, C, 1, h, w). Neo pads it to the patch
size on the last three axes (1, p, p), circularly, and takes p × p patches (p = 2, the model's
``patch_size``), so an ``h × w`` latent gives ``ceil(h/p) × ceil(w/p)`` image tokens, row-major,
right after the text tokens. The forward only folds one frame into tokens: a call with more
frames is refused. Qwen-Image-Edit's reference images (``ref_latents``, or Neo's global
``dynamic_args.ref_latents``) are patchified the same way and appended *after* the image tokens:
another image on its own grid, part of the conditioning, never blurred. The text tokens (with
Edit's vision tokens inside them) come first; Neo hands the blocks no text mask (the padding of a
batched call is the shorter prompt repeated, and every text token is attended), so the text
length is the call's ``context.shape[1]``.

Default: the middle three blocks at 0.3 of the depth (``block 18-20`` of 60), SD3's Skip Layer
Guidance choice (joint 7-9 of 24) carried to the depth (``family.default_at_depth``): the field
has no Skip Layer Guidance convention for Qwen-Image, and like SD3 it is an MMDiT whose every
block runs a joint attention."""

from __future__ import annotations

from torch import nn

from ..layers import BLOCK
from .family import CallLayout, Family, call_argument, is_module_list, latent_of, padded_grid


class QwenImageFamily(Family):
    name = "Qwen-Image"
    sides = ((BLOCK, "transformer_blocks"),)
    default_blocks = "block 18-20"  # of the real model's 60
    follows_depth = True

    def matches(self, model: nn.Module) -> bool:
        # Qwen's own parts: the one block list, the text RMSNorm before ``txt_in``, the RoPE
        # embedder and the 5-D latent patchifier (a UNet's ``transformer_blocks`` sit deeper)
        parts = ("txt_norm", "txt_in", "pe_embedder")
        return (is_module_list(model, "transformer_blocks")
                and all(isinstance(getattr(model, part, None), nn.Module) for part in parts)
                and callable(getattr(model, "process_img", None)))  # fmt: skip


    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        context = call_argument(args, kwargs, "context", 2)
        if x.ndim == 5 and int(x.shape[2]) != 1:
            raise ValueError(f"Qwen-Image takes a latent of one frame, this call has {int(x.shape[2])}")
        height, width = padded_grid(int(x.shape[-2]), int(x.shape[-1]), patch_size(model))
        return CallLayout(1, height, width, before=int(context.shape[1]))

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        attention = getattr(block, "attn", None)
        return [attention] if isinstance(attention, nn.Module) else [block]


def patch_size(model: nn.Module) -> int:
    size = getattr(model, "patch_size", 2)
    return int(size[-1] if isinstance(size, tuple | list) else size)


QWEN_IMAGE = QwenImageFamily()
