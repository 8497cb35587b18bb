"""The script's Forge path on every Forge Neo transformer family, through the same stand-in webui
the Forge transformers use: the test transformers of ``tests/neo_nn`` (Neo's module layout) sit in
the UnetPatcher where Neo puts them, and the script finds their blocks and kernels as in Neo.

The reference here is written out independently of ``lib_seg.transformers``: the image span comes
from each test module's ``reference_layout``; a kernel call is a self-attention when its keys have
as many tokens as its queries (a cross-attention's keys are the text); the blur is the reference
code's 2-D convolution (``tests/reference.py``)."""

from __future__ import annotations

import math
import types

import pytest
import standin_forge as sf
import standin_neo_transformers as neo
import standin_webui as sw
import torch
from reference import conv2d_reference
from transformer_checks import smoothing_for

from lib_seg import SEGParams, transformers

LATENT = (7, 10)  # odd: every family pads to its patch size
NAMES = neo.NAMES


@pytest.fixture
def webui(monkeypatch):
    ui = sw.install(monkeypatch)
    ui.nn = neo.install(monkeypatch)
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors


def load(webui, name):
    model = webui.nn[name].build()
    webui.shared.sd_model = sf.forge_model(model)
    webui.shared.sd_model.is_sd1 = False
    return model


def latent_of(module, batch, seed=42, size=None):
    height, width = size or getattr(module, "LATENT", LATENT)
    return module.latent(batch, height, width, torch.Generator().manual_seed(seed))


def chosen(model, count=2):
    """``(layers text, qualified block names)``: blocks 1.. of the family's first block list."""
    family = transformers.family_of(model)
    side, attribute = family.sides[0]
    indices = range(1, 1 + min(count, len(getattr(model, attribute)) - 1))
    text = f"{side} {indices[0]}" if len(indices) == 1 else f"{side} {indices[0]}-{indices[-1]}"
    return text, [f"{attribute}.{index}" for index in indices]


def on(**values):
    return SEGParams.from_values({"enabled": True, **values}).to_args()


def generate(webui, module, args, *, batch=1, cfg=1.0, steps=2, cond=None, neg=None, size=None):
    p = sw.Processing()
    cond = cond or module.conds(batch)
    neg = neg or module.conds(batch, seed=9)
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    out = sf.sample(webui, p, latent_of(module, batch, size=size), sw.sigmas(steps), cond, neg, cfg)
    webui.script.post_sample(p, None, *args)
    webui.script.postprocess_batch(p, *args)
    webui.script.postprocess(p, None, *args)
    return out, p


def reference_blur(q, layout, sigma):
    """``q`` (..., tokens, C) with the span ``layout`` names blurred frame by frame."""
    image = layout.image_tokens
    start = 0 if q.shape[-2] == image else layout.before
    span = q[..., start : start + image, :]
    per_frame = span.reshape(-1, layout.height * layout.width, span.shape[-1]).double()
    blurred = conv2d_reference(per_frame, layout.height, layout.width, sigma).to(q.dtype).reshape(span.shape)
    return torch.cat((q[..., :start, :], blurred, q[..., start + image :, :]), dim=-2)


