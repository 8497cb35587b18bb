"""Shared prefix in the Forge family's model calls: in a call that SEG enlarged with copies of
some rows (``shared_batch``), the blocks before the first smoothed block run on the webui's rows
only, and their outputs are copied into the copies' rows.

The copies are built by SEG from their source rows (latent, timestep, conditioning, ControlNet
residuals), so they are equal to them until the first smoothed attention: this sharing is exact
by construction, with no per-call comparison. A shared block is one *unit*: forward pre-hooks on
its entry modules hand them the webui's rows of every batch-sized input, a forward hook on its
exit module copies the rows back out (so skip connections and anything between blocks see the
whole batch). Where the host calls its blocks decides the units:

- Forge's UNet (``backend/nn/unet.py``) and every diffusion transformer's block lists (Flux,
  Chroma, SD3, the Neo families): the block is called as a module, so it is its own entry and
  exit;
- reForge's and Forge Classic's UNet (``ldm_patched`` ``openaimodel``) run a block's layers one by
  one through the module function ``forward_timestep_embed``, past block hooks: every layer is an
  entry (each takes the batch-sized timestep embedding and context), the last layer the exit.

It is used only where it is provably valid:

- static (``reason``): the UNet's forward is the host's own, nothing else hooks the shared
  modules, no global module hooks;
- per call (``why_not``): nothing that runs *inside* a shared block may see the call: no block
  modifiers, no group-norm wrapper, no transformer patches (``attn1_patch``, ...), no replace
  patches on the shared blocks, no wrapper around the diffusion model's forward (reForge). Such
  code may read the call's layout (``cond_or_uncond``), which the shared blocks' reduced batch
  would contradict.

Otherwise the enlarged call computes every row in full ("one-call").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...layers import blocks_before

FORGE_UNET_FORWARDS = ("IntegratedUNet2DConditionModel.forward",)
# reForge: forward hands the call to its wrapper executor, which runs _forward
LDM_PATCHED_UNET_FORWARDS = ("UNetModel.forward", "UNetModel._forward")
LDM_PATCHED_LAYER_CALLER = "forward_timestep_embed"
DIFFUSION_MODEL_WRAPPERS = "diffusion_model"  # reForge's and ComfyUI's wrapper kind around the forward
# patches the UNets' forward applies between blocks, to the whole batch
BETWEEN_BLOCK_PATCHES = frozenset({"input_block_patch", "input_block_patch_after_skip", "output_block_patch"})


@dataclass(frozen=True)
class Unit:
    """One shared block: the modules that receive its inputs, and the one whose output leaves it."""

    entries: tuple[nn.Module, ...]
    exit: nn.Module


def global_hooks_reason() -> str | None:
    if getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
        nn.modules.module, "_global_forward_pre_hooks", None
    ):
        return "global module hooks are installed"
    return None


def forward_reason(model: nn.Module, forward_names: Sequence[str]) -> str | None:
    """None when ``model``'s forward (and ``_forward``, where the class has one) is the host's
    own, named in ``forward_names``."""
    if "forward" in vars(model) or "_forward" in vars(model):
        return "the UNet's forward is replaced on the instance"
    for attribute in ("forward", "_forward"):
        method = getattr(type(model), attribute, None)
        if method is None:
            continue
        qualname = getattr(method, "__qualname__", "")
        if qualname not in forward_names:
            return f"the UNet's {attribute} is {qualname}, not the webui's own"
    return None


class PrefixSharing:
    """Hooks on the shared units; idle unless ``sharing`` is active."""

    def __init__(self, units: Sequence[Unit], block_keys=(), reason: str | None = None):
        self.units = list(units)
        self.block_keys = set(block_keys)
        self.reason = reason or global_hooks_reason()
        if self.reason is None and not self.units:
            self.reason = "the first block is already smoothed"
        modules = [m for unit in self.units for m in {*unit.entries, unit.exit}]
        if self.reason is None and any(m._forward_hooks or m._forward_pre_hooks for m in modules):
            self.reason = "other hooks sit on the shared blocks"
        self._active: tuple[int, int, torch.Tensor] | None = None  # (webui rows, all rows, expansion)
        self._handles = []
        if self.reason is None:
            for unit in self.units:
                for entry in unit.entries:
                    self._handles.append(entry.register_forward_pre_hook(self._select_rows, with_kwargs=True))
                self._handles.append(unit.exit.register_forward_hook(self._expand_rows))

    @property
    def blocks(self) -> list[nn.Module]:
        return [unit.exit for unit in self.units]

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
        # wrappers of other kinds (ComfyUI's outer sample, calc_cond_batch, ...) run outside the model
        if _non_empty((transformer_options.get("wrappers") or {}).get(DIFFUSION_MODEL_WRAPPERS)):
            return "another extension wraps the diffusion model's forward"
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
        """Within: a model call of ``webui_rows`` rows followed by copies of rows ``sources`` runs
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

        def webui_part(tensor):
            return tensor[:webui_rows] if tensor.dim() and tensor.shape[0] == rows else tensor

        return map_tensors(args, webui_part), {key: map_tensors(v, webui_part) for key, v in kwargs.items()}

    def _expand_rows(self, module, args, output):
        if self._active is None:
            return None
        webui_rows, _, expansion = self._active

        def all_rows(tensor):
            if not tensor.dim() or tensor.shape[0] != webui_rows:
                return tensor
            return tensor.index_select(0, expansion.to(tensor.device))

        return map_tensors(output, all_rows)


