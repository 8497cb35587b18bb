"""SEG on Forge Neo's Krea-2 (``tests/neo_nn/krea.py``): one block list over ``cat(text, image,
references)``, the text fused by its own transformer first (never smoothed), 2×2 patches of a
one-frame video latent, and references whose blocks are run part by part."""

import math

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_neo_transformers as neo
import torch
from transformer_checks import smoothing_for

from lib_seg import blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge


@pytest.fixture
def krea(monkeypatch):
    return neo.install(monkeypatch, names=("krea",))["krea"]


def recorded_calls(model, smoothing, run):
    """Per kernel call: the block whose attention made it (None: the text fusion), the
    (q, k, v, kwargs) SEG was handed and those the kernel got."""
    slot = smoothing.slots[0]
    kernel = slot.namespace[slot.name]
    calls, current = [], [None]

    def inner(q, k, v, *args, **kwargs):
        calls[-1]["sent"] = (q, k, v, args, kwargs)
        return kernel(q, k, v, *args, **kwargs)

    def enter(name):
        return lambda module, args: current.append(name)

    def leave(module, args, out):
        current.pop()

    slot.namespace[slot.name] = inner
    handles = []
    for index, block in enumerate(model.blocks):  # attn: the reference path never calls the block
        handles.append(block.attn.register_forward_pre_hook(enter(f"blocks.{index}")))
        handles.append(block.attn.register_forward_hook(leave))
    try:
        with smoothing.applied():
            seg = slot.namespace[slot.name]

            def outer(q, k, v, *args, **kwargs):
                calls.append({"block": current[-1], "given": (q, k, v, args, kwargs)})
                return seg(q, k, v, *args, **kwargs)

            slot.namespace[slot.name] = outer
            out = run()
        assert slot.namespace[slot.name] is inner  # SEG put back what it found
    finally:
        slot.namespace[slot.name] = kernel
        for handle in handles:
            handle.remove()
    return out, calls


