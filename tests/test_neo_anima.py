"""SEG on Forge Neo's Anima (``tests/neo_nn/anima.py``, Neo's module layout): the image queries of
the chosen blocks' self-attention are blurred over the 1×2×2 patch grid of the padded latent, frame
by frame; the cross-attention to the text, the reference frames, keys and values are untouched."""

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
def anima(monkeypatch):
    module = neo.install(monkeypatch, names=("anima",))["anima"]
    monkeypatch.setattr(module.dynamic_args, "ref_latents", [])
    return module


def assert_nothing_left(model, namespace, kernel):
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert namespace["attention_function"] is kernel


def recorded_calls(module, model, smoothing, run, monkeypatch):
    """One dict per kernel call: the attention module's name, q/k/v before SEG and what the
    kernel got."""
    original = module.attention_function
    calls, current = [], []

    def inner(q, k, v, *args, **kwargs):
        calls[-1].update(sent=q, sent_k=k, sent_v=v)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, "attention_function", inner)
    handles = [
        attention.register_forward_pre_hook(lambda m, a, name=name: current.append(name))
        for name, attention in model.named_modules()
        if isinstance(attention, module.SelfCrossAttention)
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


def expected_blur(q, layout, sigma):
    """q (B, heads, tokens, d) with the first frames·h·w tokens blurred frame by frame."""
    image = layout.image_tokens
    span = q[..., :image, :]
    frames = span.reshape(*span.shape[:-2], layout.frames, layout.height * layout.width, span.shape[-1])
    blurred = blur_queries(frames, layout.height, layout.width, sigma).reshape(span.shape)
    return torch.cat((blurred, q[..., image:, :]), dim=-2)


@pytest.mark.parametrize("latent", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
@pytest.mark.parametrize("references", [0, 1])
def test_the_chosen_self_attentions_get_blurred_image_queries(anima, monkeypatch, latent, sigma, references):
    model = anima.build()
    x = anima.latent(2, *latent, torch.Generator().manual_seed(1))
    conds = anima.conds(2, tokens=6)
    t, context = torch.rand(2), conds[0]["cross_attn"]
    if references:  # Anima's edit mode: the reference latent follows on the time axis (batch 1)
        anima.dynamic_args.ref_latents = [torch.randn(1, anima.IN_CHANNELS, 1, *latent)]
    baseline = model(x, t, context=context)
    smoothing, chosen = smoothing_for(model, "block 1, block 3-4", sigma)
    assert chosen == ["blocks.1", "blocks.3", "blocks.4"]
    out, calls = recorded_calls(anima, model, smoothing, lambda: model(x, t, context=context), monkeypatch)
    layout = anima.reference_layout(x, conds)
    grid = ((latent[0] + 1) // 2, (latent[1] + 1) // 2)
    assert (layout.frames, layout.height, layout.width, layout.before) == (1, *grid, 0)
    assert len(calls) == 2 * len(model.blocks)
    blurred = 0
    for call in calls:
        assert call["sent_k"] is call["k"] and call["sent_v"] is call["v"]
        block, kind = call["name"].rsplit(".", 1)
        if block not in chosen or kind == "cross_attn":
            assert call["sent"] is call["q"], call["name"]
            continue
        q = call["q"]
        assert (
            q.shape[:2] == (2, 2) and q.shape[-2] == (1 + references) * grid[0] * grid[1]
        )  # (B, heads, S, d)
        assert torch.equal(call["sent"], expected_blur(q, layout, sigma))
        image = layout.image_tokens
        assert torch.equal(call["sent"][..., image:, :], q[..., image:, :])  # reference frame untouched
        if math.isinf(sigma):  # every image query becomes the mean image query (per row and head)
            mean = q[..., :image, :].mean(dim=-2, keepdim=True).expand(-1, -1, image, -1)
            torch.testing.assert_close(call["sent"][..., :image, :], mean)
        blurred += 1
    assert blurred == smoothing.blurred_calls == 3
    assert not torch.equal(out, baseline)
    assert_nothing_left(model, vars(anima), anima.attention_function)
    assert torch.equal(model(x, t, context=context), baseline)


def test_several_frames_are_blurred_each_over_its_own_grid(anima, monkeypatch):
    model = anima.build()
    x = torch.randn(1, anima.IN_CHANNELS, 2, 5, 6, generator=torch.Generator().manual_seed(2))
    conds = anima.conds(1)
    smoothing, _ = smoothing_for(model, "block 2", 2.0)
    context = conds[0]["cross_attn"]
    _, calls = recorded_calls(
        anima, model, smoothing, lambda: model(x, torch.rand(1), context=context), monkeypatch
    )
    layout = anima.reference_layout(x, conds)
    assert (layout.frames, layout.height, layout.width) == (2, 3, 3)
    (call,) = [call for call in calls if call["name"] == "blocks.2.self_attn"]
    assert call["q"].shape[-2] == 18
    torch.testing.assert_close(call["sent"], expected_blur(call["q"], layout, 2.0), rtol=0, atol=0)
    assert not torch.equal(call["sent"], blur_queries(call["q"], 6, 3, 2.0))  # not one 6×3 grid


def test_the_family_is_told_apart(anima, monkeypatch):
    model = anima.build()
    assert transformers.family_of(model) is transformers.ANIMA
    assert transformers.ANIMA.name == anima.FAMILY == "Anima"
    others = [module.build() for name, module in neo.install(monkeypatch).items() if name != "anima"]
    forge_nn = st.install(monkeypatch)
    others += [st.build(forge_nn, family) for family in ("flux", "chroma", "sd3")]
    others.append(sd1_unet(model_channels=32, context_dim=16))
    assert all(transformers.family_of(other) is not transformers.ANIMA for other in others)

    class AdapterLike(nn.Module):  # blocks with self_attn and cross_attn, as Anima's LLM adapter's
        def __init__(self):
            super().__init__()
            self.patch_spatial, self.patch_temporal = 2, 1
            block = nn.Module()
            block.self_attn, block.cross_attn = nn.Linear(2, 2), nn.Linear(2, 2)
            self.blocks = nn.ModuleList([block])

    assert not transformers.ANIMA.matches(AdapterLike())
    assert transformers.ANIMA.attention_scopes(model.blocks[0]) == [model.blocks[0].self_attn]


def test_layouts_blocks_and_defaults(anima):
    model = anima.build()
    family = transformers.ANIMA

    def grid(shape):
        layout = family.layout(
            model, (torch.zeros(shape),), {"context": torch.zeros(1, 5, anima.CONTEXT_DIM)}
        )
        return layout.frames, layout.height, layout.width, layout.before

    assert grid((1, 4, 1, 7, 9)) == (1, 4, 5, 0)
    assert grid((2, 4, 1, 128, 96)) == (1, 64, 48, 0)
    assert grid((1, 4, 3, 6, 5)) == (3, 3, 3, 0)
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        family.layout(model, (torch.zeros(1, 4, 8, 8),), {})

    def names(text, target=model):
        chosen, missing = transformers.resolve_blocks(target, family, parse_layers(text))
        return [name for name, _ in chosen], missing

    assert names("middle") == (["blocks.2", "blocks.3", "blocks.4"], [])  # 0.3 of 6 blocks
    real_depth = anima.build(**anima.BENCH_SHAPE)
    assert family.default(real_depth) == "block 8-10" == family.default_blocks  # 28 blocks
    assert names("middle", real_depth)[0] == ["blocks.8", "blocks.9", "blocks.10"]
    assert names("block 5-7") == (["blocks.5"], ["block 6-7"])
    assert names("double 1, input 2") == ([], ["double 1", "input 2"])
    assert len(names("all")[0]) == 6
    assert transformers.describe_blocks(model, family) == "block 0-5"
    assert forge.transformer_kernels("Anima", [model.blocks[0]])[0].namespace is vars(anima)
