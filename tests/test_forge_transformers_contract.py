"""The script's Forge path on diffusion transformers laid out as Forge's (``tests/forge_nn`` under
``backend.nn``): the model sits in the stand-in UnetPatcher where Forge puts Flux, Chroma and
SD3.5, and the script finds its blocks and kernels the way it does in Forge."""

import logging
import math
import types

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_ldm_patched as sl
import standin_webui as sw
import torch

from lib_seg import SEGParams, blur_queries

LATENT = (7, 10)  # odd: Forge pads to 8×10 and takes 2×2 patches, a 4×5 grid
FAMILIES = ("flux", "flux-schnell", "chroma", "sd3")


@pytest.fixture
def webui(monkeypatch):
    ui = sw.install(monkeypatch)
    ui.nn = st.install(monkeypatch)
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors


def load(webui, family, patcher_class=None):
    model = st.build(webui.nn, family)
    webui.shared.sd_model = sf.forge_model(model, patcher_class)
    webui.shared.sd_model.is_sd1 = False
    webui.shared.sd_model.is_sd3 = family == "sd3"  # Forge's StableDiffusion3 engine says so
    return model


def on(**values):
    return SEGParams.from_values({"enabled": True, **values}).to_args()


def latent_of(family):
    return LATENT if family != "sd3" else (8, 10)  # SD3's patch embedder needs even sizes


def generate(webui, args, family, *, batch=1, cfg=1.0, steps=3, cond=None, neg=None):
    p = sw.Processing()
    cond = cond or st.conds(batch, family)
    neg = neg or st.conds(batch, family, seed=9)
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    x = torch.randn(batch, 4, *latent_of(family), generator=torch.Generator().manual_seed(42))
    out = sf.sample(webui, p, x, sw.sigmas(steps), cond, neg, cfg)
    webui.script.post_sample(p, None, *args)
    webui.script.postprocess_batch(p, *args)
    webui.script.postprocess(p, None, *args)
    return out, p


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_bit_identical_on_changes_the_image(webui, monkeypatch, family):
    model = load(webui, family)
    bare = sw.install(monkeypatch)
    bare.shared.sd_model = sf.forge_model(model)
    x = torch.randn(1, 4, *latent_of(family), generator=torch.Generator().manual_seed(42))
    baseline = sf.sample(
        bare, sw.Processing(), x, sw.sigmas(3), st.conds(1, family), st.conds(1, family, seed=9), 1.0
    )
    off, _ = generate(webui, [False], family)
    guided, p = generate(webui, on(), family)
    assert torch.equal(off, baseline)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, baseline)
    assert p.extra_generation_params["SEG scale"] == "3" and "SEG warning" not in p.extra_generation_params
    assert torch.equal(generate(webui, [False], family)[0], baseline)
    assert (
        webui.shared.sd_model.forge_objects.unet
        is webui.shared.sd_model.forge_objects_after_applying_lora.unet
    )


class ReferenceSmoothing:
    """The smoothed prediction written out for the test: the test's own hooks mark the chosen
    blocks; Flux's kernel gets the image span of its roped queries blurred."""

    def __init__(self, webui, model, names, sigma):
        self.webui, self.model, self.names, self.sigma = webui, model, names, sigma

    def __call__(self, x, sigma, conds):
        (entry,) = conds
        self.text = entry["cross_attn"].shape[1]
        flux = self.webui.nn["flux"]
        kernel, inside = flux.attention_function, []
        grid = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2)

        def blurring_kernel(q, *args, **kwargs):
            if inside:
                image = grid[0] * grid[1]
                span = blur_queries(q[..., self.text : self.text + image, :], *grid, self.sigma)
                q = torch.cat((q[..., : self.text, :], span, q[..., self.text + image :, :]), dim=-2)
            return kernel(q, *args, **kwargs)

        blocks = [self.model.get_submodule(name) for name in self.names]
        handles = [b.register_forward_pre_hook(lambda m, a: inside.append(1)) for b in blocks]
        handles += [b.register_forward_hook(lambda m, a, o: inside.clear()) for b in blocks]
        flux.attention_function = blurring_kernel
        try:
            model = types.SimpleNamespace(diffusion_model=self.model)
            return sf.calc_cond_uncond_batch(model, conds, None, x, sigma, {"transformer_options": {}})[0]
        finally:
            flux.attention_function = kernel
            for handle in handles:
                handle.remove()


PATH_SETTINGS = {"shared-prefix": (True, True), "one-call": (True, False), "separate": (False, False)}


