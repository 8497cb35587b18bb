"""Which blocks of a diffusion transformer a ``LayerSelection`` names, and the words for them."""

from __future__ import annotations

from torch import nn

from ..layers import TRANSFORMER_SIDES, LayerSelection, format_indices, parse_layers
from .family import Family


def block_lists(model: nn.Module, family: Family) -> dict[str, nn.ModuleList]:
    return {side: getattr(model, attribute) for side, attribute in family.sides}


def describe_blocks(model: nn.Module, family: Family) -> str:
    """e.g. ``double 0-18, single 0-37``: the blocks this model has, for messages."""
    return ", ".join(
        f"{side} {format_indices(frozenset(range(len(blocks))))}" if len(blocks) else f"{side} (none)"
        for side, blocks in block_lists(model, family).items()
    )


def resolve_blocks(
    model: nn.Module, family: Family, selection: LayerSelection
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The chosen blocks as ``(qualified name, block)``, and the named blocks this model lacks
    (``"double 19-20"``, ``"input 7"``) so the user hears about them; a whole side of another
    kind of model (``input``, ``joint`` on Flux) just names nothing.

    ``middle`` is the family default here; ``all`` every block; UNet sides name nothing."""
    wanted = {side: selection.indices(side) for side in TRANSFORMER_SIDES}
    if selection.middle:
        default = parse_layers(family.default(model))
        for side in TRANSFORMER_SIDES:
            extra = default.indices(side)
            if wanted[side] is not None and extra:
                wanted[side] = wanted[side] | extra
    lists = block_lists(model, family)
    chosen: list[tuple[str, nn.Module]] = []
    missing: list[str] = []
    for side in TRANSFORMER_SIDES:
        indices = wanted[side]
        blocks = lists.get(side)
        if blocks is None:
            if indices:  # a whole side (``all``, ``joint``) of another family names nothing here
                missing.append(f"{side} {format_indices(indices)}")
            continue
        available = frozenset(range(len(blocks)))
        picked = available if indices is None else indices & available
        absent = frozenset() if indices is None else indices - available
        if absent:
            missing.append(f"{side} {format_indices(absent)}")
        attribute = dict(family.sides)[side]
        chosen.extend((f"{attribute}.{index}", blocks[index]) for index in sorted(picked))
    for side in ("input", "output"):
        indices = selection.indices(side)
        if indices:
            missing.append(f"{side} {format_indices(indices)}")
    return chosen, missing
