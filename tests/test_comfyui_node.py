"""The ComfyUI node (``__init__.py`` -> ``comfyui_nodes.py`` -> ``lib_seg.comfyui``) on ComfyUI's
model-patcher API (``tests/standin_comfyui.py``): loaded the way ComfyUI loads a custom-node
package, its inputs carry the webui controls' defaults and help, the guided step equals the spec
formula against the A1111 code path's smoothing (UNets) or the Forge kernel-slot smoothing
(transformers, through ComfyUI's attention override), the model it received is never changed,
every run starts clean and leaves no hook, and bad values or models pass the model through."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
import standin_comfyui as sc
import standin_forge as sf
import standin_neo_transformers as neo
import torch
from torch import nn
from unets import sd1_unet, sd2_unet

from lib_seg import parse_layers, resolve_attn1, transformers
from lib_seg.backends.a1111.patch import QueryBlurPatch
from lib_seg.params import SEGParams

ROOT = Path(__file__).resolve().parents[1]
CTX = 32
LATENT = (16, 24)
SIGMA0 = 3.0
# Neo's test transformers whose kernels get the call's transformer_options, as ComfyUI's do
OVERRIDE_FAMILIES = ("anima", "flux2_model", "krea", "lumina")


def load_package(name="custom_nodes_x_sd-webui-seg"):
    """The repository as ComfyUI's ``load_custom_node`` imports a folder: ``__init__.py`` by path
    under a module name of ComfyUI's making."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="module")
def package():
    loaded = load_package()
    yield loaded
    for name in [n for n in sys.modules if n == loaded.__name__ or n.startswith(loaded.__name__ + ".")]:
        del sys.modules[name]


@pytest.fixture
def comfy(monkeypatch):
    return sc.install(monkeypatch)


@pytest.fixture(scope="module")
def unet():
    return sd1_unet(model_channels=32, context_dim=CTX)


def node(package):
    return package.NODE_CLASS_MAPPINGS["SmoothedEnergyGuidance"]()


def defaults(package, **values):
    required = package.NODE_CLASS_MAPPINGS["SmoothedEnergyGuidance"].INPUT_TYPES()["required"]
    chosen = {name: spec[1]["default"] for name, spec in required.items() if name != "model"}
    return {**chosen, **values}


def conds(batch, seed=0, tokens=4):
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, CTX, generator=g), "uuid": f"u{seed}"}]


def sample(model, positive, negative, cfg, noise, sigmas=(SIGMA0, 0.0)):
    guider = sc.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, torch.tensor(sigmas))


def unet_reference(model, x, sigma, cond, neg, cfg, scale, blur_sigma, branch="uncond", layers="middle"):
    """The A1111 code path's smoothing (to_q hook on every row of an extra evaluation) on the same
    UNet, and the spec's formula."""
    kmodel = model.model
    net = kmodel.diffusion_model
    has_uncond = cfg != 1.0
    options = {"transformer_options": {}}
    c, u = sf.calc_cond_batch(kmodel, [cond, neg if has_uncond else None], x, sigma, options)
    modules = [m for _, m in resolve_attn1(net, parse_layers(layers))]
    source_conds = neg if branch == "uncond" and has_uncond else cond
    with QueryBlurPatch(modules, blur_sigma, unet=net) as patch:
        patch.rows = slice(None)
        smoothed = sf.calc_cond_batch(kmodel, [source_conds], x, sigma, options)[0]
    if not has_uncond:
        return c + scale * (c - smoothed)
    source = u if branch == "uncond" else c
    return u + cfg * (c - u) + scale * (source - smoothed)


def guided_paths(caplog):
    return [r.getMessage() for r in caplog.records if "guided evaluations" in r.getMessage()]


def no_hooks(net):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


# -- the package ---------------------------------------------------------------------------------
def test_the_package_loads_as_comfyui_loads_it_and_imports_no_host(package):
    assert set(package.NODE_CLASS_MAPPINGS) == {"SmoothedEnergyGuidance"}
    assert package.NODE_DISPLAY_NAME_MAPPINGS == {"SmoothedEnergyGuidance": "Smoothed Energy Guidance"}
    node_class = package.NODE_CLASS_MAPPINGS["SmoothedEnergyGuidance"]
    assert node_class.RETURN_TYPES == ("MODEL",)
    assert node_class.CATEGORY == "model_patches"
    assert callable(getattr(node_class(), node_class.FUNCTION))
    assert not any(name == "comfy" or name.startswith("comfy.") for name in sys.modules)
    webui_packages = ("modules", "gradio", "backend", "ldm_patched", "modules_forge", "launch")
    assert not set(webui_packages) & set(sys.modules)


