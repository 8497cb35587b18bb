"""SEG on Forge Neo's Flux.2 (Klein) and on the Flux.1 models Neo builds with the same class
(``tests/neo_nn/flux2_model.py``): the family is told apart by its shared modulation, the grid is
the model's patch size (1 on Flux.2, 2 on Flux.1), and only the image tokens' queries of the
chosen blocks are blurred, text and reference tokens left alone."""

import math

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_neo_transformers as neo
import torch
from transformer_checks import smoothing_for

from lib_seg import blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge

# Neo's Flux.1 (dev, Kontext, Krea-1) from the same class: per-block modulation, 2×2 patches,
# three RoPE axes, a pooled vector and the distilled guidance value, Kontext's offset references
FLUX1 = dict(in_channels=4, out_channels=4, vec_in_dim=8, axes_dim=(4, 6, 6), theta=10000, patch_size=2,
             qkv_bias=True, guidance_embed=True, txt_ids_dims=(), global_modulation=False,
             mlp_silu_act=False, ops_bias=True, default_ref_method="offset", mlp_ratio=4.0, depth=10,
             depth_single_blocks=2)  # fmt: skip


@pytest.fixture
def flux2(monkeypatch):
    return neo.install(monkeypatch, names=("flux2_model",))["flux2_model"]


def block_names(model):
    family = transformers.family_of(model)
    return {block: f"{attribute}.{i}" for _, attribute in family.sides
            for i, block in enumerate(getattr(model, attribute))}  # fmt: skip


def recorded_calls(model, smoothing, run):
    """Per kernel call: the block, the (q, k, v, kwargs) SEG was handed and those the kernel got."""
    slot = smoothing.slots[0]
    kernel = slot.namespace[slot.name]
    calls, current = [], []

    def inner(q, k, v, *args, **kwargs):
        calls[-1]["sent"] = (q, k, v, args, kwargs)
        return kernel(q, k, v, *args, **kwargs)

    slot.namespace[slot.name] = inner
    handles = [block.register_forward_pre_hook(lambda m, a, name=name: current.append(name))
               for block, name in block_names(model).items()]  # fmt: skip
    try:
        with smoothing.applied():
            seg = slot.namespace[slot.name]

            def outer(q, k, v, *args, **kwargs):
                calls.append({"block": current[-1] if current else None, "given": (q, k, v, args, kwargs)})
                return seg(q, k, v, *args, **kwargs)

            slot.namespace[slot.name] = outer
            out = run()
        assert slot.namespace[slot.name] is inner  # SEG put back what it found
    finally:
        slot.namespace[slot.name] = kernel
        for handle in handles:
            handle.remove()
    return out, calls


def assert_nothing_left(model, module, kernel):
    for submodule in model.modules():
        assert not submodule._forward_pre_hooks and not submodule._forward_hooks
    assert module.attention_function is kernel


def assert_image_blurred(calls, chosen, layout, sigma):
    text, image = layout.before, layout.image_tokens
    blurred_calls = 0
    for call in calls:
        q, k, v, args, kwargs = call["given"]
        sent_q, sent_k, sent_v, sent_args, sent_kwargs = call["sent"]
        assert sent_k is k and sent_v is v and sent_args == args and sent_kwargs == kwargs
        if call["block"] not in chosen:
            assert sent_q is q
            continue
        blurred_calls += 1
        span = blur_queries(q[..., text : text + image, :], layout.height, layout.width, sigma)
        assert torch.equal(sent_q, torch.cat((q[..., :text, :], span, q[..., text + image :, :]), dim=-2))
        if math.isinf(sigma):  # every image query becomes the image's mean query (per row and head)
            mean = q[..., text : text + image, :].mean(dim=-2, keepdim=True)
            torch.testing.assert_close(sent_q[..., text : text + image, :], mean.expand_as(span))
    return blurred_calls


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_flux2_blurs_the_roped_image_queries_of_the_chosen_blocks_only(flux2, size, sigma):
    model = flux2.build()
    x = flux2.latent(2, *size, torch.Generator().manual_seed(1))
    conds = flux2.conds(2, tokens=5)
    refs = [torch.randn(1, flux2.LATENT_CHANNELS, 4, 6)]  # a reference image: tokens after the image
    mask = torch.zeros(2, 1, 1, 5 + size[0] * size[1] + 24)  # an additive key mask reaches the kernel as is
    t = torch.rand(2)

    def run():
        return model(x, t, context=conds[0]["cross_attn"], ref_latents=refs, attention_mask=mask)

    baseline = run()
    smoothing, chosen = smoothing_for(model, "double 1-2, single 1", sigma)
    assert chosen == ["double_blocks.1", "double_blocks.2", "single_blocks.1"]
    out, calls = recorded_calls(model, smoothing, run)
    layout = flux2.reference_layout(x, conds)
    assert (layout.height, layout.width) == size  # patch 1: one token per latent pixel
    assert len(calls) == 7 and all(call["given"][0].shape[-2] == 5 + size[0] * size[1] + 24 for call in calls)
    assert assert_image_blurred(calls, chosen, layout, sigma) == smoothing.blurred_calls == 3
    assert not torch.equal(out, baseline)
    assert_nothing_left(model, flux2, sf.attention_function)
    assert torch.equal(run(), baseline)