class ReferenceSmoothing:
    """The smoothed prediction of ``conds`` written out for the test."""

    def __init__(self, module, model, names, sigma):
        self.module, self.model, self.names, self.sigma = module, model, names, sigma
        self.blurred = 0

    def __call__(self, x, sigma, conds):
        kernel, inside = self.module.attention_function, []
        layout = self.module.reference_layout(x, conds)

        def blurring_kernel(q, k, *args, **kwargs):
            if inside and k.shape[-2] == q.shape[-2]:
                q = reference_blur(q, layout, self.sigma)
                self.blurred += 1
            return kernel(q, k, *args, **kwargs)

        blocks = [self.model.get_submodule(name) for name in self.names]
        handles = [b.register_forward_pre_hook(lambda m, a: inside.append(1)) for b in blocks]
        handles += [b.register_forward_hook(lambda m, a, o: inside.clear()) for b in blocks]
        self.module.attention_function = blurring_kernel
        try:
            model = types.SimpleNamespace(diffusion_model=self.model)
            return sf.calc_cond_uncond_batch(model, conds, None, x, sigma, {"transformer_options": {}})[0]
        finally:
            self.module.attention_function = kernel
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_the_family_is_known_and_off_is_bit_identical(webui, monkeypatch, name):
    module = webui.nn[name]
    model = load(webui, name)
    family = transformers.family_of(model)
    assert family is not None and family.name == module.FAMILY
    bare = sw.install(monkeypatch)
    bare.shared.sd_model = sf.forge_model(model)
    cond, neg = module.conds(1), module.conds(1, seed=9)
    baseline = sf.sample(bare, sw.Processing(), latent_of(module, 1), sw.sigmas(2), cond, neg, 1.0)
    off, _ = generate(webui, module, [False])
    layers, _ = chosen(model)
    guided, p = generate(webui, module, on(layers=layers))
    again, _ = generate(webui, module, on(layers=layers))
    assert torch.equal(off, baseline)
    assert "SEG warning" not in p.extra_generation_params, p.extra_generation_params
    assert torch.isfinite(guided).all() and not torch.allclose(guided, baseline)
    assert torch.equal(guided, again)
    assert torch.equal(generate(webui, module, [False])[0], baseline)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("cfg", "branch", "sigma"), [(1.0, "uncond", 2.0), (4.0, "cond", 1.5),
                                                      (4.0, "uncond", math.inf)])  # fmt: skip
def test_a_step_is_the_spec_formula(webui, name, cfg, branch, sigma):
    module = webui.nn[name]
    model = load(webui, name)
    layers, names = chosen(model)
    args = on(scale=2.0, sigma=sigma, branch=branch, layers=layers)
    p = sw.Processing()
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    cond, neg = module.conds(2, tokens=6), module.conds(2, seed=9)
    x = latent_of(module, 2, seed=1) * 3
    step_sigma = torch.full((2,), 3.0)
    webui.callbacks.cfg_denoiser_callback(
        webui.callbacks.CFGDenoiserParams(x, None, step_sigma, 0, 4, cond, neg, types.SimpleNamespace(p=p))
    )
    patched = webui.shared.sd_model.forge_objects.unet
    out = sf.sampling_function_inner(patched.model, x, step_sigma, neg, cond, cfg, patched.model_options)
    webui.script.postprocess(p, None, *args)
    assert "SEG warning" not in p.extra_generation_params, p.extra_generation_params
    plain = types.SimpleNamespace(diffusion_model=model)
    c, u = sf.calc_cond_uncond_batch(plain, cond, None if cfg == 1 else neg, x, step_sigma,
                                     {"transformer_options": {}})  # fmt: skip
    smoothed_of = ReferenceSmoothing(module, model, names, sigma)
    if cfg == 1:  # no negative pass: c + γ(c − c̃)
        expected = c + 2.0 * (c - smoothed_of(x, step_sigma, cond))
    else:
        source, source_conds = (u, neg) if branch == "uncond" else (c, cond)
        expected = u + cfg * (c - u) + 2.0 * (source - smoothed_of(x, step_sigma, source_conds))
    assert smoothed_of.blurred >= len(names)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(8, 8), (6, 12), (5, 9)])
def test_every_aspect_ratio_and_batch_two_with_and_prompts(webui, name, size):
    module = webui.nn[name]
    model = load(webui, name)
    layers, _ = chosen(model)
    cond = module.conds(2, tokens=4) + module.conds(2, tokens=7, seed=3)  # an AND prompt
    cond[1]["strength"] = 0.5
    off, _ = generate(webui, module, [False], batch=2, cfg=4.0, cond=cond, size=size)
    guided, p = generate(webui, module, on(layers=layers), batch=2, cfg=4.0, cond=cond, size=size)
    assert "SEG warning" not in p.extra_generation_params, p.extra_generation_params
    assert guided.shape == off.shape and torch.isfinite(guided).all() and not torch.allclose(guided, off)