def test_the_package_file_alone_defines_no_node():
    """pytest's collection imports the folder's ``__init__.py`` as a plain file when the clone's
    folder name is no Python name (CI's clone): that must neither fail nor load the node."""
    import runpy

    loaded = runpy.run_path(str(ROOT / "__init__.py"))
    assert loaded["NODE_CLASS_MAPPINGS"] == {} and loaded["NODE_DISPLAY_NAME_MAPPINGS"] == {}


def test_install_py_is_harmless_under_comfyui_manager(tmp_path):
    """ComfyUI-Manager runs a package's install.py with ComfyUI's python, from the package folder."""
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # installs nothing, says nothing with a current torch
    assert not (ROOT / "requirements.txt").exists()  # ComfyUI-Manager would pip-install it


def test_the_inputs_carry_the_webui_controls_defaults_and_help(package):
    from lib_seg.ui_spec import CONTROLS

    required = package.NODE_CLASS_MAPPINGS["SmoothedEnergyGuidance"].INPUT_TYPES()["required"]
    assert list(required) == ["model", "scale", "sigma", "branch", "blocks", "start_percent", "end_percent"]
    help_of = {control.name: control.info for control in CONTROLS}
    webui = SEGParams()
    assert required["scale"][1]["default"] == webui.scale
    assert (required["scale"][1]["min"], required["scale"][1]["max"]) == (0.0, 30.0)
    assert required["sigma"][1]["default"] == -1.0  # inf, as the webui's default
    assert required["branch"][0] == ["uncond", "cond"] and required["branch"][1]["default"] == webui.branch
    assert required["blocks"][1]["default"] == webui.layers
    assert (required["start_percent"][1]["default"], required["end_percent"][1]["default"]) == (0.0, 1.0)
    for name, field in (("scale", "scale"), ("branch", "branch"), ("blocks", "layers"),
                        ("start_percent", "start")):  # fmt: skip
        assert required[name][1]["tooltip"] == help_of[field]
    assert help_of["sigma"] in required["sigma"][1]["tooltip"] and "-1" in required["sigma"][1]["tooltip"]
    json_safe = [spec[1].get(key) for spec in required.values() for key in ("min", "max", "default")]
    assert all(not isinstance(v, float) or math.isfinite(v) for v in json_safe)  # /object_info is JSON


def test_the_webui_glue_imports_nothing_of_comfyui():
    """What ``scripts/sd_webui_seg.py`` imports of ``lib_seg``, in a fresh interpreter: no ComfyUI
    module and none of SEG's ComfyUI modules come with it."""
    import ast
    import subprocess

    glue = ast.parse((ROOT / "scripts" / "sd_webui_seg.py").read_text())
    froms = [node.module or "" for node in ast.walk(glue) if isinstance(node, ast.ImportFrom)]
    imported = sorted({module for module in froms if module.startswith("lib_seg")})
    assert "lib_seg.controller" in imported
    code = (f"import sys; import {', '.join(imported)}; "
            "print([m for m in sys.modules if m.split('.')[0] == 'comfy' or 'comfyui' in m])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- UNets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("branch", ["uncond", "cond"])
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_a_guided_step_equals_the_spec_formula(package, comfy, unet, caplog, cfg, branch):
    model = sc.model_patcher(unet)
    patched = node(package).patch(model, **defaults(package, scale=2.0, sigma=3.0, branch=branch))[0]
    noise = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(1))
    cond, neg = conds(2), conds(2, seed=9)
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        out = sample(patched, cond, neg, cfg, noise)
    sigma = torch.full((2,), SIGMA0)
    expected = unet_reference(model, noise * SIGMA0, sigma, cond, neg, cfg, 2.0, 3.0, branch)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert guided_paths(caplog) == ["SEG: 1 guided evaluations (shared-prefix: 1)"]
    assert no_hooks(model.model.diffusion_model)


def test_the_rows_ride_in_comfyuis_own_call(package, comfy, unet):
    model = sc.model_patcher(unet)
    patched = node(package).patch(model, **defaults(package))[0]
    sample(patched, conds(2), conds(2, seed=9), 5.0, torch.randn(2, 4, *LATENT))
    assert patched.model.calls == [6]  # one call for the step: 2 prompt, 2 negative, 2 SEG rows


