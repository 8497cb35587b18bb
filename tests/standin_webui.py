"""A minimal stand-in for the AUTOMATIC1111 v1.10.1 ``modules`` API and ``gradio`` (test-only).

Written for these tests from the webui's public signatures (``modules/scripts.py``,
``modules/script_callbacks.py``, ``modules/sd_samplers_cfg_denoiser.py``, ``modules/prompt_parser.py``,
``modules/infotext_utils.py``): same class and hook names, same argument order, the same CFG
batch layout (``[cond rows per image..., uncond rows]``), the same callback order (denoiser ->
uncond skip -> padding -> one batched call or chunked calls -> denoised -> combine -> mask blend
-> after-cfg) and the same paste conversions. Nothing here is copied from the webui.

``install()`` puts fresh module objects into ``sys.modules``; ``load_script()`` imports
``scripts/sd_webui_seg.py`` against them, as the webui's script loader does.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections import namedtuple
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- gradio
class _Component:
    def __init__(self, value=None, *, label=None, elem_id=None, info=None, visible=True, **kwargs):
        self.value, self.label, self.elem_id, self.info, self.visible = value, label, elem_id, info, visible
        self.kwargs = kwargs
        _Layout.created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Layout(_Component):
    created: list = []


def _gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")

    class Slider(_Component):
        def __init__(self, minimum=0, maximum=100, step=None, value=None, **kwargs):
            super().__init__(value if value is not None else minimum, **kwargs)
            self.minimum, self.maximum, self.step = minimum, maximum, step

    class Dropdown(_Component):
        def __init__(self, choices=None, value=None, **kwargs):
            super().__init__(value, **kwargs)
            self.choices = choices

    class Radio(Dropdown):
        pass

    class Checkbox(_Component):
        def __init__(self, value=False, **kwargs):
            super().__init__(value, **kwargs)

    class Textbox(_Component):
        def __init__(self, value="", lines=1, **kwargs):
            super().__init__(value, **kwargs)

    class Markdown(_Component):
        pass

    class Row(_Layout):
        pass

    class Accordion(_Layout):
        def __init__(self, label=None, open=True, **kwargs):
            super().__init__(None, label=label, **kwargs)
            self.open = open

    for cls in (Slider, Dropdown, Radio, Checkbox, Textbox, Markdown, Row, Accordion):
        setattr(gr, cls.__name__, cls)
    return gr


# ------------------------------------------------------------------------------------ modules
class Opts(types.SimpleNamespace):
    def add_option(self, key, info):
        self.data_labels[key] = info
        if not hasattr(self, key):
            setattr(self, key, info.default)


class OptionInfo:
    def __init__(
        self, default=None, label="", component=None, component_args=None, onchange=None, section=None
    ):
        self.default, self.label, self.component, self.component_args = (
            default,
            label,
            component,
            component_args,
        )
        self.section = section


class State(types.SimpleNamespace):
    pass


def _script_callbacks(unnamed: bool = False) -> types.ModuleType:
    cb = types.ModuleType("modules.script_callbacks")
    cb.unnamed_callbacks = unnamed
    cb.callbacks = {name: [] for name in ("cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "infotext_pasted",
                                          "before_ui", "ui_settings")}  # fmt: skip
    cb.errors = []

    class CFGDenoiserParams:
        def __init__(
            self,
            x,
            image_cond,
            sigma,
            sampling_step,
            total_sampling_steps,
            text_cond,
            text_uncond,
            denoiser=None,
        ):
            self.x, self.image_cond, self.sigma = x, image_cond, sigma
            self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
            self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser

    class CFGDenoisedParams:
        def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
            self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = (
                x,
                sampling_step,
                total_sampling_steps,
                inner_model,
            )

    class AfterCFGCallbackParams:
        def __init__(self, x, sampling_step, total_sampling_steps):
            self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps

    def registrar(kind):
        def register(callback, *, name=None):
            cb.callbacks[kind].append(callback)

        def register_unnamed(callback):  # Forge Classic's script_callbacks (A1111 before 1.8)
            cb.callbacks[kind].append(callback)

        return register_unnamed if cb.unnamed_callbacks else register

    def runner(kind):
        def run(*args):
            for callback in list(cb.callbacks[kind]):
                try:  # the webui reports and swallows callback exceptions
                    callback(*args)
                except Exception as error:
                    cb.errors.append(error)

        return run

    for kind in cb.callbacks:
        setattr(cb, f"on_{kind}", registrar(kind))
    cb.cfg_denoiser_callback = runner("cfg_denoiser")
    cb.cfg_denoised_callback = runner("cfg_denoised")
    cb.cfg_after_cfg_callback = runner("cfg_after_cfg")
    cb.infotext_pasted_callback = runner("infotext_pasted")
    cb.before_ui_callback = runner("before_ui")
    cb.ui_settings_callback = runner("ui_settings")
    cb.CFGDenoiserParams, cb.CFGDenoisedParams, cb.AfterCFGCallbackParams = (
        CFGDenoiserParams,
        CFGDenoisedParams,
        AfterCFGCallbackParams,
    )
    return cb


def _scripts() -> types.ModuleType:
    mod = types.ModuleType("modules.scripts")
    mod.AlwaysVisible = object()
    mod.ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
    mod.scripts_data = []

    class PostSampleArgs:
        def __init__(self, samples):
            self.samples = samples

    class Script:
        name = filename = args_from = args_to = None
        alwayson = is_txt2img = is_img2img = False
        infotext_fields = paste_field_names = None

        def title(self):
            raise NotImplementedError

        def show(self, is_img2img):
            return True

        def elem_id(self, item_id):
            import re

            need_tabname = self.show(True) == self.show(False)
            tabkind = "img2img" if self.is_img2img else "txt2img"
            tabname = f"{tabkind}_" if need_tabname else ""
            title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
            return f"script_{tabname}{title}_{item_id}"

    mod.Script, mod.PostSampleArgs = Script, PostSampleArgs
    return mod


def _ui_components(gr) -> types.ModuleType:
    mod = types.ModuleType("modules.ui_components")

    class InputAccordion(gr.Checkbox):
        def __init__(self, value, **kwargs):
            self.accordion_id = kwargs.get("elem_id")
            super().__init__(
                value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
            )
            self.accordion = gr.Accordion(label=kwargs.get("label"), open=value, elem_id=self.accordion_id)

        def __enter__(self):
            return self

    mod.InputAccordion = InputAccordion
    return mod


def install(monkeypatch, unnamed_callbacks: bool = False) -> types.SimpleNamespace:
    """Fresh stand-in modules in sys.modules (undone by monkeypatch). ``unnamed_callbacks``: the
    ``on_*`` registrars take no ``name`` (Forge Classic, A1111 before 1.8)."""
    gr = _gradio()
    _Layout.created = []
    modules = types.ModuleType("modules")
    modules.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.opts = Opts(batch_cond_uncond=True, skip_early_cond=0.0, s_min_uncond_all=False,
                       pad_cond_uncond=False, pad_cond_uncond_v0=False, data_labels={})  # fmt: skip
    shared.cmd_opts = types.SimpleNamespace(seg_disable=False)
    shared.state = State(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
    shared.sd_model = None
    shared.OptionInfo = OptionInfo
    parts = {
        "modules.shared": shared,
        "modules.script_callbacks": _script_callbacks(unnamed_callbacks),
        "modules.scripts": _scripts(),
        "modules.ui_components": _ui_components(gr),
    }
    monkeypatch.setitem(sys.modules, "gradio", gr)
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name, module in parts.items():
        monkeypatch.setitem(sys.modules, name, module)
        setattr(modules, name.split(".")[1], module)
    parts["modules.scripts"].script_callbacks = parts["modules.script_callbacks"]
    monkeypatch.syspath_prepend(str(ROOT))
    return types.SimpleNamespace(
        gr=gr,
        shared=shared,
        callbacks=parts["modules.script_callbacks"],
        scripts=parts["modules.scripts"],
        ui_components=parts["modules.ui_components"],
    )


def load_script(webui) -> types.ModuleType:
    """Import scripts/sd_webui_seg.py as the webui does (module name = file name)."""
    path = ROOT / "scripts" / "sd_webui_seg.py"
    spec = importlib.util.spec_from_file_location("sd_webui_seg.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, webui.scripts.Script)
            and value is not webui.scripts.Script
        ):
            webui.scripts.scripts_data.append(
                webui.scripts.ScriptClassData(value, str(path), str(ROOT), module)
            )
    return module


def attach_script(webui):
    """Load the script into ``webui`` and build its UI as the webui does at start-up: sets
    ``script_module``, ``controller``, ``script`` and ``components`` on ``webui``."""
    webui.script_module = load_script(webui)
    webui.controller = webui.script_module.controller
    webui.script = webui.script_module.SmoothedEnergyGuidanceScript()
    webui.components = webui.script.ui(False)
    return webui


# ------------------------------------------------------------------------- model and sampling
class Composable:
    """prompt_parser.ComposableScheduledPromptConditioning: one AND part and its weight."""

    def __init__(self, cond, weight=1.0):
        self.schedules = [types.SimpleNamespace(end_at_step=10**9, cond=cond)]
        self.weight = weight


class Multicond:
    """prompt_parser.MulticondLearnedConditioning: per image, its AND parts."""

    def __init__(self, batch):
        self.batch = batch
        self.shape = (len(batch),)


def stack_conds(tensors):
    # prompts of one batch with different token counts are padded by repeating the last vector
    length = max(t.shape[0] for t in tensors)
    return torch.stack(
        [torch.cat([t, t[-1:].repeat(length - t.shape[0], 1)]) if t.shape[0] < length else t for t in tensors]
    )


def reconstruct_multicond_batch(multicond, step):
    tensors, conds_list = [], []
    for prompts in multicond.batch:
        conds_list.append([])
        for prompt in prompts:
            conds_list[-1].append((len(tensors), prompt.weight))
            tensors.append(prompt.schedules[0].cond)
    return conds_list, stack_conds(tensors)


class KDiffusionWrapper(torch.nn.Module):
    """k-diffusion CompVisDenoiser shape: forward(x, sigma, cond={"c_crossattn": [...], "c_concat": [...]})
    returns the denoised (x0) prediction of an ldm UNet."""

    def __init__(self, sd_model):
        super().__init__()
        self.sd_model = sd_model

    def forward(self, x, sigma, **kwargs):
        cond = kwargs["cond"]
        context = torch.cat(cond["c_crossattn"], 1)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        t = (sigma * 100).round()
        eps = self.sd_model.model.diffusion_model(x * c_in[:, None, None, None], t, context=context)
        return x - eps * sigma[:, None, None, None]


class CFGDenoiser(torch.nn.Module):
    """modules.sd_samplers_cfg_denoiser.CFGDenoiser (v1.10.1) for crossattn models, with the same
    forward signature, batch layout, uncond skipping, padding, chunking and callback order."""

    def __init__(self, sampler, webui, p):
        super().__init__()
        self.sampler, self.webui, self.p = sampler, webui, p
        self.model_wrap = None
        self.mask = self.nmask = self.init_latent = None
        self.mask_before_denoising = False
        self.step, self.total_steps = 0, None

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = KDiffusionWrapper(self.webui.shared.sd_model)
        return self.model_wrap

    def pad_cond_uncond(self, cond, uncond):
        empty = self.webui.shared.sd_model.cond_stage_model_empty_prompt
        repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if repeats < 0:
            cond = torch.cat([cond, empty.repeat((cond.shape[0], -repeats, 1))], 1)
        elif repeats > 0:
            uncond = torch.cat([uncond, empty.repeat((uncond.shape[0], repeats, 1))], 1)
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        if uncond.shape[1] < cond.shape[1]:
            uncond = torch.hstack([uncond, uncond[:, -1:].repeat([1, cond.shape[1] - uncond.shape[1], 1])])
        elif uncond.shape[1] > cond.shape[1]:
            uncond = uncond[:, : cond.shape[1]]
        return cond, uncond

    @staticmethod
    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        cb, opts, state = self.webui.callbacks, self.webui.shared.opts, self.webui.shared.state
        if state.interrupted or state.skipped:
            raise InterruptedError
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]
        if self.mask_before_denoising and self.mask is not None:
            x = x * self.nmask + self.init_latent * self.mask
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat(
            [torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma]
        )
        image_cond_in = torch.cat(
            [torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond]
        )
        params = cb.CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self
        )
        cb.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        skip_uncond = False
        early = opts.skip_early_cond != 0.0 and self.step / self.total_steps <= opts.skip_early_cond
        ngms = (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond
        if early or ngms:
            skip_uncond = True
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        if opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        def make_cond(c_crossattn, c_concat):
            return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        model = self.inner_model
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = model(x_in, sigma_in, cond=make_cond(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = model(
                        x_in[a:b], sigma_in[a:b], cond=make_cond(cond_in[a:b], image_cond_in[a:b])
                    )
        else:
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = model(x_in[a:b], sigma_in[a:b], cond=make_cond(tensor[a:b], image_cond_in[a:b]))
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = model(x_in[-n:], sigma_in[-n:], cond=make_cond(uncond, image_cond_in[-n:]))
        first_rows = [c[0][0] for c in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[i : i + 1] for i in first_rows])])
        cb.cfg_denoised_callback(
            cb.CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, model)
        )
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        after = cb.AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cb.cfg_after_cfg_callback(after)
        self.step += 1
        return after.x


def sample(webui, p, x, sigmas, cond, uncond, cond_scale, image_cond=None, heun=False, s_min_uncond=0.0):
    """An Euler (or Heun) k-diffusion loop through the CFG denoiser, updating state like the webui."""
    sampler = types.SimpleNamespace(sampler_extra_args={"cond": cond, "uncond": uncond})
    denoiser = CFGDenoiser(sampler, webui, p)
    denoiser.total_steps = (2 * len(sigmas) - 3) if heun else len(sigmas) - 1
    p.denoiser = denoiser
    state = webui.shared.state
    state.sampling_steps = len(sigmas) - 1
    if image_cond is None:
        image_cond = torch.zeros(x.shape[0], 5, 1, 1)
    mask = getattr(p, "mask_for_test", None)
    if mask is not None:
        denoiser.mask, denoiser.nmask, denoiser.init_latent = mask, 1 - mask, p.init_latent_for_test
    x = x * sigmas[0]
    for i in range(len(sigmas) - 1):
        state.sampling_step = i
        s = sigmas[i].expand(x.shape[0])
        denoised = denoiser(x, s, uncond, cond, cond_scale, s_min_uncond, image_cond)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if heun and sigmas[i + 1] > 0:
            x2 = x + d * dt
            denoised2 = denoiser(
                x2, sigmas[i + 1].expand(x.shape[0]), uncond, cond, cond_scale, s_min_uncond, image_cond
            )
            d = (d + (x2 - denoised2) / sigmas[i + 1]) / 2
        x = x + d * dt
    return x


def sigmas(steps: int) -> torch.Tensor:
    return torch.tensor([14.6 * math.exp(-i * 0.9) for i in range(steps)] + [0.0])


class Processing(types.SimpleNamespace):
    """The processing attributes the script reads (StableDiffusionProcessing)."""

    def __init__(self, **kwargs):
        defaults = dict(extra_generation_params={}, comments={}, is_hr_pass=False, is_api=False)
        super().__init__(**{**defaults, **kwargs})

    def comment(self, text):
        self.comments[text] = 1