@pytest.mark.parametrize("name", NAMES)
def test_blocks_the_model_lacks_are_named_and_none_means_no_seg(webui, name):
    module = webui.nn[name]
    model = load(webui, name)
    family = transformers.family_of(model)
    side, _ = family.sides[0]
    off, _ = generate(webui, module, [False])
    guided, p = generate(webui, module, on(layers=f"{side} 1, {side} 90-91"))
    assert f"has no {side} 90-91" in p.extra_generation_params["SEG warning"]
    assert not torch.equal(guided, off)
    unguided, p = generate(webui, module, on(layers="input 4-5"))
    assert f"match no block of this {family.name} model" in p.extra_generation_params["SEG warning"]
    assert torch.equal(unguided, off)


def test_every_family_seg_knows_has_a_test_transformer(webui):
    """A family added to ``transformers.FAMILIES`` comes with a test model in Neo's or Forge's
    layout (``tests/neo_nn``, ``tests/forge_nn``), which the tests above then cover."""
    tested = {"Flux", "Chroma", "SD3"}  # tests/forge_nn
    for module in webui.nn.values():
        tested.add(module.FAMILY)
        tested.update(getattr(module, "VARIANTS", {}))
    assert {family.name for family in transformers.FAMILIES} <= tested


def test_lumina_2_is_guided_and_off_is_bit_identical(webui):
    """The Lumina 2 variant of the one NextDiT class (the tests above build Z-Image)."""
    module = webui.nn["lumina"]
    model = module.build(variant="Lumina 2")
    webui.shared.sd_model = sf.forge_model(model)
    webui.shared.sd_model.is_sd1 = False
    assert transformers.family_of(model) is transformers.LUMINA2
    off, _ = generate(webui, module, [False])
    guided, p = generate(webui, module, on(layers="block 1-2"))
    assert "SEG warning" not in p.extra_generation_params, p.extra_generation_params
    assert torch.isfinite(guided).all() and not torch.allclose(guided, off)
    assert torch.equal(generate(webui, module, [False])[0], off)


def test_a_moved_layout_fails_soft_with_one_warning(webui, monkeypatch):
    """A Neo release that renames a block list or a module SEG reads: a warning and the normal image."""
    module = webui.nn["wan"]
    model = load(webui, "wan")
    off, _ = generate(webui, module, [False])

    def moved(self, model):
        raise AttributeError("'WanModel' object has no attribute 'blocks'")

    monkeypatch.setattr(type(transformers.WAN), "default", moved)
    out, p = generate(webui, module, on())
    assert "blocks are not laid out as SEG knows" in p.extra_generation_params["SEG warning"]
    assert torch.equal(out, off)

    def broken_matches(self, model):
        raise AttributeError("layout moved")

    monkeypatch.setattr(type(transformers.WAN), "matches", broken_matches)
    assert transformers.family_of(model) is None
    out, p = generate(webui, module, on())
    assert "nor a transformer SEG knows" in p.extra_generation_params["SEG warning"]
    assert torch.equal(out, off)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_nothing_is_left_after_an_exception_or_an_interrupt(webui, name, error):
    """A block failing after a smoothed block's attention ran: every hook and kernel is put back."""
    module = webui.nn[name]
    model = module.build()
    x = latent_of(module, 1, size=(6, 8))
    entry = module.conds(1)[0]
    extra = {key: value for key, value in entry.items() if key in sf.EXTRA_CONDS}

    def run():
        return model(x, torch.full((1,), 0.5), context=entry["cross_attn"], **extra)

    baseline, kernel = run(), module.attention_function
    layers, names = chosen(model)
    smoothing, _ = smoothing_for(model, layers, math.inf)

    def fail(block, args):
        raise error

    handle = model.get_submodule(names[-1]).register_forward_pre_hook(fail)
    with pytest.raises(type(error)), smoothing.applied():
        run()
    handle.remove()
    assert smoothing.blurred_calls >= 1  # the first chosen block was smoothed before the failure
    assert module.attention_function is kernel
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(run(), baseline)
