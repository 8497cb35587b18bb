"""The same script on the Forge family: the stand-in pieces of Forge (``backend/``) and of
reForge / Forge Classic (``ldm_patched``), driven through the script's hooks. Every test taking the
``forge`` fixture runs on both."""

import logging
import math
import sys
import types

import pytest
import standin_forge as sf
import standin_ldm_patched as sl
import standin_webui as sw
import torch
from unets import sd1_unet

from lib_seg import SEGParams, parse_layers, resolve_attn1
from lib_seg.backends.a1111.patch import QueryBlurPatch
from lib_seg.backends.model_patcher.guidance import MARKER, patch_keys, with_attn1_replace

CTX = 32
LATENT = (16, 24)


@pytest.fixture(scope="module")
def unet():
    return sd1_unet(model_channels=32, context_dim=CTX)


BACKENDS = {
    "forge": (sf, sf.sampling_function_inner),
    "ldm_patched": (sl, sl.sampling_function),
}


@pytest.fixture(params=list(BACKENDS))
def forge(request, monkeypatch, unet):
    standin, sampling_function = BACKENDS[request.param]
    # Forge Classic's script_callbacks take no callback names: the ldm_patched runs use its form
    ui = sw.install(monkeypatch, unnamed_callbacks=request.param == "ldm_patched")
    standin.install(monkeypatch)
    ui.backend, ui.standin, ui.sampling_function = request.param, standin, sampling_function
    ui.shared.sd_model = standin.forge_model(unet)
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors
    patcher = ui.shared.sd_model.forge_objects_after_applying_lora.unet
    assert "sampler_post_cfg_function" not in patcher.model_options  # the shared patcher is untouched


def conds(batch, lengths=(4,), seed=0, strengths=None):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "cross_attn": torch.randn(batch, n, CTX, generator=g),
            "strength": (strengths or [1.0] * len(lengths))[i],
        }
        for i, n in enumerate(lengths)
    ]


def generate(forge, args, *, batch=1, cfg=5.0, steps=3, hires=False, cond=None, neg=None):
    p = sw.Processing()
    cond = cond or conds(batch)
    neg = neg or conds(batch, seed=9)
    forge.script.process(p, *args)
    out = None
    for is_hr in [False] + ([True] if hires else []):
        p.is_hr_pass = is_hr
        sf.reset_forge_objects(forge.shared.sd_model)
        forge.script.process_before_every_sampling(p, *args)
        if is_hr:  # Forge calls the hook twice in the hires pass
            forge.script.process_before_every_sampling(p, *args)
            options = forge.shared.sd_model.forge_objects.unet.model_options
            functions = options.get("sampler_post_cfg_function", [])
            # SEG's post-CFG function and the one ending the step's own calls, once each
            assert sum(hasattr(f, MARKER) for f in functions) == (0 if forge.hires_off else 2)
            wrapper = options.get("model_function_wrapper")
            assert (wrapper is None) if forge.hires_off else hasattr(wrapper, MARKER)
        x = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(42))
        out = sf.sample(forge, p, x, sw.sigmas(steps), cond, neg, cfg, forge.sampling_function)
        forge.script.post_sample(p, None, *args)
        forge.script.postprocess_batch(p, *args)
    forge.script.postprocess(p, None, *args)
    return out, p


def on(**values):
    return SEGParams.from_values({"enabled": True, **values}).to_args()


def test_off_is_bit_identical_to_no_extension(forge, monkeypatch, unet):
    bare = sw.install(monkeypatch)
    bare.shared.sd_model = forge.standin.forge_model(unet)
    x = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(42))
    baseline = sf.sample(bare, sw.Processing(), x, sw.sigmas(3), conds(1), conds(1, seed=9), 5.0,
                         forge.sampling_function)  # fmt: skip
    off, _ = generate(forge, [False])
    on_out, p = generate(forge, on())
    assert torch.equal(off, baseline)
    assert not torch.allclose(on_out, baseline)
    assert p.extra_generation_params["SEG scale"] == "3"
    assert torch.equal(generate(forge, [False])[0], baseline)


