"""Which blocks get smoothed self-attention, and (UNets) their ``attn1`` modules.

Syntax (case-insensitive, items separated by commas or semicolons):
``middle`` · ``input`` / ``output`` (every block of that side) · ``input 7`` · ``input 4-8`` ·
``output 0-2 5`` · ``all``. Aliases: ``mid``; ``in``/``down``; ``out``/``up``.
Diffusion transformers (``transformers/``) name their blocks the same way: ``double 7-9`` and
``single 0-37`` (Flux, Chroma, Flux.2), ``joint 5-12`` (SD3.5), ``block 10-12`` (the one block list of
Qwen-Image, Z-Image, Lumina-2, Wan, Anima and the other single-list transformers). On a transformer
``middle`` stands for that family's default blocks; ``all`` is every block of whatever model is
loaded.

SD1/SD2 (``ldm``) and SDXL (``sgm``) UNets share the ``input_blocks`` / ``middle_block`` /
``output_blocks`` naming, so one resolver serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

INPUT, MIDDLE, OUTPUT = "input", "middle", "output"
DOUBLE, SINGLE, JOINT, BLOCK = "double", "single", "joint", "block"
_SIDE_ORDER = (INPUT, MIDDLE, OUTPUT)
INDEXED_SIDES = (INPUT, OUTPUT, DOUBLE, SINGLE, JOINT, BLOCK)
TRANSFORMER_SIDES = (DOUBLE, SINGLE, JOINT, BLOCK)
_ALIASES = {
    "input": INPUT, "in": INPUT, "down": INPUT,
    "middle": MIDDLE, "mid": MIDDLE,
    "output": OUTPUT, "out": OUTPUT, "up": OUTPUT,
    "double": DOUBLE, "single": SINGLE, "joint": JOINT,
    "block": BLOCK, "blocks": BLOCK, "layer": BLOCK, "layers": BLOCK,
}  # fmt: skip
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_BLOCK_INDEX = 99


@dataclass(frozen=True)
class LayerSelection:
    """Selected blocks per side: ``None`` means every block of that side."""

    input: frozenset[int] | None = frozenset()
    middle: bool = False
    output: frozenset[int] | None = frozenset()
    double: frozenset[int] | None = frozenset()
    single: frozenset[int] | None = frozenset()
    joint: frozenset[int] | None = frozenset()
    block: frozenset[int] | None = frozenset()

    def indices(self, side: str) -> frozenset[int] | None:
        """The chosen block indices of an indexed side (``None``: every block)."""
        return getattr(self, side)

    def selects(self, side: str, index: int) -> bool:
        if side == MIDDLE:
            return self.middle
        chosen = self.indices(side)
        return chosen is None or index in chosen

    def is_empty(self) -> bool:
        return not self.middle and all(self.indices(side) == frozenset() for side in INDEXED_SIDES)

    def names_transformer_blocks(self) -> bool:
        return any(self.indices(side) != frozenset() for side in TRANSFORMER_SIDES)

    def canonical(self) -> str:
        """A normalised spelling of the selection (what infotext stores)."""
        if self.middle and all(self.indices(side) is None for side in INDEXED_SIDES):
            return "all"
        parts = []
        for side in (*_SIDE_ORDER, *TRANSFORMER_SIDES):
            if side == MIDDLE:
                if self.middle:
                    parts.append(MIDDLE)
                continue
            chosen = self.indices(side)
            if chosen is None:
                parts.append(side)
            elif chosen:
                parts.append(f"{side} {format_indices(chosen)}")
        return ", ".join(parts)


def format_indices(indices: frozenset[int]) -> str:
    ordered = sorted(indices)
    runs: list[list[int]] = []
    for index in ordered:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_layers(text: str) -> LayerSelection:
    """Parse the layer syntax; raises ValueError with a readable message on bad input."""
    if not isinstance(text, str):
        raise ValueError(f"expected text such as 'middle' or 'input 7-8', got {text!r}")
    items = [item.strip() for item in re.split(r"[,;]", text.strip().lower()) if item.strip()]
    if not items:
        raise ValueError("no blocks named; use e.g. 'middle' or 'input 7-8, middle'")
    chosen: dict[str, frozenset[int] | None] = {side: frozenset() for side in INDEXED_SIDES}
    middle = False
    for item in items:
        words = item.split()
        if words == ["all"]:
            chosen = dict.fromkeys(INDEXED_SIDES)
            middle = True
            continue
        side = _ALIASES.get(words[0])
        if side is None:
            raise ValueError(f"unknown block {words[0]!r} in {item!r} (use input, middle, output; "
                             "double, single, joint, block on transformers)")  # fmt: skip
        if side == MIDDLE:
            if words[1:] not in ([], ["0"]):
                raise ValueError(f"the middle block takes no index: {item!r}")
            middle = True
            continue
        if len(words) == 1:
            chosen[side] = None
            continue
        indices: set[int] = set()
        for word in words[1:]:
            match = _RANGE.match(word)
            if not match:
                raise ValueError(f"bad block index {word!r} in {item!r} (use e.g. 7 or 4-8)")
            first = int(match.group(1))
            last = int(match.group(2) or first)
            if first > last or last > MAX_BLOCK_INDEX:
                raise ValueError(f"bad block range {word!r} in {item!r}")
            indices.update(range(first, last + 1))
        if chosen[side] is not None:
            chosen[side] = chosen[side] | frozenset(indices)
    return LayerSelection(middle=middle, **chosen)


def _is_self_attention(block: nn.Module, name: str, module: nn.Module) -> bool:
    if name.rsplit(".", 1)[-1] != "attn1" or not hasattr(module, "to_q"):
        return False
    # ldm/sgm can turn attn1 into cross-attention (disable_self_attn): that is not SEG's target.
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    owner = block.get_submodule(owner_name) if owner_name else block
    return not getattr(owner, "disable_self_attn", False)


def unet_blocks(unet: nn.Module) -> list[tuple[str, int, str, nn.Module]]:
    """(side, index, qualified name, block) for every block of an ldm/sgm UNet."""
    blocks = []
    for side, attribute in ((INPUT, "input_blocks"), (OUTPUT, "output_blocks")):
        for index, block in enumerate(getattr(unet, attribute, None) or []):
            blocks.append((side, index, f"{attribute}.{index}", block))
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        blocks.append((MIDDLE, 0, "middle_block", middle))
    return blocks


def blocks_before(unet: nn.Module, modules) -> list[tuple[str, int, nn.Module]]:
    """``(side, index, block)`` of the blocks that run before the first block holding one of
    ``modules``, in execution order (all blocks when none holds one)."""
    ordered = [entry for side in _SIDE_ORDER for entry in unet_blocks(unet) if entry[0] == side]
    wanted = {id(module) for module in modules}
    before = []
    for side, index, _, block in ordered:
        if any(id(module) in wanted for module in block.modules()):
            break
        before.append((side, index, block))
    return before


def resolve_attn1(unet: nn.Module, selection: LayerSelection) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of the selected blocks, as (qualified name, module)."""
    found = []
    for side, index, prefix, block in unet_blocks(unet):
        if not selection.selects(side, index):
            continue
        for name, module in block.named_modules():
            if _is_self_attention(block, name, module):
                found.append((f"{prefix}.{name}", module))
    return found


def attn1_levels(unet: nn.Module) -> dict[int, int]:
    """The UNet level (0 = full latent resolution) of every self-attention module, keyed by
    ``id(module)``, from the block structure: each input block holding a ``Downsample`` moves the
    blocks after it one level down, each output block holding an ``Upsample`` one level up.

    The level fixes a layer's token grid, so a wrapper that changes the tokens attn1 sees (token
    merging, tiling) cannot pass for another level with the same token count."""
    levels: dict[int, int] = {}
    level = 0
    for side, _, _, block in sorted(unet_blocks(unet), key=lambda item: _SIDE_ORDER.index(item[0])):
        for name, module in block.named_modules():
            if _is_self_attention(block, name, module):
                levels[id(module)] = level
        kinds = {type(module).__name__ for module in block.modules()}
        if side == INPUT and "Downsample" in kinds:
            level += 1
        elif side == OUTPUT and "Upsample" in kinds:
            level -= 1
    return levels