@pytest.mark.parametrize("size", [(7, 9), (8, 6)])
def test_neo_flux1_and_kontext_keep_the_flux_family_with_the_patch_read_from_the_model(flux2, size):
    model = flux2.build(**FLUX1)
    assert transformers.family_of(model) is transformers.FLUX
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, *size, generator=g), torch.randn(2, 5, flux2.CONTEXT_DIM, generator=g)
    kwargs = dict(context=context, y=torch.randn(2, 8, generator=g), guidance=torch.full((2,), 3.5),
                  ref_latents=[torch.randn(1, 4, 6, 4, generator=g)])  # fmt: skip
    t = torch.rand(2, generator=g)
    baseline = model(x, t, **kwargs)
    smoothing, chosen = smoothing_for(model, "middle", 2.0)
    assert chosen == ["double_blocks.7", "double_blocks.8", "double_blocks.9"]
    out, calls = recorded_calls(model, smoothing, lambda: model(x, t, **kwargs))
    layout = transformers.CallLayout(1, (size[0] + 1) // 2, (size[1] + 1) // 2, before=5)
    assert smoothing.layout is None and assert_image_blurred(calls, chosen, layout, 2.0) == 3
    assert all(call["given"][0].shape[-2] == 5 + layout.image_tokens + 6 for call in calls)  # Kontext: 3×2
    assert not torch.equal(out, baseline)
    assert torch.equal(model(x, t, **kwargs), baseline)


def test_families_tell_flux2_from_flux1_chroma_and_the_rest(flux2, monkeypatch):
    klein = flux2.build()
    assert transformers.family_of(klein) is transformers.FLUX2
    assert not transformers.FLUX.matches(klein) and not transformers.CHROMA.matches(klein)
    assert transformers.family_of(flux2.build(global_modulation=False)) is transformers.FLUX
    assert (
        transformers.family_of(flux2.build(txt_norm=True, yak_mlp=True, mlp_silu_act=False))
        is transformers.FLUX2
    )
    forge_modules = st.install(monkeypatch)
    neo.install(monkeypatch, names=("flux2_model",))
    for family in ("flux", "flux-schnell", "chroma", "sd3"):
        model = st.build(forge_modules, family)
        assert not transformers.FLUX2.matches(model)
        assert transformers.family_of(model) is not transformers.FLUX2


@pytest.mark.parametrize("name", [name for name in neo.NAMES if name != "flux2_model"])
def test_no_other_neo_family_is_flux2(monkeypatch, name):
    module = neo.install(monkeypatch, names=(name,))[name]
    model = module.build()
    assert not transformers.FLUX2.matches(model)
    assert transformers.family_of(model).name == module.FAMILY


def test_grid_blocks_defaults_and_kernel(flux2):
    model = flux2.build()
    family = transformers.FLUX2
    context = torch.zeros(1, 7, flux2.CONTEXT_DIM)
    for height, width in ((7, 9), (64, 48), (1, 1)):
        layout = family.layout(
            model, (torch.zeros(1, 8, height, width), torch.zeros(1)), {"context": context}
        )
        assert layout == transformers.CallLayout(1, height, width, before=7)

    def names(model, text):
        chosen, missing = transformers.resolve_blocks(model, family, parse_layers(text))
        return [name for name, _ in chosen], missing

    assert names(model, "middle") == (["double_blocks.2", "double_blocks.3", "double_blocks.4"], [])
    nine_b = flux2.build(depth=8, depth_single_blocks=1)  # Klein 9B and dev: 8 double blocks
    assert family.default(nine_b) == "double 2-4" and family.default(model) == "double 2-4"
    assert names(model, "double 4-6, single 1-2") == (
        ["double_blocks.4", "single_blocks.1"],
        ["double 5-6", "single 2"],
    )
    assert names(model, "block 3, joint 1") == ([], ["joint 1", "block 3"])
    assert len(names(model, "all")[0]) == 7
    assert transformers.describe_blocks(model, family) == "double 0-4, single 0-1"
    slots = forge.transformer_kernels("Flux.2", [model.double_blocks[0], model.single_blocks[1]])
    assert {(id(slot.namespace), slot.name) for slot in slots} == {(id(vars(flux2)), "attention_function")}


def test_the_conds_run_through_forge_kmodel_with_and_without_seg(flux2):
    model = flux2.build()
    x = flux2.latent(2, 5, 7, torch.Generator().manual_seed(3))
    entry = flux2.conds(2)[0]
    kmodel = sf.KModel(model)
    sigma = torch.full((2,), 2.0)
    extra = sf.extra_conds_of([entry])
    assert extra == {}  # Klein: no pooled vector, no distilled guidance value
    plain = kmodel.apply_model(x, sigma, c_crossattn=entry["cross_attn"], **extra)
    smoothing, _ = smoothing_for(model, "middle", 3.0)
    with smoothing.applied():
        smoothed = kmodel.apply_model(x, sigma, c_crossattn=entry["cross_attn"], **extra)
    assert plain.shape == smoothed.shape == x.shape
    assert smoothing.blurred_calls == 3 and not torch.equal(plain, smoothed)
    assert torch.equal(kmodel.apply_model(x, sigma, c_crossattn=entry["cross_attn"]), plain)
