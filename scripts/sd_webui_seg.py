"""Smoothed Energy Guidance: webui glue. All behaviour lives in ``lib_seg``."""

import inspect
import logging

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_seg import __version__
from lib_seg.controller import SEGController
from lib_seg.infotext import ENABLED_FIELD, paste_field_names, value_fields
from lib_seg.params import SEGParamError, SEGParams
from lib_seg.ui_spec import CONTROLS, TITLE
from lib_seg.xyz_axes import AXES, make_apply

log = logging.getLogger("sd_webui_seg")
if not log.handlers and not logging.getLogger().handlers:  # the webui may not configure logging
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False  # the webui may configure the root logger later: no double lines
if log.level == logging.NOTSET:  # reForge sets the root logger to WARNING: keep SEG's info lines
    log.setLevel(logging.INFO)

SETTINGS_SECTION = ("seg", TITLE)
DEFAULT_SETTINGS = {"scale": "seg_default_scale", "sigma": "seg_default_sigma",
                    "branch": "seg_default_branch", "layers": "seg_default_layers"}  # fmt: skip
HOOKS_DISABLED = bool(getattr(shared.cmd_opts, "seg_disable", False))


controller = SEGController(current_model=lambda: shared.sd_model)
log.info("Smoothed Energy Guidance %s%s", __version__, " (off: --seg-disable)" if HOOKS_DISABLED else "")


def default_params() -> SEGParams:
    """Code defaults, overridden by the user's Settings where those are valid."""
    values = {}
    for name, key in DEFAULT_SETTINGS.items():
        value = getattr(shared.opts, key, None)
        if value not in (None, ""):
            values[name] = value
    try:
        return SEGParams.from_values(values)
    except SEGParamError as error:
        log.warning("%s in Settings; using built-in defaults", error)
        return SEGParams()


def build_control(control, default, elem_id):
    common = {"label": control.label, "info": control.info, "elem_id": elem_id}
    if control.kind == "slider":
        return gr.Slider(minimum=control.minimum, maximum=control.maximum, step=control.step,
                         value=default, **common)  # fmt: skip
    if control.kind == "dropdown":
        return gr.Dropdown(choices=list(control.choices), value=default, allow_custom_value=True, **common)
    if control.kind == "radio":
        return gr.Radio(choices=list(control.choices), value=default, **common)
    return gr.Textbox(value=default, lines=1, **common)


class SmoothedEnergyGuidanceScript(scripts.Script):
    sorting_priority = 15  # Forge orders always-on scripts by this

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return False if HOOKS_DISABLED else scripts.AlwaysVisible

    def ui(self, is_img2img):
        # Called again by the API to read defaults: no side effects beyond building components.
        defaults = default_params()
        components = []
        enabled_control, *value_controls = CONTROLS
        with InputAccordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as enabled:
            components.append(enabled)
            gr.Markdown(enabled_control.info)
            with gr.Row():
                for control in value_controls[:2]:
                    components.append(
                        build_control(control, control.default(defaults), self.elem_id(control.name))
                    )
            with gr.Accordion("Advanced", open=False, elem_id=self.elem_id("advanced")):
                for control in value_controls[2:]:
                    components.append(
                        build_control(control, control.default(defaults), self.elem_id(control.name))
                    )
        for component in components:
            component.do_not_save_to_config = component is enabled
        self.infotext_fields = [(enabled, ENABLED_FIELD), *zip(components[1:], value_fields(), strict=True)]
        self.paste_field_names = paste_field_names()
        return components

    def process(self, p, *args):
        if not HOOKS_DISABLED:
            controller.one_call = bool(getattr(shared.opts, "seg_one_call", True))
            controller.share_prefix = bool(getattr(shared.opts, "seg_share_prefix", True))
            controller.process(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if not HOOKS_DISABLED:
            controller.start_pass(p)

    def post_sample(self, p, ps, *args):
        controller.end_pass()

    def postprocess_batch(self, p, *args, **kwargs):
        controller.end_pass()

    def postprocess(self, p, processed, *args):
        controller.end_pass()


def on_ui_settings():
    defaults = SEGParams()
    options = {
        "seg_default_scale": shared.OptionInfo(defaults.scale, "Default SEG scale (γ)", gr.Slider,
                                               {"minimum": 0.0, "maximum": 30.0, "step": 0.1}),
        "seg_default_sigma": shared.OptionInfo("inf", "Default blur sigma (σ): a number, or inf"),
        "seg_default_branch": shared.OptionInfo(defaults.branch, "Default smoothed branch", gr.Radio,
                                                {"choices": ["uncond", "cond"]}),
        "seg_default_layers": shared.OptionInfo(defaults.layers,
                                                "Default blocks (e.g. middle; double 7-9 on Flux)"),
        "seg_one_call": shared.OptionInfo(
            True, "Evaluate SEG's smoothed rows in the webui's own model call (faster; +1 row per image)",
            gr.Checkbox),
        "seg_share_prefix": shared.OptionInfo(
            True, "Share the blocks before the first smoothed one with their source rows (exact)",
            gr.Checkbox),
    }  # fmt: skip
    for key, option in options.items():
        option.section = SETTINGS_SECTION
        shared.opts.add_option(key, option)


def register_xyz_axes():
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            xyz = data.module
            break
    else:
        return
    known = {getattr(option, "label", None) for option in xyz.axis_options}
    for axis in AXES:
        if axis.label in known:  # on_before_ui fires again on UI reload
            continue
        xyz.axis_options.append(
            xyz.AxisOption(
                axis.label,
                axis.kind,
                make_apply(axis.name),
                choices=(lambda c=axis.choices: list(c)) if axis.choices else None,
            )
        )


def warn_about_title_clash():
    clashes = [
        data.path for data in scripts.scripts_data
        if data.script_class is not SmoothedEnergyGuidanceScript
        and getattr(data.script_class, "title", None) is not None
        and _title_of(data.script_class) == TITLE.lower()
    ]  # fmt: skip
    if clashes:
        log.warning("another script is also titled '%s' (%s): the API's alwayson_scripts routes to "
                    "whichever loads first", TITLE, ", ".join(clashes))  # fmt: skip


def _title_of(script_class) -> str | None:
    try:
        return str(script_class().title()).lower()
    except Exception:
        return None


def on_before_ui():
    try:
        register_xyz_axes()
    except Exception as error:  # the XYZ script is optional and may change
        log.warning("could not add XYZ plot axes: %s", error)
    warn_about_title_clash()


def register(add_callback, callback) -> None:
    """Named where the webui names callbacks (A1111 1.8+, Forge, reForge); Forge Classic's
    ``on_*`` take the callback alone."""
    if "name" in inspect.signature(add_callback).parameters:
        add_callback(callback, name="sd_webui_seg")
    else:
        add_callback(callback)


if not HOOKS_DISABLED:
    register(script_callbacks.on_cfg_denoiser, controller.on_cfg_denoiser)
    register(script_callbacks.on_cfg_denoised, controller.on_cfg_denoised)
    register(script_callbacks.on_cfg_after_cfg, controller.on_cfg_after_cfg)
    register(script_callbacks.on_before_ui, on_before_ui)
    register(script_callbacks.on_ui_settings, on_ui_settings)
