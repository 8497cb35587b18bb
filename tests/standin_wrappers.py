"""Stand-ins for the attention wrappers users switch on beside SEG (test-only, written from the
behaviour of the originals, not copied):

- A1111's built-in Hypertile replaces ``attn1.forward`` on the instance with a wrapper that cuts
  the row-major token sequence into ``nh × nw`` tiles before the original forward runs
  (``b (nh h nw w) c -> (b nh nw) (h w) c``) and puts the output back together afterwards. Older
  releases read a non-square sequence as width × height; ``transposed`` reproduces that.
- tomesd (A1111's token merging) swaps each transformer block's class for ``ToMeBlock``, whose
  forward hands ``attn1`` merged tokens (here: the mean of each group of ``group`` neighbours) and
  copies the result back to every token of the group.
- mcmonkey's Dynamic Thresholding (A1111 extension) swaps the sampler's CFG denoiser for a
  subclass whose ``combine_denoised`` takes ``x_out[:-n_uncond]`` as the cond predictions, stacks
  them per image (``rows / n_uncond`` conds each, which must be whole) and sums the weighted
  differences to the uncond rows; ``dynamic_thresholding_denoiser`` builds that subclass with the
  thresholding itself left out (mimic scale = CFG scale), the row reading kept.
"""

from __future__ import annotations

import torch
from torch import nn


def tile(x: torch.Tensor, grid_h: int, grid_w: int, nh: int, nw: int) -> torch.Tensor:
    b, _, c = x.shape
    th, tw = grid_h // nh, grid_w // nw
    return x.view(b, nh, th, nw, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, th * tw, c)


def untile(x: torch.Tensor, grid_h: int, grid_w: int, nh: int, nw: int) -> torch.Tensor:
    _, _, c = x.shape
    th, tw = grid_h // nh, grid_w // nw
    return x.view(-1, nh, nw, th, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, grid_h * grid_w, c)


class Hypertile:
    """Wraps ``attn1.forward`` of the given modules; ``grid_of(n_tokens)`` gives the layer grid."""

    def __init__(self, modules, grid_of, nh: int = 2, nw: int = 2, transposed: bool = False):
        self.modules = list(modules)
        self.grid_of, self.nh, self.nw, self.transposed = grid_of, nh, nw, transposed
        for module in self.modules:
            module.forward = self._wrap(module.forward)

    def _wrap(self, forward):
        def hypertile_forward(x, *args, **kwargs):
            h, w = self.grid_of(x.shape[1])
            if self.transposed:
                h, w = w, h
            out = forward(tile(x, h, w, self.nh, self.nw), *args, **kwargs)
            return untile(out, h, w, self.nh, self.nw)

        return hypertile_forward

    def remove(self):
        for module in self.modules:
            del module.forward


class ToMeBlock(nn.Module):
    """Installed by swapping ``block.__class__``; ``_parent`` is the original class."""

    group = 4

    def forward(self, x, context=None):
        b, n, c = x.shape
        merged = x.view(b, n // self.group, self.group, c).mean(dim=2)
        attended = self.attn1(self.norm1(merged), context=context if self.disable_self_attn else None)
        x = x + attended.repeat_interleave(self.group, dim=1)
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def apply_token_merging(unet: nn.Module) -> list[nn.Module]:
    """Like tomesd at its default ``max_downsample=1``: only the full-resolution blocks merge."""
    full_resolution = [*unet.input_blocks[1:3], *unet.output_blocks[9:12]]
    blocks = [m for b in full_resolution for m in b.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block._parent = block.__class__
        block.__class__ = type("ToMeBlock", (ToMeBlock, block.__class__), {})
    return blocks


def remove_token_merging(blocks) -> None:
    for block in blocks:
        block.__class__ = block._parent


class ControlNetStandin:
    """Mikubill's sd-webui-controlnet hook, as far as SEG is concerned: it replaces the UNet's
    ``forward`` on the instance, adds a control computed from one control image (batch 1,
    broadcast over the rows) to the UNet input, and tells positive from negative rows by marks in
    each row's conditioning (here: whether the row's context is one of the negative prompt's),
    scaling the control per row as its "ControlNet is more important" mode does."""

    def __init__(self, unet: nn.Module, hint: torch.Tensor, negative_context: torch.Tensor,
                 cond_weight: float = 1.0, uncond_weight: float = 0.25):  # fmt: skip
        self.unet, self.hint, self.negative = unet, hint, negative_context
        self.weights = (cond_weight, uncond_weight)
        self.calls: list[int] = []
        original = unet.forward

        def forward_webui(x, timesteps=None, context=None, **kwargs):
            self.calls.append(int(x.shape[0]))
            uncond = torch.stack([self._is_negative(row) for row in context])
            weight = torch.where(uncond, self.weights[1], self.weights[0]).to(x.dtype)
            return original(x + weight[:, None, None, None] * self.hint, timesteps, context=context, **kwargs)

        unet.forward = forward_webui

    def _is_negative(self, row: torch.Tensor) -> torch.Tensor:
        negative = self.negative[:, : row.shape[0]]
        return torch.tensor(any(torch.equal(row[: n.shape[0]], n) for n in negative))

    def remove(self) -> None:
        del self.unet.forward


def dynamic_thresholding_denoiser(base: type) -> type:
    """A subclass of the webui's CFG denoiser class ``base`` with Dynamic Thresholding's
    ``combine_denoised``."""

    class CustomCFGDenoiser(base):
        def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
            n = uncond.shape[0]
            cond, denoised_uncond = x_out[:-n], x_out[-n:]
            weights = torch.tensor(conds_list).select(2, 1).reshape(n, -1, 1, 1, 1)
            per_image = cond.shape[0] / n
            assert per_image == int(per_image), "Expected # of conds per batch to be constant across batches"
            stacked = cond.reshape((-1, int(per_image), *denoised_uncond.shape[1:]))
            diff = (stacked - denoised_uncond.unsqueeze(1)) * weights
            return denoised_uncond + diff.sum(1) * cond_scale

    return CustomCFGDenoiser