def test_sd2_layout_and_chosen_blocks(package, comfy):
    net = sd2_unet(model_channels=32, context_dim=CTX)
    model = sc.model_patcher(net)
    values = defaults(package, scale=1.5, sigma=-1.0, blocks="input 4, middle")
    patched = node(package).patch(model, **values)[0]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    cond, neg = conds(1), conds(1, seed=3)
    out = sample(patched, cond, neg, 4.0, noise)
    expected = unet_reference(model, noise * SIGMA0, torch.full((1,), SIGMA0), cond, neg, 4.0, 1.5, math.inf,
                              layers="input 4, middle")  # fmt: skip
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def test_the_model_it_received_is_unchanged_and_runs_repeat(package, comfy, unet):
    model = sc.model_patcher(unet)
    noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(4))
    before = sample(model, conds(1), conds(1, seed=9), 5.0, noise)
    options_before = repr(model.model_options)
    patched = node(package).patch(model, **defaults(package))[0]
    first = sample(patched, conds(1), conds(1, seed=9), 5.0, noise, sigmas=(SIGMA0, 1.0, 0.0))
    second = sample(patched, conds(1), conds(1, seed=9), 5.0, noise, sigmas=(SIGMA0, 1.0, 0.0))
    assert torch.equal(first, second)
    assert repr(model.model_options) == options_before and model.wrappers == {}
    assert repr(patched.model_options) == options_before  # SEG's functions live in each run's copy only
    assert torch.equal(sample(model, conds(1), conds(1, seed=9), 5.0, noise), before)
    assert not torch.equal(first, before)


def test_scale_zero_passes_the_model_through(package, comfy, unet):
    model = sc.model_patcher(unet)
    assert node(package).patch(model, **defaults(package, scale=0.0))[0] is model


def test_start_and_end_follow_the_schedule_as_in_the_webui(package, comfy, unet, caplog):
    model = sc.model_patcher(unet)
    patched = node(package).patch(model, **defaults(package, start_percent=0.5, end_percent=0.75))[0]
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        sample(patched, conds(1), conds(1, seed=9), 5.0, torch.randn(1, 4, *LATENT),
               sigmas=(4.0, 3.0, 2.0, 1.0, 0.0))  # fmt: skip
    assert guided_paths(caplog) == ["SEG: 1 guided evaluations (shared-prefix: 1)"]  # step 2 of 4 only


def test_the_last_seg_node_on_a_model_wins(package, comfy, unet, caplog):
    model = sc.model_patcher(unet)
    once = node(package).patch(model, **defaults(package, scale=2.0))[0]
    twice = node(package).patch(once, **defaults(package, scale=2.0))[0]
    assert sum(len(w) for w in twice.wrappers[sc.OUTER_SAMPLE].values()) == 1
    noise = torch.randn(1, 4, *LATENT)
    assert torch.equal(sample(once, conds(1), conds(1, seed=9), 5.0, noise),
                       sample(twice, conds(1), conds(1, seed=9), 5.0, noise))  # fmt: skip


def test_another_nodes_model_wrapper_gets_the_separate_evaluation(package, comfy, unet, caplog):
    model = sc.model_patcher(unet).clone()
    def plain_call(apply_model, args):
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(plain_call)
    patched = node(package).patch(model, **defaults(package, scale=2.0, sigma=3.0))[0]
    noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        out = sample(patched, conds(1), conds(1, seed=9), 5.0, noise)
    sigma = torch.full((1,), SIGMA0)
    expected = unet_reference(model, noise * SIGMA0, sigma, conds(1), conds(1, seed=9), 5.0, 2.0, 3.0)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert guided_paths(caplog) == ["SEG: 1 guided evaluations (separate: 1)"]