def assert_nothing_left(model, krea):
    for submodule in model.modules():
        assert not submodule._forward_pre_hooks and not submodule._forward_hooks
    assert krea.attention_function is sf.attention_function


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
@pytest.mark.parametrize("references", [0, 2])
def test_krea2_blurs_the_image_queries_of_the_chosen_blocks_only(krea, size, sigma, references):
    model = krea.build()
    g = torch.Generator().manual_seed(1)
    x = krea.latent(2, *size, g)
    conds = krea.conds(2, tokens=5)
    refs = [
        torch.randn(1, krea.CHANNELS, 4, 6, generator=g),
        torch.randn(2, krea.CHANNELS, 3, 3, generator=g),
    ]
    kwargs = {"ref_latents": refs[:references]} if references else {}
    t = torch.rand(2, generator=g)

    def run():
        return model(x, t, context=conds[0]["cross_attn"], **kwargs)

    baseline = run()
    smoothing, chosen = smoothing_for(model, "block 1, block 4", sigma)
    assert chosen == ["blocks.1", "blocks.4"]
    out, calls = recorded_calls(model, smoothing, run)
    layout = krea.reference_layout(x, conds)
    assert (layout.height, layout.width) == ((size[0] + 1) // 2, (size[1] + 1) // 2)
    text, image = layout.before, layout.image_tokens
    reference_tokens = (6 + 4) if references else 0  # 2×3 and 2×2 patches
    fusion = [call for call in calls if call["block"] is None]
    assert len(fusion) == 4 and len(calls) == 4 + 6  # the text fusion's 4 attentions, then 6 blocks
    for call in calls:
        q, k, v, args, kwargs_given = call["given"]
        sent_q, sent_k, sent_v, sent_args, sent_kwargs = call["sent"]
        assert sent_k is k and sent_v is v and sent_args == args and sent_kwargs == kwargs_given
        if call["block"] not in chosen:
            assert sent_q is q
            continue
        assert q.shape[-2] == text + image + reference_tokens
        span = blur_queries(q[..., text : text + image, :], layout.height, layout.width, sigma)
        assert torch.equal(sent_q, torch.cat((q[..., :text, :], span, q[..., text + image :, :]), dim=-2))
        if math.isinf(sigma):
            mean = q[..., text : text + image, :].mean(dim=-2, keepdim=True)
            torch.testing.assert_close(sent_q[..., text : text + image, :], mean.expand_as(span))
    assert smoothing.blurred_calls == 2
    assert not torch.equal(out, baseline)
    assert_nothing_left(model, krea)
    assert torch.equal(run(), baseline)


def test_family_grid_blocks_and_kernel(krea, monkeypatch):
    model = krea.build()
    family = transformers.KREA2
    assert transformers.family_of(model) is family
    assert transformers.family_of(krea.build(layers=28, features=32, heads=2, kvheads=1)) is family
    context = torch.zeros(1, 7, krea.TXT_LAYERS * krea.TXT_DIM)
    for shape, grid in (((1, 4, 1, 7, 9), (4, 5)), ((1, 4, 64, 48), (32, 24)), ((1, 4, 1, 1, 1), (1, 1))):
        layout = family.layout(model, (torch.zeros(shape), torch.zeros(1)), {"context": context})
        assert layout == transformers.CallLayout(1, *grid, before=7)
    layout = family.layout(model, (torch.zeros(1, 4, 1, 6, 6), torch.zeros(1), context[:, None]), {})
    assert layout.before == 7  # a (B, 1, tokens, features) context, as the model squeezes it

    def names(model, text):
        chosen, missing = transformers.resolve_blocks(model, family, parse_layers(text))
        return [name for name, _ in chosen], missing

    assert names(model, "middle") == (["blocks.2", "blocks.3", "blocks.4"], [])
    assert family.default(krea.build(layers=28, features=32, heads=2, kvheads=1)) == "block 8-10"
    assert names(model, "block 5-7, double 1") == (["blocks.5"], ["double 1", "block 6-7"])
    assert len(names(model, "all")[0]) == 6
    assert transformers.describe_blocks(model, family) == "block 0-5"
    assert family.attention_scopes(model.blocks[3]) == [model.blocks[3].attn]
    slots = forge.transformer_kernels("Krea-2", [model.blocks[0], model.blocks[5]])
    assert {(id(slot.namespace), slot.name) for slot in slots} == {(id(vars(krea)), "attention_function")}
    forge_modules = st.install(monkeypatch)
    for name in ("flux", "chroma", "sd3"):
        assert not family.matches(st.build(forge_modules, name))


@pytest.mark.parametrize("name", [name for name in neo.NAMES if name != "krea"])
def test_no_other_neo_family_is_krea2(monkeypatch, name):
    module = neo.install(monkeypatch, names=(name,))[name]
    model = module.build()
    assert not transformers.KREA2.matches(model)
    assert transformers.family_of(model).name == module.FAMILY


def test_the_conds_run_through_forge_kmodel_with_and_without_seg(krea):
    model = krea.build()
    x = krea.latent(2, 5, 7, torch.Generator().manual_seed(3))
    entry = krea.conds(2)[0]
    kmodel = sf.KModel(model)
    sigma = torch.full((2,), 2.0)
    assert sf.extra_conds_of([entry]) == {}
    plain = kmodel.apply_model(x, sigma, c_crossattn=entry["cross_attn"])
    smoothing, _ = smoothing_for(model, "middle", 3.0)
    with smoothing.applied():
        smoothed = kmodel.apply_model(x, sigma, c_crossattn=entry["cross_attn"])
    assert plain.shape == smoothed.shape == x.shape
    assert smoothing.blurred_calls == 3 and not torch.equal(plain, smoothed)
    assert torch.equal(kmodel.apply_model(x, sigma, c_crossattn=entry["cross_attn"]), plain)