def reference(unet, x, sigma, cond, neg, cfg, scale, blur_sigma, branch, has_uncond=True):
    """The A1111 code path (to_q hook) on the same UNet: identical parameters, same SEG."""
    model = types.SimpleNamespace(diffusion_model=unet)
    options = {"transformer_options": {}}
    c, u = sf.calc_cond_uncond_batch(model, cond, neg if has_uncond else None, x, sigma, options)
    modules = [m for _, m in resolve_attn1(unet, parse_layers("middle"))]
    source_conds = neg if branch == "uncond" and has_uncond else cond
    with QueryBlurPatch(modules, blur_sigma, unet=unet) as patch:
        patch.rows = slice(None)
        smoothed, _ = sf.calc_cond_uncond_batch(model, source_conds, None, x, sigma, options)
    if not has_uncond:
        return c + scale * (c - smoothed)
    source = u if branch == "uncond" else c
    return u + cfg * (c - u) + scale * (source - smoothed)


@pytest.mark.parametrize("branch", ["uncond", "cond"])
@pytest.mark.parametrize(("cfg", "batch", "lengths"), [(5.0, 1, (4,)), (1.0, 1, (4,)), (7.0, 2, (4, 6))])
def test_step_matches_the_a1111_path_and_the_formula(forge, unet, branch, cfg, batch, lengths):
    args = on(scale=2.0, sigma=3, branch=branch)
    p = sw.Processing()
    forge.script.process(p, *args)
    sf.reset_forge_objects(forge.shared.sd_model)
    forge.script.process_before_every_sampling(p, *args)
    cond, neg = conds(batch, lengths, strengths=[1.0, 0.5][: len(lengths)]), conds(batch, seed=9)
    x = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.full((batch,), 3.0)
    forge.callbacks.cfg_denoiser_callback(
        forge.callbacks.CFGDenoiserParams(x, None, sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
    )
    patched = forge.shared.sd_model.forge_objects.unet
    out = forge.sampling_function(patched.model, x, sigma, neg, cond, cfg, patched.model_options)
    forge.script.postprocess(p, None, *args)
    expected = reference(unet, x, sigma, cond, neg, cfg, 2.0, 3.0, branch, has_uncond=cfg != 1.0)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def additive_guidance(args):
    """A post-CFG guidance of SAG's kind: a term from the predictions added to ``denoised``."""
    return args["denoised"] + 0.5 * (args["cond_denoised"] - args["input"])


def one_step(forge, args, theirs=None, order="before", cfg=5.0):
    p = sw.Processing()
    forge.script.process(p, *args)
    sf.reset_forge_objects(forge.shared.sd_model)
    objects = forge.shared.sd_model.forge_objects
    if theirs is not None and order == "before":
        objects.unet = objects.unet.clone()
        objects.unet.set_model_sampler_post_cfg_function(theirs)
    forge.script.process_before_every_sampling(p, *args)
    if theirs is not None and order == "after":
        objects.unet = objects.unet.clone()
        objects.unet.set_model_sampler_post_cfg_function(theirs)
    cond, neg = conds(2, (4, 6), strengths=[1.0, 0.5]), conds(2, seed=9)
    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.full((2,), 3.0)
    forge.callbacks.cfg_denoiser_callback(
        forge.callbacks.CFGDenoiserParams(x, None, sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
    )
    patched = objects.unet
    out = forge.sampling_function(patched.model, x, sigma, neg, cond, cfg, patched.model_options)
    forge.script.postprocess(p, None, *args)
    sf.reset_forge_objects(forge.shared.sd_model)
    return out, x


def test_other_post_cfg_guidance_composes_with_seg_in_either_order(forge):
    plain, _x = one_step(forge, [False])
    seg_only, _ = one_step(forge, on(scale=2.0))
    theirs_only, _ = one_step(forge, [False], additive_guidance)
    before, _ = one_step(forge, on(scale=2.0), additive_guidance, "before")
    after, _ = one_step(forge, on(scale=2.0), additive_guidance, "after")
    assert not torch.allclose(seg_only, plain) and not torch.allclose(theirs_only, plain)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before, seg_only + theirs_only - plain, atol=1e-4, rtol=1e-4)


def test_the_backend_follows_the_models_patcher(forge, unet):
    from lib_seg.backends import backend_of

    assert backend_of(forge.shared.sd_model) == forge.backend
    assert backend_of(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))) == "a1111"


