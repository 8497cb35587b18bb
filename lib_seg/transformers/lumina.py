"""Lumina 2 (Neta-Lumina) and Z-Image / Z-Image-Turbo: Forge Neo builds both as one class,
``NextDiT`` (``backend/nn/lumina.py``), told apart by the block modulation (Z-Image's
``adaLN_modulation`` is a bare linear layer of a 256-wide time embedding; Lumina 2's starts with a
``SiLU``). Two families only so messages name the model the user loaded; the facts are shared.

- Lumina 2: 26 ``layers``, 2304 wide, 24 heads of 96 (8 kv heads), Gemma-2 captions.
- Z-Image(-Turbo): 30 ``layers``, 3840 wide, 30 heads of 128, Qwen3 captions, caption and image
  pad tokens to a multiple of 32 (``pad_tokens_multiple``, set when the checkpoint has
  ``cap_pad_token``).
- Both: 2 ``context_refiner`` blocks (caption only) and 2 ``noise_refiner`` blocks (image only)
  run first; then each of ``layers`` is one ``JointTransformerBlock`` over
  ``cat(caption, image)`` with no mask. Its ``attention`` (``JointAttention``) calls the
  module's ``attention_function`` with q (B, heads, tokens, d) after the QK-norm and RoPE.

Token order of ``layers``: the caption, padded with ``cap_pad_token`` up to a multiple of
``pad_tokens_multiple`` (Z-Image; Lumina 2: unpadded), then ``ceil(h/2) × ceil(w/2)`` image
tokens (the latent padded to the 2×2 patch, row-major), then the ``x_pad_token`` s that round the
image up to the same multiple: after the image, never blurred. Every row of a call has the same
caption length: the caption is one tensor (Neo's cond concatenation repeats shorter captions to a
common length), and its mask only reaches the context refiner.

ComfyUI's NextDiT (``comfy.ldm.lumina``) puts each row's image after its effective caption (its
caption mask's sum, else ``num_tokens``), not after the whole caption tensor: that length is used
there, and a call whose rows differ is refused.

Sides: ``block`` = ``layers``. The noise refiner is an image self-attention too (its calls hold the
image and its pad tokens only; ``image_start`` places them), but it is not offered: it runs on
the bare patch embeddings before the caption joins, and naming it would need a side word the
block syntax does not have.

Default: no Skip-Layer-Guidance convention is known for these models, so ``middle`` is SD3's SLG
choice (joint 7-9 of 24) carried to the depth (``family.default_at_depth``): ``block 8-10`` of
Lumina 2's 26 layers, ``block 9-11`` of Z-Image's 30.

Nunchaku's quantized Z-Image (``backend/nn/svdq.py``) swaps each block's attention for one that
calls ``backend.nn.svdq``'s kernel: the webui backend looks the kernel up from the attention
module's class, so that one is wrapped."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import BLOCK
from .family import CallLayout, Family, call_argument, is_module_list, latent_of, padded_grid


class Lumina2Family(Family):
    name = "Lumina 2"
    sides = ((BLOCK, "layers"),)
    default_blocks = "block 8-10"  # of the real model's 26 layers
    follows_depth = True

    def matches(self, model: nn.Module) -> bool:
        return is_next_dit(model) and not has_z_image_modulation(model)


    def layout(self, model: nn.Module, args: tuple, kwargs: dict) -> CallLayout:
        x = latent_of(args, kwargs)
        context = call_argument(args, kwargs, "context", 2)
        patch = int(getattr(model, "patch_size", 2) or 2)
        height, width = padded_grid(int(x.shape[-2]), int(x.shape[-1]), patch)
        caption = int(context.shape[1])
        if type(model).__module__.startswith("comfy."):
            caption = comfyui_caption_length(args, kwargs, caption)
        return CallLayout(1, height, width, before=padded_length(caption, model))

    def attention_scopes(self, block: nn.Module) -> list[nn.Module]:
        return [block.attention]

    def image_start(self, layout: CallLayout, tokens: int) -> int:
        # A noise-refiner call holds the image and its pad tokens only: fewer than the caption
        # plus the image (the pad tokens number less than one multiple, the padded caption at
        # least one, or none at all without padding). A call of ``layers`` holds all three.
        return 0 if tokens < layout.before + layout.image_tokens else layout.before


class ZImageFamily(Lumina2Family):
    name = "Z-Image"
    default_blocks = "block 9-11"  # of the real model's 30 layers

    def matches(self, model: nn.Module) -> bool:
        return is_next_dit(model) and has_z_image_modulation(model)


def is_next_dit(model: nn.Module) -> bool:
    return (is_module_list(model, "layers") and is_module_list(model, "noise_refiner")
            and is_module_list(model, "context_refiner") and hasattr(model, "cap_embedder")
            and len(model.layers) > 0)  # fmt: skip


def has_z_image_modulation(model: nn.Module) -> bool:
    """Z-Image's blocks modulate from the time embedding through a bare linear layer (Neo's
    ``z_image_modulation``); Lumina 2's through ``SiLU`` then the linear layer. (The linear layer
    is Neo's operation class, not always an ``nn.Linear``: 4-bit and GGUF ones are not.)"""
    modulation = getattr(model.layers[0], "adaLN_modulation", None)
    if not isinstance(modulation, nn.Sequential) or len(modulation) == 0:
        return False
    return not isinstance(modulation[0], nn.SiLU)


def comfyui_caption_length(args: tuple, kwargs: dict, tokens: int) -> int:
    """ComfyUI's NextDiT puts each row's image right after its *effective* caption: the sum of its
    caption mask when one is given, else ``num_tokens``. Rows of one call with captions of
    different lengths have their images at different places: refused."""
    mask = call_argument(args, kwargs, "attention_mask", 4)
    if isinstance(mask, torch.Tensor):
        lengths = {int(length) for length in mask.sum(dim=1).tolist()}
        if len(lengths) != 1:
            raise ValueError("the rows of this call have captions of different lengths, so their images "
                             "start at different tokens; SEG cannot blur them")  # fmt: skip
        return lengths.pop()
    count = call_argument(args, kwargs, "num_tokens", 3)
    return int(count) if isinstance(count, int) else tokens


def padded_length(tokens: int, model: nn.Module) -> int:
    """The caption length ``layers`` see: ``tokens`` rounded up to ``pad_tokens_multiple``."""
    multiple = getattr(model, "pad_tokens_multiple", None)
    return tokens if not multiple else -(-tokens // int(multiple)) * int(multiple)


LUMINA2 = Lumina2Family()
Z_IMAGE = ZImageFamily()
