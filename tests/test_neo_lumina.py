"""SEG on Forge Neo's NextDiT (Lumina 2 and Z-Image, ``tests/neo_nn/lumina.py``): which queries
are blurred (the image span after the padded caption, never the caption, the pad tokens, the keys
or the values), over which grid, in which blocks, and that nothing is left behind."""

import math
import sys
import types

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_neo_transformers as neo
import torch
from torch import nn

from lib_seg import blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge

VARIANTS = ("Z-Image", "Lumina 2")


@pytest.fixture
def lumina(monkeypatch):
    return neo.install(monkeypatch, names=("lumina",))["lumina"]


def smoothing_for(model, layers, sigma):
    family = transformers.family_of(model)
    chosen, _ = transformers.resolve_blocks(model, family, parse_layers(layers))
    return smoothing_of(model, family, [block for _, block in chosen], sigma), [name for name, _ in chosen]


def smoothing_of(model, family, blocks, sigma):
    slots = forge.transformer_kernels(family.name, blocks)
    return transformers.TransformerSmoothing(model, family, blocks, slots, sigma)


def block_names(model):
    return {block: f"{attribute}.{i}" for attribute in ("context_refiner", "noise_refiner", "layers")
            for i, block in enumerate(getattr(model, attribute))}  # fmt: skip


def recorded_calls(module, model, smoothing, run, monkeypatch):
    """``(block name, (q, k, v) before SEG, (q, k, v) the kernel got)`` for every kernel call."""
    kernel, calls, current = module.attention_function, [], []

    def inner(q, k, v, *args, **kwargs):
        calls[-1].append((q, k, v))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, "attention_function", inner)
    handles = [block.register_forward_pre_hook(lambda m, a, name=name: current.append(name))
               for block, name in block_names(model).items()]  # fmt: skip
    try:
        with smoothing.applied():
            seg = module.attention_function

            def outer(q, k, v, *args, **kwargs):
                calls.append([current[-1], (q, k, v)])
                return seg(q, k, v, *args, **kwargs)

            module.attention_function = outer
            out = run()
    finally:
        for handle in handles:
            handle.remove()
    assert module.attention_function is inner
    return out, calls


