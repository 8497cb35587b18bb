"""XYZ-plot axes: each sets one SEG value on the cell's processing object and turns SEG on."""

from __future__ import annotations

from dataclasses import dataclass

from .params import HIRES_MODES

OVERRIDES_ATTRIBUTE = "seg_xyz_overrides"


@dataclass(frozen=True)
class Axis:
    label: str
    name: str  # SEGParams field
    kind: type
    choices: tuple[str, ...] = ()


AXES = (
    Axis("[SEG] Scale", "scale", float),
    Axis("[SEG] Sigma", "sigma", float),
    Axis("[SEG] Start", "start", float),
    Axis("[SEG] End", "end", float),
    Axis("[SEG] Layers", "layers", str),
    Axis("[SEG] Branch", "branch", str, ("uncond", "cond")),
    Axis("[SEG] Hires", "hires", str, HIRES_MODES),
)


def make_apply(name: str):
    """The xyz apply function for one field: ``fn(p, value, all_values)``."""

    def apply(p, value, _values) -> None:
        # a new dict per cell: xyz copies p shallowly, so never mutate one shared between cells
        overrides = dict(getattr(p, OVERRIDES_ATTRIBUTE, None) or {})
        overrides[name] = value
        overrides["enabled"] = True
        setattr(p, OVERRIDES_ATTRIBUTE, overrides)

    return apply


def overrides_of(p) -> dict:
    return dict(getattr(p, OVERRIDES_ATTRIBUTE, None) or {})
