"""The SEG parameters, validated and normalised from the UI, the API and infotext (spec §4).

Every entry point funnels into ``SEGParams.from_values``: wrong types and NaN raise
``SEGParamError`` naming the field; out-of-range numbers are clamped and the clamp is reported in
``SEGParams.notes``, so the webui glue can tell the user without failing the generation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from .blur import INFINITE_SIGMA_THRESHOLD, is_identity_sigma
from .guidance import BRANCHES
from .layers import LayerSelection, parse_layers

SCALE_RANGE = (0.0, 30.0)
SIGMA_MAX_FINITE = INFINITE_SIGMA_THRESHOLD
HIRES_MODES = ("same", "off", "custom")

# Positional API/UI order: the order of the controls ui() returns. Never reorder: it is the API.
ARG_NAMES = (
    "enabled", "scale", "sigma", "branch", "layers",
    "start", "end", "hires", "hires_scale", "hires_sigma",
)  # fmt: skip

INFOTEXT_KEYS = {
    "scale": "SEG scale",
    "sigma": "SEG sigma",
    "branch": "SEG branch",
    "layers": "SEG layers",
    "start": "SEG start",
    "end": "SEG end",
    "hires": "SEG hires",
    "hires_scale": "SEG hires scale",
    "hires_sigma": "SEG hires sigma",
}
INFOTEXT_WARNING_KEY = "SEG warning"

_TRUE = {"true", "1", "yes", "on", "enabled", "enable"}
_FALSE = {"false", "0", "no", "off", "disabled", "disable", ""}
_INF = {"inf", "+inf", "infinity", "+infinity", "∞", "-1", "-1.0"}
_BRANCH_ALIASES = {"uncond": "uncond", "unconditional": "uncond", "negative": "uncond",
                   "cond": "cond", "conditional": "cond", "positive": "cond"}  # fmt: skip


class SEGParamError(ValueError):
    """A value that cannot be used; the message names the field."""

    def __init__(self, name: str, value: object, reason: str):
        self.field = name
        self.value = value
        self.reason = reason
        super().__init__(f"SEG setting '{name}': {reason} (got {value!r})")


def parse_bool(name: str, value: object) -> bool:
    """A boolean from True/False, 0/1 or their usual spellings; SEGParamError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SEGParamError(name, value, "expected true or false")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SEGParamError(name, value, "expected a number")
    try:
        number = float(value)
    except ValueError:
        raise SEGParamError(name, value, "expected a number") from None
    if math.isnan(number):
        raise SEGParamError(name, value, "NaN is not a value")
    return number


def _clamped(name: str, value: object, low: float, high: float, notes: list[str]) -> float:
    number = _number(name, value)
    clamped = min(max(number, low), high)
    if clamped != number:
        notes.append(
            f"SEG setting '{name}': {value!r} is outside [{low:g}, {high:g}], clamped to {clamped:g}"
        )
    return clamped


def _sigma(name: str, value: object, notes: list[str]) -> float:
    if isinstance(value, str) and value.strip().lower() in _INF:
        return math.inf
    number = _number(name, value)
    if number == -1 or number > SIGMA_MAX_FINITE:
        return math.inf  # the documented spellings of ∞, and the reference's σ > 9999 rule
    if number < 0:
        notes.append(f"SEG setting '{name}': {value!r} is negative, taken as inf (write inf or -1)")
        return math.inf
    return number


def _choice(name: str, value: object, options: Sequence[str], aliases: Mapping[str, str]) -> str:
    key = value.strip().lower() if isinstance(value, str) else None
    if key in aliases:
        return aliases[key]
    raise SEGParamError(name, value, f"expected one of {', '.join(options)}")


def _layers(name: str, value: object) -> str:
    try:
        selection = parse_layers(value)  # type: ignore[arg-type]
    except ValueError as error:
        raise SEGParamError(name, value, str(error)) from None
    return selection.canonical()


def values_from_args(args: Sequence[object]) -> dict[str, object]:
    """Named values from positional args, or from a dict given as the first arg (the API's named
    form; the positional defaults the webui appends after it are ignored)."""
    if len(args) >= 1 and isinstance(args[0], Mapping):
        return dict(args[0])
    if len(args) > len(ARG_NAMES):
        raise SEGParamError("args", list(args), f"at most {len(ARG_NAMES)} values expected")
    return dict(zip(ARG_NAMES, args, strict=False))