def inputs(module, batch, latent, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = module.latent(batch, *latent, g)
    conds = module.conds(batch, tokens=tokens, seed=seed)
    return x, torch.rand(batch, generator=g), conds


def assert_nothing_left(model, module, kernel):
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert module.attention_function is kernel


def expected(q, layout, sigma, start):
    image = layout.image_tokens
    blurred = blur_queries(q[..., start : start + image, :], layout.height, layout.width, sigma)
    return torch.cat((q[..., :start, :], blurred, q[..., start + image :, :]), dim=-2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("latent", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_the_image_span_after_the_padded_caption_is_blurred_in_the_chosen_blocks_only(
    lumina, monkeypatch, variant, latent, sigma
):
    model = lumina.build(variant=variant)
    x, t, conds = inputs(lumina, 2, latent)
    context = conds[0]["cross_attn"]
    baseline = model(x, t, context=context)
    smoothing, chosen = smoothing_for(model, "block 1, block 4", sigma)
    assert chosen == ["layers.1", "layers.4"]
    out, calls = recorded_calls(lumina, model, smoothing, lambda: model(x, t, context=context), monkeypatch)
    layout = lumina.reference_layout(x, conds, variant)
    image = layout.image_tokens
    pad = (-image) % 32 if variant == "Z-Image" else 0
    assert layout.before == (32 if variant == "Z-Image" else 5)
    assert len(calls) == 2 * 2 + 6  # context refiner, noise refiner, layers
    for name, (q, k, v), (sent_q, sent_k, sent_v) in calls:
        assert sent_k is k and sent_v is v
        if name not in chosen:
            assert sent_q is q
            continue
        assert q.shape[-2] == layout.before + image + pad  # caption, image, image pad tokens
        assert torch.equal(sent_q, expected(q, layout, sigma, layout.before))
        if math.isinf(sigma):  # every image query becomes the image's mean query (per row and head)
            span = q[..., layout.before : layout.before + image, :]
            torch.testing.assert_close(sent_q[..., layout.before : layout.before + image, :],
                                       span.mean(dim=-2, keepdim=True).expand_as(span))  # fmt: skip
    assert smoothing.blurred_calls == 2
    assert not torch.equal(out, baseline)
    assert_nothing_left(model, lumina, lumina.attention_function)
    monkeypatch.undo()
    assert torch.equal(model(x, t, context=context), baseline)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_noise_refiner_call_holds_the_image_first(lumina, monkeypatch, variant):
    """Not offered as a side, but its calls are placed right: image (and its pad tokens) only."""
    model = lumina.build(variant=variant)
    x, t, conds = inputs(lumina, 2, (7, 9), tokens=3)
    family = transformers.family_of(model)
    smoothing = smoothing_of(model, family, [model.noise_refiner[1]], 2.0)
    context = conds[0]["cross_attn"]
    _, calls = recorded_calls(lumina, model, smoothing, lambda: model(x, t, context=context), monkeypatch)
    layout = lumina.reference_layout(x, conds, variant)
    picked = [(q, sent) for name, (q, _, _), (sent, _, _) in calls if name == "noise_refiner.1"]
    assert len(picked) == 1 and smoothing.blurred_calls == 1
    q, sent = picked[0]
    assert q.shape[-2] == (32 if variant == "Z-Image" else layout.image_tokens)
    assert torch.equal(sent, expected(q, layout, 2.0, 0))
    assert all(sent is q for name, (q, _, _), (sent, _, _) in calls if name != "noise_refiner.1")


@pytest.mark.parametrize(("variant", "caption", "before"), [
    ("Z-Image", 1, 32), ("Z-Image", 32, 32), ("Z-Image", 33, 64), ("Z-Image", 70, 96),
    ("Lumina 2", 1, 1), ("Lumina 2", 33, 33),
])  # fmt: skip
def test_the_caption_length_is_the_one_the_layers_see(lumina, variant, caption, before):
    model = lumina.build(variant=variant)
    family = transformers.family_of(model)
    x = torch.zeros(1, lumina.CHANNELS, 9, 6)
    context = torch.zeros(1, caption, lumina.CAPTION_DIM)
    layout = family.layout(model, (x, torch.zeros(1), context), {})
    assert layout == transformers.CallLayout(1, 5, 3, before=before)
    assert layout == lumina.reference_layout(x, [{"cross_attn": context}], variant)
    assert family.layout(model, (x,), {"context": context}) == layout
    tokens = before + 15 + ((-15) % 32 if variant == "Z-Image" else 0)
    assert family.image_start(layout, tokens) == before  # a call of ``layers``
    assert family.image_start(layout, tokens - before) == 0  # a noise-refiner call


def test_cond_and_uncond_with_different_caption_lengths_get_their_own_layout(lumina, monkeypatch):
    """Forge runs captions of different lengths as separate calls: each is read on its own."""
    model = lumina.build()
    x, t, _ = inputs(lumina, 2, (6, 10))
    short, long = lumina.conds(2, tokens=5), lumina.conds(2, tokens=40, seed=3)
    smoothing, chosen = smoothing_for(model, "block 2", 1.0)
    kmodel = sf.KModel(model)

    def run():
        return sf.calc_cond_batch(kmodel, [short, long], x, t + 1.0, {"transformer_options": {}})

    _, calls = recorded_calls(lumina, model, smoothing, run, monkeypatch)
    picked = [(q, sent) for name, (q, _, _), (sent, _, _) in calls if name in chosen]
    assert len(kmodel.calls) == 2 and len(picked) == 2
    befores = []
    for q, sent in picked:  # 5 caption tokens pad to 32, 40 to 64; 15 image tokens pad to 32
        before = q.shape[-2] - 15 - 17
        befores.append(before)
        assert torch.equal(sent, expected(q, transformers.CallLayout(1, 3, 5, before), 1.0, before))
    assert sorted(befores) == [32, 64]


def test_families_are_told_apart_by_the_model(lumina, monkeypatch):
    z_image, lumina2 = lumina.build(), lumina.build(variant="Lumina 2")
    assert transformers.family_of(z_image) is transformers.Z_IMAGE
    assert transformers.family_of(lumina2) is transformers.LUMINA2
    assert not transformers.LUMINA2.matches(z_image) and not transformers.Z_IMAGE.matches(lumina2)
    # Z-Image without pad tokens (a checkpoint without cap_pad_token) is still Z-Image
    assert transformers.family_of(lumina.build(pad_tokens_multiple=None)) is transformers.Z_IMAGE
    assert transformers.family_of(lumina.build()).name == lumina.FAMILY
    others = [m.build() for name, m in neo.install(monkeypatch).items() if name != "lumina"]
    forge_modules = st.install(monkeypatch)
    others += [st.build(forge_modules, name) for name in ("flux", "chroma", "sd3")]
    for other in others:
        assert not transformers.Z_IMAGE.matches(other) and not transformers.LUMINA2.matches(other)
        assert transformers.family_of(other) not in (transformers.Z_IMAGE, transformers.LUMINA2)
    assert transformers.family_of(nn.ModuleList()) is None


def test_blocks_defaults_and_words(lumina):
    model = lumina.build()
    family = transformers.family_of(model)

    def names(text, on=model):
        chosen, missing = transformers.resolve_blocks(on, transformers.family_of(on), parse_layers(text))
        return [name for name, _ in chosen], missing

    assert names("middle") == (["layers.2", "layers.3", "layers.4"], [])  # 0.3 of 6 layers
    assert names("all")[0] == [f"layers.{i}" for i in range(6)]
    assert names("block 4-7") == (["layers.4", "layers.5"], ["block 6-7"])
    assert names("double 1, middle") == (["layers.2", "layers.3", "layers.4"], ["double 1"])
    assert transformers.describe_blocks(model, family) == "block 0-5"
    # the real depths: Z-Image 30 layers, Lumina 2 26
    assert family.default(lumina.build(n_layers=30, n_refiner_layers=0)) == "block 9-11"
    lumina2 = lumina.build(variant="Lumina 2", n_layers=26, n_refiner_layers=0)
    assert transformers.family_of(lumina2).default(lumina2) == "block 8-10"
    assert names("middle", lumina2)[0] == ["layers.8", "layers.9", "layers.10"]
    assert transformers.Z_IMAGE.default_blocks == "block 9-11"
    assert transformers.LUMINA2.default_blocks == "block 8-10"


def test_the_kernel_is_the_module_attention_function(lumina):
    model = lumina.build()
    slots = forge.transformer_kernels("Z-Image", [model.layers[0], model.layers[5]])
    assert {(id(slot.namespace), slot.name) for slot in slots} == {(id(vars(lumina)), "attention_function")}
    assert transformers.Z_IMAGE.attention_scopes(model.layers[0]) == [model.layers[0].attention]


def test_an_attention_calling_another_module_kernel_gets_that_kernel_wrapped(lumina, monkeypatch):
    """Nunchaku's quantized Z-Image swaps each block's attention for one (in backend.nn.svdq) that
    calls svdq's own kernel: the slot is looked up from the attention module's class."""
    model = lumina.build()
    svdq = types.ModuleType("backend.nn.svdq")
    svdq.attention_function = lumina.attention_function
    monkeypatch.setitem(sys.modules, "backend.nn.svdq", svdq)
    foreign = type("NunchakuZImageAttention", (lumina.JointAttention,), {"__module__": "backend.nn.svdq"})
    for block in model.layers:
        block.attention.__class__ = foreign
    scopes = transformers.Z_IMAGE.attention_scopes(model.layers[1])
    [slot] = forge.transformer_kernels("Z-Image", scopes)
    assert slot.namespace is vars(svdq) and slot.name == "attention_function"
