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
            "Each step is pushed away from a version of itself made with blurred attention: usually "
            "crisper structure and more coherent images. Needs no prompt; works with or without CFG."),
    Control("scale", "slider", "SEG scale (γ)",
            "How hard SEG pushes. Higher: stronger structure and contrast, until colours burn. "
            "3 is the paper's value; 0 turns SEG off.",
            minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1], step=0.1),
    Control("sigma", "dropdown", "Blur sigma (σ)",
            "How widely the attention is blurred, in cells of the layer's grid. Higher: stronger; inf "
            "(the strongest, the paper's best) blurs over the whole image. Try 1, 4, 16 or inf; "
            "a value near 0 changes nothing.", choices=SIGMA_CHOICES),
    Control("branch", "radio", "Smoothed branch",
            "Which prediction gets the blurred twin: uncond (the negative prompt's, as in the paper) "
            "or cond (the prompt's, as in the authors' code). Steps without a negative prompt use cond.",
            advanced=True, choices=("uncond", "cond")),
    Control("layers", "textbox", "Blocks",
            "Where in the model the attention is blurred. middle (default) is the usual choice for "
            "every model. Other blocks move the effect to coarser or finer detail: input 7-8, "
            "output 0-2 or all on SD1/SDXL; double 7-9 on Flux, joint 7-9 on SD3.5, block 10-12 on "
            "one-list models (Qwen-Image, Z-Image, Wan, ...). Separate with commas.", advanced=True),
    Control("start", "slider", "Start (fraction of steps)",
            "SEG guides only the steps from start to end: 0 is the first step, 1 the end of "
            "sampling. Guiding only the first half shapes composition and leaves fine detail alone.",
            advanced=True, minimum=0.0, maximum=1.0, step=0.01),
    Control("end", "slider", "End (fraction of steps)",
            "SEG stops guiding here (a fraction of the steps; 1 = until the last step).",
            advanced=True, minimum=0.0, maximum=1.0, step=0.01),
    Control("hires", "radio", "Hires. fix pass",
            "What SEG does in the hires. fix pass: the same settings as above, off, or custom (the "
            "two settings below).", advanced=True, choices=HIRES_MODES),
    Control("hires_scale", "slider", "Hires SEG scale (γ)",
            "How hard SEG pushes in a custom hires. fix pass.", advanced=True,
            minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1], step=0.1),
    Control("hires_sigma", "dropdown", "Hires blur sigma (σ)",
            "How widely the attention is blurred in a custom hires. fix pass.", advanced=True,
            choices=SIGMA_CHOICES),
)  # fmt: skip

assert tuple(c.name for c in CONTROLS) == ARG_NAMES, "the controls are the API order"