def format_number(value: float) -> str:
    """How numbers are written to infotext: ``inf``, ``3``, ``2.5``."""
    if math.isinf(value):
        return "inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class SEGParams:
    enabled: bool = False
    scale: float = 3.0
    sigma: float = math.inf
    branch: str = "uncond"
    layers: str = "middle"
    start: float = 0.0
    end: float = 1.0
    hires: str = "same"
    hires_scale: float = 3.0
    hires_sigma: float = math.inf
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> SEGParams:
        """Validate named values; absent or None values take their defaults."""
        unknown = [key for key in values if key not in ARG_NAMES]
        if unknown:
            raise SEGParamError(str(unknown[0]), values[unknown[0]], "unknown parameter name; "
                                f"known: {', '.join(ARG_NAMES)}")  # fmt: skip
        notes: list[str] = []
        given = {key: value for key, value in values.items() if value is not None}
        out: dict[str, object] = {}
        for key, value in given.items():
            if key == "enabled":
                out[key] = parse_bool(key, value)
            elif key in ("scale", "hires_scale"):
                out[key] = _clamped(key, value, *SCALE_RANGE, notes)
            elif key in ("sigma", "hires_sigma"):
                out[key] = _sigma(key, value, notes)
            elif key in ("start", "end"):
                out[key] = _clamped(key, value, 0.0, 1.0, notes)
            elif key == "branch":
                out[key] = _choice(key, value, BRANCHES, _BRANCH_ALIASES)
            elif key == "layers":
                out[key] = _layers(key, value)
            elif key == "hires":
                out[key] = _choice(key, value, HIRES_MODES, {m: m for m in HIRES_MODES})
        params = cls(**out, notes=tuple(notes))  # type: ignore[arg-type]
        if params.start >= params.end:
            notes.append(f"SEG start {params.start:g} is not before end {params.end:g}: "
                         "SEG is active on no step")  # fmt: skip
            params = replace(params, notes=tuple(notes))
        return params

    @classmethod
    def from_args(cls, args: Sequence[object]) -> SEGParams:
        """From the script's positional args (UI or API): ``[enabled, scale, sigma, ...]``, or a
        single dict of named values as the first arg."""
        return cls.from_values(values_from_args(args))

    @classmethod
    def from_infotext(cls, params: Mapping[str, object]) -> SEGParams:
        """From parsed infotext: enabled exactly when ``SEG scale`` is present; keys that are
        absent take their defaults so a pasted image reproduces exactly."""
        values: dict[str, object] = {"enabled": INFOTEXT_KEYS["scale"] in params}
        for name, key in INFOTEXT_KEYS.items():
            if key in params:
                values[name] = params[key]
        return cls.from_values(values)

    def to_args(self) -> list[object]:
        """The positional list, in ``ARG_NAMES`` order (σ = ∞ as ``"inf"``)."""
        return [
            format_number(value) if name in ("sigma", "hires_sigma") else value
            for name, value in ((n, getattr(self, n)) for n in ARG_NAMES)
        ]

    def to_infotext(self) -> dict[str, str]:
        """Infotext entries: scale and sigma always, the rest only when not at their default."""
        default = SEGParams()
        entries = {}
        for name, key in INFOTEXT_KEYS.items():
            value = getattr(self, name)
            if name in ("scale", "sigma") or value != getattr(default, name):
                entries[key] = format_number(value) if isinstance(value, float) else str(value)
        return entries

    @property
    def selection(self) -> LayerSelection:
        return parse_layers(self.layers)

    def for_pass(self, is_hires_pass: bool) -> tuple[float, float] | None:
        """(γ, σ) for a sampling pass, or None when this pass runs without SEG."""
        if not self.enabled:
            return None
        scale, sigma = self.scale, self.sigma
        if is_hires_pass and self.hires == "off":
            return None
        if is_hires_pass and self.hires == "custom":
            scale, sigma = self.hires_scale, self.hires_sigma
        if scale == 0 or is_identity_sigma(sigma) or self.start >= self.end:
            return None
        return scale, sigma