def map_tensors(value, function: Callable[[torch.Tensor], torch.Tensor]):
    """``value`` with ``function`` applied to every tensor in it: in tuples, lists, named tuples and
    dataclass instances (the per-row modulation some transformers hand their blocks). Dicts are
    passed as they are: the ones blocks get are the call's options, which a block may write to."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)._make(map_tensors(item, function) for item in value)
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(item, function) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        mapped = copy.copy(value)
        for entry in dataclasses.fields(value):
            object.__setattr__(mapped, entry.name, map_tensors(getattr(value, entry.name), function))
        return mapped
    return value


def _non_empty(value) -> bool:
    if isinstance(value, dict):
        return any(_non_empty(item) for item in value.values())
    return bool(value)


# -- where each host's blocks are ---------------------------------------------------------------
def forge_unet_prefix(unet: nn.Module, patched_modules: Sequence[nn.Module]) -> PrefixSharing:
    """Forge's own UNet: each block is called as a module."""
    before = blocks_before(unet, patched_modules)
    units = [Unit((block,), block) for _, _, block in before]
    reason = forward_reason(unet, FORGE_UNET_FORWARDS)
    return PrefixSharing(units, {(side, index) for side, index, _ in before}, reason)


def ldm_patched_unet_prefix(
    unet: nn.Module, patched_modules: Sequence[nn.Module], package: str = "ldm_patched"
) -> PrefixSharing:
    """reForge's and Forge Classic's UNet (``package`` ``ldm_patched``) and ComfyUI's (``comfy``),
    the same code: each block's layers are called as modules by the module function
    ``forward_timestep_embed``, which must be that module's own."""
    before = blocks_before(unet, patched_modules)
    units = [Unit(tuple(block), list(block)[-1]) for _, _, block in before if len(block)]
    reason = forward_reason(unet, LDM_PATCHED_UNET_FORWARDS)
    if reason is None and not type(unet).__module__.startswith(f"{package}."):
        reason = f"the UNet is {type(unet).__module__}.{type(unet).__qualname__}, not {package}'s"
    if reason is None:
        module = sys.modules.get(type(unet).__module__)
        caller = getattr(module, LDM_PATCHED_LAYER_CALLER, None)
        if getattr(caller, "__module__", None) != type(unet).__module__:
            reason = f"{LDM_PATCHED_LAYER_CALLER} is not the webui's own (another extension replaced it)"
    return PrefixSharing(units, {(side, index) for side, index, _ in before}, reason)


def transformer_prefix(
    block_lists: Sequence[Sequence[nn.Module]], smoothed: Sequence[nn.Module]
) -> PrefixSharing:
    """A diffusion transformer whose block lists (``block_lists``, in the order the model runs
    them) are called block by block as modules: the blocks before the first smoothed one."""
    wanted = {id(block) for block in smoothed}
    shared = []
    for blocks in block_lists:
        for block in blocks:
            if id(block) in wanted:
                return PrefixSharing([Unit((b,), b) for b in shared])
            shared.append(block)
    return PrefixSharing([Unit((b,), b) for b in shared])