def test_an_unknown_patcher_warns_and_generates_normally(forge, caplog, unet):
    class OtherPatcher(sf.PatcherBase):
        pass

    OtherPatcher.__module__, OtherPatcher.__qualname__ = "some_other_webui.patcher", "OtherPatcher"
    off, _ = generate(forge, [False])
    model = forge.shared.sd_model
    model.forge_objects_after_applying_lora.unet = OtherPatcher(model.forge_objects.unet.model)
    sf.reset_forge_objects(model)
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        out, p = generate(forge, on())
    assert "some_other_webui.patcher.OtherPatcher" in p.extra_generation_params["SEG warning"]
    assert "SEG scale" not in p.extra_generation_params
    assert torch.equal(out, off)


def test_the_smoothed_attention_keeps_the_webuis_precision(forge, monkeypatch):
    if forge.backend != "ldm_patched":
        pytest.skip("ldm_patched hands attn_precision to replace patches; Forge has none")
    monkeypatch.setattr(sl, "ATTN_PRECISION", torch.float32)
    sl.precisions.clear()
    generate(forge, on())
    assert sl.precisions and set(sl.precisions) == {torch.float32}


def test_forge_classic_has_only_the_two_list_evaluator(forge, monkeypatch):
    if forge.backend != "ldm_patched":
        pytest.skip("ldm_patched's two evaluator forms")
    list_form, _ = generate(forge, on())
    monkeypatch.delattr(sys.modules[sl.EVALUATOR_MODULE], "calc_cond_batch")  # Forge Classic
    two_lists, p = generate(forge, on())
    assert "SEG warning" not in p.extra_generation_params
    assert torch.equal(two_lists, list_form)


@pytest.mark.parametrize(("mode", "hires_off"), [("same", False), ("off", True), ("custom", False)])
def test_hires_pass_hook_twice_is_idempotent(forge, mode, hires_off):
    forge.hires_off = hires_off
    out, _ = generate(forge, on(hires=mode, hires_scale=1.0), hires=True, steps=2)
    assert torch.isfinite(out).all()
    assert (
        forge.shared.sd_model.forge_objects.unet
        is forge.shared.sd_model.forge_objects_after_applying_lora.unet
    )


def test_schedule_and_reproducibility(forge):
    first, _ = generate(forge, on(start=0.3, end=0.7), steps=4)
    second, _ = generate(forge, on(start=0.3, end=0.7), steps=4)
    full, _ = generate(forge, on(), steps=4)
    assert torch.equal(first, second)
    assert not torch.equal(first, full)


def test_flux_like_model_warns_and_generates_normally(forge, caplog):
    model = forge.shared.sd_model
    flux_like = types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))  # no UNet blocks
    model.forge_objects.unet = forge.standin.UnetPatcher(flux_like)
    p = sw.Processing()
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        forge.script.process(p, *on())
        forge.script.process_before_every_sampling(p, *on())
    assert forge.script_module.controller.guidance is None
    assert "without SEG" in p.extra_generation_params["SEG warning"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "sampler_post_cfg_function" not in model.forge_objects.unet.model_options
    sf.reset_forge_objects(model)


def test_failing_extra_pass_stops_guidance_not_the_image(forge, monkeypatch):
    monkeypatch.setattr(forge.shared.opts, "seg_one_call", False, raising=False)  # the separate path

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sys.modules[forge.standin.EVALUATOR_MODULE], forge.standin.EVALUATOR, broken)
    out, p = generate(forge, on())
    assert "boom" in p.extra_generation_params["SEG warning"]
    assert torch.isfinite(out).all()


