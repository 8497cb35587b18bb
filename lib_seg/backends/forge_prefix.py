"""Shared UNet prefix in Forge's own UNet (``backend/nn/unet.py``): in a call that SEG enlarged
with copies of some rows (``shared_batch``), the blocks before the first smoothed block run on the
webui's rows only, and their outputs are copied into the copies' rows.

The copies are built by SEG from their source rows (latent, timestep, conditioning, ControlNet
residuals), so they are equal to them until the first patched ``attn1``: this sharing is exact by
construction, with no per-call comparison. It is used only where it is provably valid:

- static (``reason``): the UNet's forward is Forge's own ``IntegratedUNet2DConditionModel.forward``,
  which calls each block as a module (so block hooks run) and applies ControlNet residuals and
  the between-block patches to the whole batch after each block; no other hooks sit on the shared
  blocks; no global module hooks;
- per call (``why_not``): nothing that runs *inside* a shared block may see the call: no block
  modifiers, no group-norm wrapper, no transformer patches (``attn1_patch``, ...), no replace
  patches on the shared blocks. Such code may read the call's layout (``cond_or_uncond``), which
  the shared blocks' reduced batch would contradict.

Otherwise the enlarged call computes every row in full ("one-call").
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..layers import blocks_before

FORGE_UNET_FORWARD = "IntegratedUNet2DConditionModel.forward"
# patches Forge's UNet forward applies between blocks, to the whole batch
BETWEEN_BLOCK_PATCHES = frozenset({"input_block_patch", "input_block_patch_after_skip", "output_block_patch"})


def why_not_shareable(unet: nn.Module, forward_name: str | None) -> str | None:
    if forward_name is None:
        return "this webui's UNet runs its blocks' layers directly, past block hooks"
    if "forward" in vars(unet):
        return "the UNet's forward is replaced on the instance"
    qualname = getattr(type(unet).forward, "__qualname__", "")
    if qualname != forward_name:
        return f"the UNet's forward is {qualname}, not {forward_name}"
    if getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
        nn.modules.module, "_global_forward_pre_hooks", None
    ):
        return "global module hooks are installed"
    return None


class ForgePrefixSharing:
    """Hooks on the blocks before the first smoothed block; idle unless ``sharing`` is active."""

    def __init__(self, unet: nn.Module, patched_modules: Sequence[nn.Module], forward_name: str | None):
        before = blocks_before(unet, patched_modules)
        self.blocks = [block for _, _, block in before]
        self.block_keys = {(side, index) for side, index, _ in before}
        self.reason = why_not_shareable(unet, forward_name)
        if self.reason is None and not self.blocks:
            self.reason = "the first block is already smoothed"
        if self.reason is None and any(b._forward_hooks or b._forward_pre_hooks for b in self.blocks):
            self.reason = "other hooks sit on the shared blocks"
        self._active: tuple[int, int, torch.Tensor] | None = None  # (webui rows, all rows, expansion)
        self._handles = []
        if self.reason is None:
            for block in self.blocks:
                self._handles.append(block.register_forward_pre_hook(self._select_rows, with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._expand_rows))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = None

    def why_not(self, transformer_options: dict) -> str | None:
        """None when this call's options let the shared blocks run on the webui's rows alone."""
        if self.reason is not None:
            return self.reason
        for key in ("block_modifiers", "block_inner_modifiers"):
            if transformer_options.get(key):
                return f"'{key}' run inside the blocks"
        if transformer_options.get("group_norm_wrapper") is not None:
            return "a group-norm wrapper runs inside the blocks"
        inside = sorted(name for name, functions in transformer_options.get("patches", {}).items()
                        if functions and name not in BETWEEN_BLOCK_PATCHES)  # fmt: skip
        if inside:
            return f"transformer patches ({', '.join(inside)}) run inside the blocks"
        for kind, patches in transformer_options.get("patches_replace", {}).items():
            if any(tuple(key[:2]) in self.block_keys for key in patches):
                return f"an {kind} replace patch sits on a shared block"
        return None

    @contextlib.contextmanager
    def sharing(self, webui_rows: int, sources: torch.Tensor, transformer_options: dict):
        """Within: a UNet call of ``webui_rows`` rows followed by copies of rows ``sources`` runs
        the shared blocks on the first ``webui_rows`` rows only. Yields whether it does."""
        if self._active is not None or self.why_not(transformer_options) is not None:
            yield False
            return
        expansion = torch.cat([torch.arange(webui_rows, device=sources.device), sources])
        self._active = (webui_rows, webui_rows + len(sources), expansion)
        try:
            yield True
        finally:
            self._active = None

    def _select_rows(self, module, args, kwargs):
        if self._active is None:
            return None
        webui_rows, rows, _ = self._active

        def webui_part(value):
            is_batch = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows
            return value[:webui_rows] if is_batch else value

        return tuple(webui_part(a) for a in args), {key: webui_part(v) for key, v in kwargs.items()}

    def _expand_rows(self, module, args, output):
        if self._active is None:
            return None
        expansion = self._active[2]
        if expansion.device != output.device:
            expansion = expansion.to(output.device)
        return output.index_select(0, expansion)
