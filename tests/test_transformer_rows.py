"""SEG's smoothed rows inside the webui's own model calls on every diffusion-transformer family
(``backends/shared_batch`` with ``TransformerRows``), with the blocks before the first smoothed one
computed once (``backends/prefix_sharing.transformer_prefix``).

Every family's test transformer (Forge's layout in ``tests/forge_nn``, Neo's in ``tests/neo_nn``)
runs the three paths of the Settings switches on the same inputs: the shared prefix and the one
call equal the separate evaluation (checked against the spec formula in the families' contract
tests), at CFG 1 and above, on both branches, batch 2 with AND prompts, an odd latent."""

from __future__ import annotations

import logging
import types

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_neo_transformers as neo
import standin_webui as sw
import torch

from lib_seg import SEGParams, transformers

FORGE_NAMES = ("flux", "flux-schnell", "chroma", "sd3")
NAMES = FORGE_NAMES + neo.NAMES
PATH_SETTINGS = {"shared-prefix": (True, True), "one-call": (True, False), "separate": (False, False)}


class ForgeSurface:
    """Forge's test transformers behind the surface of a ``tests/neo_nn`` module."""

    def __init__(self, modules, name):
        self.modules, self.name = modules, name
        self.LATENT = (7, 10) if name != "sd3" else (8, 10)  # SD3's patch embedder needs even sizes

    def build(self, seed=0):
        return st.build(self.modules, self.name, seed=seed)

    def latent(self, batch, height, width, generator):
        return torch.randn(batch, 4, height, width, generator=generator)

    def conds(self, batch, tokens=5, seed=0):
        return st.conds(batch, self.name, tokens=tokens, seed=seed)


@pytest.fixture
def webui(monkeypatch):
    ui = sw.install(monkeypatch)
    forge_modules = st.install(monkeypatch)
    neo_modules = neo.install(monkeypatch)
    ui.surfaces = {**{name: ForgeSurface(forge_modules, name) for name in FORGE_NAMES}, **neo_modules}
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors


def load(webui, name):
    surface = webui.surfaces[name]
    model = surface.build()
    webui.shared.sd_model = sf.forge_model(model)
    webui.shared.sd_model.is_sd1 = False
    webui.shared.sd_model.is_sd3 = name == "sd3"
    return surface, model


def use_path(webui, monkeypatch, path):
    one_call, share_prefix = PATH_SETTINGS[path]
    monkeypatch.setattr(webui.shared.opts, "seg_one_call", one_call, raising=False)
    monkeypatch.setattr(webui.shared.opts, "seg_share_prefix", share_prefix, raising=False)


def later_blocks(model):
    """``(layers text, blocks)``: two blocks after the first of the family's first block list, so
    the first block is shared."""
    family = transformers.family_of(model)
    side, attribute = family.sides[0]
    blocks = getattr(model, attribute)
    last = min(2, len(blocks) - 1)
    return f"{side} 1-{last}" if last > 1 else f"{side} 1", [blocks[i] for i in range(1, last + 1)]


def on(**values):
    return SEGParams.from_values({"enabled": True, "scale": 2.0, "sigma": 2.0, **values}).to_args()


def one_step(webui, surface, args, cond, neg, cfg, batch, caplog):
    p = sw.Processing()
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    height, width = getattr(surface, "LATENT", (7, 10))
    x = surface.latent(batch, height, width, torch.Generator().manual_seed(1)) * 3
    sigma = torch.full((batch,), 3.0)
    webui.callbacks.cfg_denoiser_callback(
        webui.callbacks.CFGDenoiserParams(x, None, sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
    )
    patched = webui.shared.sd_model.forge_objects.unet
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        out = sf.sampling_function_inner(patched.model, x, sigma, neg, cond, cfg, patched.model_options)
        webui.script.postprocess(p, None, *args)
    assert "SEG warning" not in p.extra_generation_params, p.extra_generation_params
    return out


def paths_logged(caplog):
    return [m for m in caplog.messages if "guided evaluations" in m]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("cfg", "branch"), [(1.0, "cond"), (4.0, "uncond"), (4.0, "cond")])