def test_an_error_mid_run_leaves_nothing_behind(package, comfy, unet, monkeypatch):
    model = sc.model_patcher(unet)
    noise = torch.randn(1, 4, *LATENT)
    before = sample(model, conds(1), conds(1, seed=9), 5.0, noise)
    patched = node(package).patch(model, **defaults(package))[0]
    monkeypatch.setattr(sc, "sampling_function", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        sample(patched, conds(1), conds(1, seed=9), 5.0, noise)
    monkeypatch.undo()
    sc.install(monkeypatch)
    assert no_hooks(model.model.diffusion_model)
    assert torch.equal(sample(model, conds(1), conds(1, seed=9), 5.0, noise), before)


@pytest.mark.parametrize(("values", "words"), [
    ({"sigma": float("nan")}, "'sigma': NaN"),
    ({"scale": "a lot"}, "'scale': expected a number"),
    ({"blocks": "sideways 3"}, "'blocks'"),
    ({"branch": "both"}, "'branch': expected one of uncond, cond"),
    ({"blocks": "input 99"}, "match no self-attention"),
    ({"blocks": "double 7-9"}, "double/single/joint name transformer blocks"),
])  # fmt: skip
def test_bad_values_pass_the_model_through_with_a_message(package, comfy, unet, caplog, values, words):
    model = sc.model_patcher(unet)
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        assert node(package).patch(model, **defaults(package, **values))[0] is model
    assert words in caplog.text


def test_out_of_range_values_are_clamped_and_named(package, comfy, unet, caplog):
    model = sc.model_patcher(unet)
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        patched = node(package).patch(model, **defaults(package, scale=99.0))[0]
    assert patched is not model and "'scale': 99.0 is outside [0, 30], clamped to 30" in caplog.text


def test_a_comfyui_without_sampling_wrappers_passes_the_model_through(package, comfy, unet, caplog):
    class OldModelPatcher(sf.PatcherBase):  # ComfyUI before its patcher extensions (2024)
        def get_model_object(self, name):
            return getattr(self.model, name)

    model = OldModelPatcher(sc.model_patcher(unet).model)
    assert not hasattr(model, "add_wrapper_with_key")
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        assert node(package).patch(model, **defaults(package))[0] is model
    assert "no sampling wrappers" in caplog.text


def test_a_model_seg_does_not_know_passes_through(package, comfy, caplog):
    model = sc.model_patcher(nn.Linear(4, 4))
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        assert node(package).patch(model, **defaults(package))[0] is model
    assert "nor a transformer SEG knows" in caplog.text and "ComfyUI" in caplog.text


# -- transformers, through ComfyUI's attention override -------------------------------------------
@pytest.fixture
def families(monkeypatch, comfy):
    modules = neo.install(monkeypatch, names=(*OVERRIDE_FAMILIES, "qwen"))
    for module in modules.values():  # ComfyUI's kernels are wrapped by wrap_attn
        kernel = vars(module).get("attention_function")
        if kernel is not None:
            monkeypatch.setattr(module, "attention_function", sc.wrap_attn(kernel))
    return modules


def transformer_reference(model, module, family_name, x, sigma, cond, neg, cfg, scale, blur_sigma):
    """Forge's kernel-slot smoothing (tested against the blur reference per family) in a separate
    evaluation, and the spec's formula."""
    net = model.model.diffusion_model
    family = transformers.family_of(net)
    assert family.name == family_name
    chosen, _ = transformers.resolve_blocks(net, family, parse_layers("middle"))
    blocks = [block for _, block in chosen]
    slots = [transformers.KernelSlot(vars(module), "attention_function")]
    options = {"transformer_options": {}}
    c, u = sf.calc_cond_batch(model.model, [cond, neg if cfg != 1.0 else None], x, sigma, options)
    smoothing = transformers.TransformerSmoothing(net, family, blocks, slots, blur_sigma)
    with smoothing.rows_smoothed(0):
        smoothed = sf.calc_cond_batch(model.model, [neg if cfg != 1.0 else cond], x, sigma, options)[0]
    if cfg == 1.0:
        return c + scale * (c - smoothed)
    return u + cfg * (c - u) + scale * (u - smoothed)


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("name", OVERRIDE_FAMILIES)
def test_transformers_are_smoothed_through_comfyuis_attention_override(package, families, caplog, name, cfg):
    module = families[name]
    net = module.build()
    model = sc.model_patcher(net)
    g = torch.Generator().manual_seed(3)
    noise = module.latent(2, 7, 10, g)
    cond, neg = module.conds(2), module.conds(2, seed=5)
    patched = node(package).patch(model, **defaults(package, scale=2.0, sigma=2.0))[0]
    sc.override_calls.clear()
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        out = sample(patched, cond, neg, cfg, noise)
    assert sc.override_calls  # the kernels were reached through the override, no module global swapped
    expected = transformer_reference(model, module, module.FAMILY, noise * SIGMA0, torch.full((2,), SIGMA0),
                                     cond, neg, cfg, 2.0, 2.0)  # fmt: skip
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert guided_paths(caplog) == ["SEG: 1 guided evaluations (shared-prefix: 1)"]
    assert no_hooks(net)
    sc.override_calls.clear()
    sample(model, cond, neg, cfg, noise)
    assert not sc.override_calls  # the unpatched model's calls carry no override


def test_a_transformer_whose_kernel_gets_no_options_is_left_unguided(package, families, caplog):
    module = families["qwen"]
    model = sc.model_patcher(module.build())
    noise = module.latent(1, 8, 8, torch.Generator().manual_seed(1))
    cond, neg = module.conds(1), module.conds(1, seed=5)
    before = sample(model, cond, neg, 4.0, noise)
    patched = node(package).patch(model, **defaults(package))[0]
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        out = sample(patched, cond, neg, 4.0, noise)
    assert "never reached the kernel" in caplog.text
    assert torch.equal(out, before)


def test_the_step_is_read_from_the_sigma_and_the_schedule():
    from lib_seg.schedule import step_of_sigma

    schedule = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [step_of_sigma(s, schedule) for s in (14.6, 7.0, 3.0, 1.0)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert step_of_sigma(5.0, schedule) == (1, 4)  # between two schedule sigmas: the step it is in
    assert step_of_sigma(7.0 * (1 + 1e-7), schedule) == (1, 4)  # float noise
    assert step_of_sigma(20.0, schedule) == (0, 4)
    assert step_of_sigma(1.0, [1.0]) == (0, 1)
