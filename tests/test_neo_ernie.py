"""SEG on Forge Neo's Ernie-Image (``tests/neo_nn/ernie.py``, Neo's module layout): the chosen
layers' joint attention over ``cat(image, text)`` gets its image queries (the FIRST h·w tokens,
q flattened to (B, tokens, heads·d)) blurred over the patch grid; the text queries after them,
keys and values are untouched."""

import math

import pytest
import standin_forge_transformers as st
import standin_neo_transformers as neo
import torch
from torch import nn
from transformer_checks import smoothing_for
from unets import sd1_unet

from lib_seg import blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge


@pytest.fixture
def ernie(monkeypatch):
    return neo.install(monkeypatch, names=("ernie",))["ernie"]


def assert_nothing_left(model, namespace, kernel):
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert namespace["attention_function"] is kernel


def recorded_calls(module, model, smoothing, run, monkeypatch):
    """One dict per kernel call: the layer's name, q/k/v before SEG, what the kernel got and its
    mask."""
    original = module.attention_function
    calls, current = [], []

    def inner(q, k, v, *args, **kwargs):
        calls[-1].update(sent=q, sent_k=k, sent_v=v, mask=kwargs.get("mask"))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, "attention_function", inner)
    handles = [
        layer.register_forward_pre_hook(lambda m, a, name=f"layers.{i}": current.append(name))
        for i, layer in enumerate(model.layers)
    ]
    try:
        with smoothing.applied():
            seg = module.attention_function

            def outer(q, k, v, *args, **kwargs):
                calls.append({"name": current[-1], "q": q, "k": k, "v": v})
                return seg(q, k, v, *args, **kwargs)

            module.attention_function = outer
            out = run()
    finally:
        for handle in handles:
            handle.remove()
    assert module.attention_function is inner
    return out, calls


@pytest.mark.parametrize("latent", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_the_chosen_layers_get_blurred_image_queries_before_the_text(ernie, monkeypatch, latent, sigma):
    model = ernie.build()
    x = ernie.latent(2, *latent, torch.Generator().manual_seed(1))
    conds = ernie.conds(2, tokens=6)
    t, context = torch.rand(2), conds[0]["cross_attn"]
    baseline = model(x, t, context=context)
    smoothing, chosen = smoothing_for(model, "block 0, block 2-3", sigma)
    assert chosen == ["layers.0", "layers.2", "layers.3"]
    out, calls = recorded_calls(ernie, model, smoothing, lambda: model(x, t, context=context), monkeypatch)
    layout = ernie.reference_layout(x, conds)
    assert (layout.frames, layout.height, layout.width, layout.before) == (1, *latent, 0)
    image = layout.image_tokens
    assert len(calls) == len(model.layers)
    for call in calls:
        q = call["q"]
        assert call["sent_k"] is call["k"] and call["sent_v"] is call["v"] and call["mask"] is None
        assert q.shape == (2, image + 6, model.hidden_size)  # (B, image + text tokens, heads·d)
        if call["name"] not in chosen:
            assert call["sent"] is q
            continue
        blurred = blur_queries(q[..., :image, :], *latent, sigma)
        assert torch.equal(call["sent"], torch.cat((blurred, q[..., image:, :]), dim=-2))
        if math.isinf(sigma):  # every image query becomes the image's mean query (per row)
            mean = q[..., :image, :].mean(dim=-2, keepdim=True).expand(-1, image, -1)
            torch.testing.assert_close(call["sent"][..., :image, :], mean)
    assert smoothing.blurred_calls == 3
    assert not torch.equal(out, baseline)
    assert_nothing_left(model, vars(ernie), ernie.attention_function)
    assert torch.equal(model(x, t, context=context), baseline)


def test_the_family_is_told_apart(ernie, monkeypatch):
    model = ernie.build()
    assert transformers.family_of(model) is transformers.ERNIE_IMAGE
    assert transformers.ERNIE_IMAGE.name == ernie.FAMILY == "Ernie-Image"
    others = [module.build() for name, module in neo.install(monkeypatch).items() if name != "ernie"]
    forge_nn = st.install(monkeypatch)
    others += [st.build(forge_nn, family) for family in ("flux", "chroma", "sd3")]
    others.append(sd1_unet(model_channels=32, context_dim=16))
    assert all(transformers.family_of(other) is not transformers.ERNIE_IMAGE for other in others)

    class LlamaLike(nn.Module):  # a ``layers`` list of other blocks (a text encoder, Lumina)
        def __init__(self):
            super().__init__()
            layer = nn.Module()
            layer.self_attn = nn.Linear(2, 2)
            self.layers = nn.ModuleList([layer])

    assert not transformers.ERNIE_IMAGE.matches(LlamaLike())
    layer = model.layers[0]
    assert transformers.ERNIE_IMAGE.attention_scopes(layer) == [layer.self_attention]


def test_layouts_blocks_and_defaults(ernie):
    model = ernie.build()
    family = transformers.ERNIE_IMAGE
    context = torch.zeros(1, 5, ernie.TEXT_DIM)

    def grid(target, height, width):
        layout = family.layout(
            target, (torch.zeros(1, ernie.IN_CHANNELS, height, width),), {"context": context}
        )
        return layout.frames, layout.height, layout.width, layout.before

    assert grid(model, 7, 9) == (1, 7, 9, 0)
    assert grid(model, 128, 96) == (1, 128, 96, 0)
    assert grid(ernie.build(patch_size=2), 8, 6) == (1, 4, 3, 0)  # the stride-p convolution's grid

    def names(text, target=model):
        chosen, missing = transformers.resolve_blocks(target, family, parse_layers(text))
        return [name for name, _ in chosen], missing

    assert names("middle") == (["layers.2", "layers.3", "layers.4"], [])  # from 0.3 of 5 layers
    real_depth = ernie.build(**ernie.BENCH_SHAPE)
    assert family.default(real_depth) == "block 11-13" == family.default_blocks  # 36 layers
    assert names("middle", real_depth)[0] == ["layers.11", "layers.12", "layers.13"]
    assert names("block 4-6") == (["layers.4"], ["block 5-6"])
    assert names("joint 1, output 2") == ([], ["joint 1", "output 2"])
    assert len(names("all")[0]) == 5
    assert transformers.describe_blocks(model, family) == "block 0-4"
    assert forge.transformer_kernels("Ernie-Image", [model.layers[0]])[0].namespace is vars(ernie)