def test_every_path_gives_the_separate_evaluations_result(webui, monkeypatch, caplog, name, cfg, branch):
    surface, model = load(webui, name)
    layers, _ = later_blocks(model)
    cond = surface.conds(2, tokens=4) + surface.conds(2, tokens=4, seed=3)  # an AND prompt
    neg = surface.conds(2, seed=9)
    results = {}
    for path in PATH_SETTINGS:
        use_path(webui, monkeypatch, path)
        caplog.clear()
        results[path] = one_step(webui, surface, on(layers=layers, branch=branch), cond, neg, cfg, 2, caplog)
        assert paths_logged(caplog) == [f"SEG: 1 guided evaluations ({path}: 1)"]
    torch.testing.assert_close(results["shared-prefix"], results["separate"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["one-call"], results["separate"], atol=1e-4, rtol=1e-4)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_the_shared_blocks_run_once_in_the_models_own_order(webui, caplog, name):
    """The shared blocks see the webui's rows only, the smoothed ones every row; the blocks SEG
    treats as coming first are the ones the model runs first."""
    surface, model = load(webui, name)
    family = transformers.family_of(model)
    layers, smoothed = later_blocks(model)
    ordered = [block for blocks in transformers.block_lists(model, family).values() for block in blocks]
    first = ordered.index(smoothed[0])
    calls: list[tuple[int, int]] = []
    p = sw.Processing()
    args = on(layers=layers)
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)  # SEG's hooks first, the test's after them

    def record(index):
        def hook(module, args, kwargs):
            rows = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape[0]
            calls.append((index, rows))

        return hook

    handles = [
        block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(ordered)
    ]
    try:
        height, width = getattr(surface, "LATENT", (7, 10))
        x = surface.latent(1, height, width, torch.Generator().manual_seed(1))
        sigma = torch.full((1,), 3.0)
        cond, neg = surface.conds(1), surface.conds(1, seed=9)
        webui.callbacks.cfg_denoiser_callback(
            webui.callbacks.CFGDenoiserParams(x, None, sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
        )
        patched = webui.shared.sd_model.forge_objects.unet
        sf.sampling_function_inner(patched.model, x, sigma, neg, cond, 4.0, patched.model_options)
    finally:
        for handle in handles:
            handle.remove()
        webui.script.postprocess(p, None, *args)
    assert [index for index, _ in calls] == list(range(len(ordered)))  # one call: the model's order
    assert [rows for index, rows in calls if index < first] == [2] * first  # negative + prompt
    assert {rows for index, rows in calls if index >= first} == {3}  # and the negative's copy


@pytest.mark.parametrize("name", ["flux", "sd3", "wan", "qwen"])
def test_memory_the_webui_lacks_is_never_asked_for(webui, monkeypatch, caplog, name):
    """Flux at 1024² on an 8–12 GB card: no room for SEG's rows beside the webui's, so they get
    calls of their own, one chunk at a time when all do not fit; the result is the same."""
    surface, model = load(webui, name)
    kmodel = webui.shared.sd_model.forge_objects.unet.model
    height, width = getattr(surface, "LATENT", (7, 10))
    x = surface.latent(1, height, width, torch.Generator().manual_seed(1))
    per_row = kmodel.memory_required([1, *x.shape[1:]])
    cond, neg = surface.conds(1), surface.conds(1, seed=9)
    layers, _ = later_blocks(model)
    expected = one_step(webui, surface, on(layers=layers), cond, neg, 4.0, 1, caplog)
    for rows in (2, 1):
        monkeypatch.setattr(sf, "FREE_MEMORY", per_row * rows + 1)
        kmodel.calls.clear()
        caplog.clear()
        out = one_step(webui, surface, on(layers=layers), cond, neg, 4.0, 1, caplog)
        assert max(kmodel.calls) == rows
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        assert paths_logged(caplog) == ["SEG: 1 guided evaluations (separate: 1)"]


def test_another_model_wrapper_keeps_the_separate_evaluation(webui, monkeypatch, caplog):
    """MultiDiffusion wraps the model call: SEG's rows stay out of it."""
    surface, _ = load(webui, "flux")
    patcher = webui.shared.sd_model.forge_objects_after_applying_lora.unet
    sizes = []

    def tiles(apply_model, args):
        sizes.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    monkeypatch.setitem(patcher.model_options, "model_function_wrapper", tiles)
    one_step(webui, surface, on(), surface.conds(1), surface.conds(1, seed=9), 4.0, 1, caplog)
    assert "SEG: 1 guided evaluations (separate: 1)" in caplog.messages
    assert sizes == [2, 1]  # the webui's call as it was, then the smoothed evaluation through the wrapper


def test_blocks_that_never_reach_the_kernel_stop_seg_with_a_message(webui, monkeypatch):
    """An offloader that runs copies of the blocks: the enlarged call blurs nothing, so the pass
    goes on unguided with one warning and the webui's own rows are untouched."""
    surface, model = load(webui, "flux")
    flux = webui.surfaces["flux"].modules["flux"]
    p = sw.Processing()
    args = on()
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    monkeypatch.setattr(flux, "attention_function", flux.attention_function)  # put back after
    x = surface.latent(1, 7, 10, torch.Generator().manual_seed(1))
    sigma = torch.full((1,), 3.0)
    cond, neg = surface.conds(1), surface.conds(1, seed=9)
    webui.callbacks.cfg_denoiser_callback(
        webui.callbacks.CFGDenoiserParams(x, None, sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
    )
    patched = webui.shared.sd_model.forge_objects.unet
    smoothing = webui.script_module.controller.guidance.smoothing
    monkeypatch.setattr(smoothing, "slots", [])  # the kernel SEG wraps is not the one the blocks call
    out = sf.sampling_function_inner(patched.model, x, sigma, neg, cond, 4.0, patched.model_options)
    webui.script.postprocess(p, None, *args)
    plain = sf.sampling_function_inner(sf.as_kmodel(types.SimpleNamespace(diffusion_model=model)), x, sigma,
                                       neg, cond, 4.0, {"transformer_options": {}})  # fmt: skip
    assert "never reached the kernel" in p.extra_generation_params["SEG warning"]
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_the_rows_a_shared_block_gets_are_found_in_what_transformers_hand_their_blocks():
    """Per-row modulation arrives as lists of dataclasses (Forge's Chroma, Neo's Flux.2) or named
    tuples; the call's options dict is handed on as it is (a block may write to it)."""
    import collections
    import dataclasses

    from lib_seg.backends.model_patcher.prefix_sharing import map_tensors

    @dataclasses.dataclass
    class Modulation:
        shift: torch.Tensor
        scale: torch.Tensor

    Pair = collections.namedtuple("Pair", "a b")
    rows = torch.arange(3.0)
    options = {"cond_mark": rows}
    value = ([Modulation(rows, rows[:1])], Pair(rows, 7), options)
    mapped = map_tensors(value, lambda t: t[:2] if t.shape[0] == 3 else t)
    assert mapped[0][0].shift.tolist() == [0.0, 1.0] and mapped[0][0].scale.tolist() == [0.0]
    assert value[0][0].shift.shape[0] == 3  # the block's own objects are not changed
    assert isinstance(mapped[1], Pair) and mapped[1].a.tolist() == [0.0, 1.0] and mapped[1].b == 7
    assert mapped[2] is options


def test_rows_that_arrive_split_are_refused(webui):
    """A kernel called on part of a call's rows (an attention that splits the batch) cannot be
    told which rows are SEG's: the call stops SEG with a message rather than blur the wrong ones."""
    _, model = load(webui, "flux")
    from transformer_checks import smoothing_for

    smoothing, _ = smoothing_for(model, "double 7", 2.0)
    smoothing.layout = transformers.CallLayout(1, 2, 2, before=1)
    smoothing.rows, smoothing.first_row = 4, 2
    with pytest.raises(ValueError, match="cannot tell its rows apart"):
        smoothing.blur_image_queries(torch.randn(2, 4, 5, 8))
    q = torch.randn(4, 4, 5, 8)
    out = smoothing.blur_image_queries(q)
    assert torch.equal(out[:2], q[:2]) and not torch.equal(out[2:], q[2:])