@pytest.mark.parametrize("path", PATH_SETTINGS)
@pytest.mark.parametrize(("cfg", "branch"), [(1.0, "uncond"), (1.0, "cond"), (4.0, "uncond"), (4.0, "cond")])
def test_flux_step_is_the_spec_formula(webui, monkeypatch, caplog, path, cfg, branch):
    """On every path: at CFG 1 the smoothed copy of the prompt rows joins the prompt's call (one
    call of 4 rows) or, separately, gets a call of its own."""
    one_call, share_prefix = PATH_SETTINGS[path]
    monkeypatch.setattr(webui.shared.opts, "seg_one_call", one_call, raising=False)
    monkeypatch.setattr(webui.shared.opts, "seg_share_prefix", share_prefix, raising=False)
    model = load(webui, "flux")
    args = on(scale=2.0, sigma=2, branch=branch, layers="double 7-8, single 1")
    p = sw.Processing()
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    cond, neg = st.conds(2, "flux", tokens=6), st.conds(2, "flux", seed=9)
    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.full((2,), 3.0)
    guidance_seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: guidance_seen.append(k["guidance"]), with_kwargs=True
    )
    webui.callbacks.cfg_denoiser_callback(
        webui.callbacks.CFGDenoiserParams(x, None, sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
    )
    patched = webui.shared.sd_model.forge_objects.unet
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        out = sf.sampling_function_inner(patched.model, x, sigma, neg, cond, cfg, patched.model_options)
        hook.remove()
        webui.script.postprocess(p, None, *args)
    assert f"SEG: 1 guided evaluations ({path}: 1)" in caplog.messages
    plain = types.SimpleNamespace(diffusion_model=model)
    c, u = sf.calc_cond_uncond_batch(
        plain, cond, None if cfg == 1 else neg, x, sigma, {"transformer_options": {}}
    )
    smoothed_of = ReferenceSmoothing(
        webui, model, ["double_blocks.7", "double_blocks.8", "single_blocks.1"], 2.0
    )
    if cfg == 1:  # no negative pass (Flux-dev's usual CFG 1): c + γ(c − c̃)
        expected = c + 2.0 * (c - smoothed_of(x, sigma, cond))
        rows = [4] if path != "separate" else [2, 2]  # the cond rows and their smoothed copies only
        assert [len(g) for g in guidance_seen] == rows
    else:
        source, source_conds = (u, neg) if branch == "uncond" else (c, cond)
        expected = u + cfg * (c - u) + 2.0 * (source - smoothed_of(x, sigma, source_conds))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert all(
        torch.equal(g, torch.full((len(g),), 3.5)) for g in guidance_seen
    )  # distilled guidance unchanged


@pytest.mark.parametrize("family", ["chroma", "sd3", "flux-schnell"])
def test_batch_two_with_and_prompts_at_cfg(webui, family):
    load(webui, family)
    cond = st.conds(2, family, tokens=4) + st.conds(2, family, tokens=7, seed=3, strength=0.5)  # AND prompt
    off, _ = generate(webui, [False], family, batch=2, cfg=4.0, cond=cond)
    guided, p = generate(webui, on(layers="all"), family, batch=2, cfg=4.0, cond=cond)
    assert "SEG warning" not in p.extra_generation_params
    assert torch.isfinite(guided).all() and not torch.allclose(guided, off)
    for row in range(2):  # each image is smoothed on its own grid: the other row changes nothing
        single, _ = generate(
            webui,
            on(layers="all"),
            family,
            batch=1,
            cfg=4.0,
            cond=[{**e, **{k: v[row : row + 1] for k, v in e.items() if torch.is_tensor(v)}} for e in cond],
        )
        assert single.shape[0] == 1


def test_blocks_a_model_lacks_are_reported(webui):
    load(webui, "flux")
    guided, p = generate(webui, on(layers="double 8-12, single 1"), "flux")
    assert "has no double 10-12 (double 0-9, single 0-3)" in p.extra_generation_params["SEG warning"]
    assert p.extra_generation_params["SEG layers"] == "double 8-12, single 1"
    off, _ = generate(webui, [False], "flux")
    assert not torch.equal(guided, off)
    unguided, p = generate(webui, on(layers="input 4-5"), "flux")
    assert "match no block of this Flux model" in p.extra_generation_params["SEG warning"]
    assert "SEG scale" not in p.extra_generation_params
    assert torch.equal(unguided, off)


def test_reforge_and_classic_say_transformers_are_forge_only(webui, monkeypatch, caplog):
    sl.install(monkeypatch)
    load(webui, "flux", sl.UnetPatcher)
    off, _ = generate(webui, [False], "flux")
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        out, p = generate(webui, on(), "flux")
    assert "Flux models are supported on Forge (backend/) only" in p.extra_generation_params["SEG warning"]
    assert torch.equal(out, off)


def test_a_failure_in_the_smoothed_pass_leaves_a_normal_image_and_no_patch(webui, monkeypatch):
    model = load(webui, "flux")
    flux = webui.nn["flux"]
    kernel = flux.attention_function
    off, _ = generate(webui, [False], "flux")

    def broken_layout(self, module, args, kwargs):
        return transformers.CallLayout(1, 9, 9, before=5)  # a grid the attention cannot hold

    from lib_seg import transformers

    monkeypatch.setattr(transformers.flux.FluxFamily, "layout", broken_layout)
    out, p = generate(webui, on(), "flux")
    assert "cannot hold" in p.extra_generation_params["SEG warning"]
    assert torch.equal(out, off)
    assert flux.attention_function is kernel
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_an_interrupt_mid_step_leaves_no_patch(webui):
    model = load(webui, "sd3")
    mmditx = webui.nn["mmditx"]
    kernel = mmditx.attention

    def interrupt(module, args):
        if mmditx.attention is not kernel:  # inside SEG's smoothed evaluation
            raise KeyboardInterrupt

    handle = model.joint_blocks[10].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate(webui, on(), "sd3")
    handle.remove()
    webui.script.postprocess(sw.Processing(), None, *on())
    assert mmditx.attention is kernel
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    off, _ = generate(webui, [False], "sd3")
    assert torch.isfinite(off).all()


def test_infinite_sigma_and_identity_sigma(webui):
    load(webui, "flux")
    off, _ = generate(webui, [False], "flux")
    mean, _ = generate(webui, on(sigma="inf"), "flux")
    identity, _ = generate(webui, on(sigma=0), "flux")  # σ ≤ 1/6 changes nothing: no pass runs
    assert not torch.equal(mean, off)
    assert torch.equal(identity, off)
    assert math.isinf(SEGParams.from_args(on(sigma="inf")).sigma)
