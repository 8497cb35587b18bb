"""The script's controls as data: label, help text, range and default of each, in API order.

The gradio glue builds its components from this table, so the API's positional order, the
labels ``/sdapi/v1/script-info`` reports and the infotext keys are defined in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import ARG_NAMES, HIRES_MODES, INFOTEXT_KEYS, SCALE_RANGE, SEGParams, format_number

TITLE = "Smoothed Energy Guidance"
SIGMA_CHOICES = ("inf", "1", "2", "4", "10", "16")


@dataclass(frozen=True)
class Control:
    name: str  # SEGParams field, and the key of the API's named dict
    kind: str  # accordion | slider | dropdown | radio | textbox
    label: str
    info: str
    advanced: bool = False
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def infotext_key(self) -> str | None:
        return INFOTEXT_KEYS.get(self.name)

    def default(self, defaults: SEGParams) -> object:
        value = getattr(defaults, self.name)
        return format_number(value) if self.name in ("sigma", "hires_sigma") else value


CONTROLS = (
    Control("enabled", "accordion", TITLE,
            "Guide every step away from a prediction made with blurred self-attention (no prompt needed)."),
    Control("scale", "slider", "SEG scale (γ)",
            "Strength of the push away from the smoothed prediction. Paper and reference: 3. "
            "0 turns SEG off.", minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1], step=0.1),
    Control("sigma", "dropdown", "Blur sigma (σ)",
            "How far the attention queries are blurred, in latent tokens. inf = every query becomes "
            "the mean (strongest; the paper's best FID). 10 is milder; the paper sweeps 1, 4, 16, inf. "
            "Type any number ≥ 0 (≤ 1/6 changes nothing).", choices=SIGMA_CHOICES),
    Control("branch", "radio", "Smoothed branch",
            "uncond: smooth the negative-prompt prediction (the paper, Eq. 10). cond: smooth the "
            "positive prediction (the reference code). Steps without a negative pass always use cond.",
            advanced=True, choices=("uncond", "cond")),
    Control("layers", "textbox", "Blocks",
            "Which blocks get smoothed self-attention. UNets (SD1/SD2/SDXL): middle (default, as the "
            "paper), input 7-8, output 0-2, input, output or all. Transformers on Forge and Forge Neo: "
            "double 7-9, single 0-37 (Flux, Chroma, Flux.2), joint 5-12 (SD3.5), block 10-12 (Qwen-Image, "
            "Z-Image, Lumina-2, Wan and the other one-list models), all; there middle means the "
            "model's default blocks. Separate with commas.", advanced=True),
    Control("start", "slider", "Start (fraction of steps)",
            "SEG is active on step i of n when start ≤ i/n < end.", advanced=True,
            minimum=0.0, maximum=1.0, step=0.01),
    Control("end", "slider", "End (fraction of steps)",
            "SEG is active on step i of n when start ≤ i/n < end.", advanced=True,
            minimum=0.0, maximum=1.0, step=0.01),
    Control("hires", "radio", "Hires. fix pass",
            "same: the second pass uses the settings above; off: no SEG there; custom: the two "
            "settings below.", advanced=True, choices=HIRES_MODES),
    Control("hires_scale", "slider", "Hires SEG scale (γ)",
            "SEG scale of the hires. fix pass when that pass is custom.", advanced=True,
            minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1], step=0.1),
    Control("hires_sigma", "dropdown", "Hires blur sigma (σ)",
            "Blur sigma of the hires. fix pass when that pass is custom.", advanced=True,
            choices=SIGMA_CHOICES),
)  # fmt: skip

assert tuple(c.name for c in CONTROLS) == ARG_NAMES, "the controls are the API order"