def test_patch_keys_and_options_copy(unet):
    names = [n for n, _ in resolve_attn1(unet, parse_layers("input 7-8, middle, output 3"))]
    assert patch_keys(names) == [("input", 7), ("input", 8), ("output", 3), ("middle", 0)]
    base = {"transformer_options": {"patches_replace": {"attn1": {("input", 1): "theirs"}}}, "other": 1}
    options = with_attn1_replace(base, "ours", [("middle", 0)])
    assert options["transformer_options"]["patches_replace"]["attn1"] == {
        ("input", 1): "theirs",
        ("middle", 0): "ours",
    }
    assert base["transformer_options"]["patches_replace"]["attn1"] == {("input", 1): "theirs"}
    assert options["other"] == 1
    # SAG's (block, id, index) key would win over ours in Forge's lookup: ours replaces it there
    theirs = {("middle", 0, 0): "sag", ("input", 4, 0): "x"}
    sag = {"transformer_options": {"patches_replace": {"attn1": theirs}}}
    options = with_attn1_replace(sag, "ours", [("middle", 0)])
    attn1 = options["transformer_options"]["patches_replace"]["attn1"]
    assert attn1 == {("middle", 0, 0): "ours", ("middle", 0): "ours", ("input", 4, 0): "x"}
    assert sag["transformer_options"]["patches_replace"]["attn1"][("middle", 0, 0)] == "sag"


def test_same_parameters_same_smoothed_prediction_on_both_webuis(unet):
    """The A1111 path (to_q hook) and the Forge path (attn1 replace) blur the same queries."""
    from lib_seg.backends.model_patcher.guidance import make_attn1_replace

    x = torch.randn(2, 4, *LATENT)
    sigma = torch.full((2,), 2.0)
    context = torch.randn(2, 4, CTX)
    model = types.SimpleNamespace(diffusion_model=unet)
    for blur in (1.0, 10.0, math.inf):
        matched = resolve_attn1(unet, parse_layers("middle, input 4"))
        replace = make_attn1_replace(blur, sf.attention_function)
        options = with_attn1_replace(
            {"transformer_options": {}}, replace, patch_keys([n for n, _ in matched])
        )
        forge_out = sf.apply_model(model, x, sigma, context, options)
        modules = [m for _, m in matched]
        with QueryBlurPatch(modules, blur, unet=unet) as patch:
            patch.rows = slice(None)
            a1111_out = sf.apply_model(model, x, sigma, context, {"transformer_options": {}})
        torch.testing.assert_close(forge_out, a1111_out, atol=1e-4, rtol=1e-4)


def test_out_of_memory_in_the_extra_pass_skips_only_that_step(forge, monkeypatch):
    monkeypatch.setattr(forge.shared.opts, "seg_one_call", False, raising=False)  # the separate path
    function, name = sys.modules[forge.standin.EVALUATOR_MODULE], forge.standin.EVALUATOR
    evaluate, state = getattr(function, name), {"calls": 0}

    def short_of_memory_once(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(function, name, short_of_memory_once)
    guided, p = generate(forge, on())
    assert "out of memory" in p.extra_generation_params["SEG warning"]
    assert state["calls"] > 2  # the steps after the failed one were guided again
    monkeypatch.setattr(function, name, evaluate)
    off, _ = generate(forge, [False])
    assert not torch.equal(guided, off)


def test_tiled_queries_are_refused_not_matched_to_another_level():
    from lib_seg.backends.model_patcher.guidance import make_attn1_replace

    replace = make_attn1_replace(math.inf, sf.attention_function)
    q = torch.randn(4, 96, 16)  # 1 image of 16x24 tokens cut into 4 tiles of 96 = the 8x12 level
    with pytest.raises(ValueError, match="tiled"):
        replace(q, q, q, {"original_shape": [1, 4, 16, 24], "n_heads": 2})
