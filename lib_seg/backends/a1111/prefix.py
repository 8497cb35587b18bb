"""Shared UNet prefix: smoothed rows reuse their source rows' activations up to the first
smoothed layer.

A smoothed row is an exact copy of a source row (same latent, timestep and conditioning) until
the first patched ``attn1``. Within one UNet call, the blocks before the first block holding a
patched layer run on the batch without the smoothed rows (pre-hook: select the computed rows);
their outputs are then expanded back to the full batch by copying each source row's activation
into its smoothed row (forward hook), so the skip connections and everything after see the full
batch. The result equals computing every row fully, up to float rounding.

Sharing is attempted only when it is provably valid: the UNet's forward is the plain ldm/sgm
implementation (or A1111's pass-through wrapper of it), no other hooks sit on the shared blocks,
and, per call, the smoothed rows' inputs equal their source rows' inputs exactly. Otherwise the
rows are computed in full.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...layers import blocks_before
from ..batch_rows import select_rows

_PLAIN_FORWARDS = ("UNetModel.forward", "create_unet_forward.<locals>.UNetModel_forward")


def why_not_shareable(unet: nn.Module) -> str | None:
    """None when the UNet's forward is known to run its blocks plainly, else the reason."""
    if "forward" in vars(unet):
        return "the UNet's forward is replaced on the instance (e.g. ControlNet)"
    qualname = getattr(type(unet).forward, "__qualname__", "")
    if not qualname.endswith(_PLAIN_FORWARDS):
        return f"the UNet's forward is {qualname}, not the plain ldm/sgm one"
    if getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
        nn.modules.module, "_global_forward_pre_hooks", None
    ):
        return "global module hooks are installed"
    return None


def _rows_equal(value, rows: torch.Tensor, sources: torch.Tensor, batch: int) -> bool:
    if isinstance(value, torch.Tensor):
        if not value.dim() or value.shape[0] != batch:
            return True
        return torch.equal(value.index_select(0, rows), value.index_select(0, sources))
    if isinstance(value, list | tuple):
        return all(_rows_equal(item, rows, sources, batch) for item in value)
    if isinstance(value, dict):
        return all(_rows_equal(item, rows, sources, batch) for item in value.values())
    return True


class PrefixSharing:
    """Hooks that compute the UNet blocks before the first smoothed layer once per source row."""

    def __init__(self, unet: nn.Module, patched_modules: Sequence[nn.Module]):
        self.unet = unet
        self.blocks = [block for _, _, block in blocks_before(unet, patched_modules)]
        self.reason = why_not_shareable(unet)
        if self.reason is None and not self.blocks:
            self.reason = "the first block is already smoothed"
        if self.reason is None and any(b._forward_hooks or b._forward_pre_hooks for b in self.blocks):
            self.reason = "other hooks sit on the shared blocks"
        self.plan: tuple[list[int], list[int]] | None = None  # (smoothed rows, their source rows)
        self.shared_calls = 0
        self._active: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._handles = []
        if self.reason is None:
            self._handles.append(unet.register_forward_pre_hook(self._start_call, with_kwargs=True))
            self._handles.append(unet.register_forward_hook(self._end_call))
            for block in self.blocks:
                self._handles.append(block.register_forward_pre_hook(self._select_rows, with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._expand_rows))

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = None

    def _start_call(self, module, args, kwargs) -> None:
        self._active = None
        plan = self.plan
        if plan is None or not args or not isinstance(args[0], torch.Tensor):
            return
        batch = int(args[0].shape[0])
        smoothed, sources = plan
        if not smoothed or max(max(smoothed), max(sources)) >= batch:
            return
        device = args[0].device
        rows = torch.tensor(smoothed, device=device)
        source_rows = torch.tensor(sources, device=device)
        if not (
            _rows_equal(args, rows, source_rows, batch) and _rows_equal(kwargs, rows, source_rows, batch)
        ):
            return  # not copies of their sources: compute every row in full
        smoothed_set = set(smoothed)
        computed = [row for row in range(batch) if row not in smoothed_set]
        position = {row: index for index, row in enumerate(computed)}
        source_of = dict(zip(smoothed, sources, strict=True))
        expand = [position[source_of.get(row, row)] for row in range(batch)]
        self._active = (
            torch.tensor(computed, device=device),
            torch.tensor(expand, device=device),
            batch,
        )
        self.shared_calls += 1

    def _end_call(self, module, args, output) -> None:
        self._active = None

    def _select_rows(self, module, args, kwargs):
        if self._active is None:
            return None
        computed, _, batch = self._active
        return select_rows(args, computed, batch), select_rows(kwargs, computed, batch)

    def _expand_rows(self, module, args, output):
        if self._active is None:
            return None
        return output.index_select(0, self._active[1])
