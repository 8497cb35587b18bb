"""SEG on Wan 2.1 / 2.2 laid out as Forge Neo's ``backend/nn/wan.py`` (``tests/neo_nn/wan.py``):
only the chosen blocks' self-attention queries are blurred, each latent frame over its own grid,
never across frames; cross-attention, other blocks, keys and values are untouched; appended
``time_dim_concat`` frames are left alone; Radial Attention is refused with a clear error."""

import functools
import math

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_neo_transformers as neo
import standin_webui as sw
import torch
from transformer_checks import smoothing_for
from unets import sd1_unet

from lib_seg import SEGParams, blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge

OTHERS = tuple(name for name in neo.NAMES if name != "wan")


@pytest.fixture
def wan(monkeypatch):
    return neo.install(monkeypatch, names=("wan",))["wan"]


def inputs(module, batch=2, latent=(8, 8), tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = module.latent(batch, *latent, g)
    t = torch.rand(batch, generator=g)
    return x, t, {"context": module.conds(batch, tokens, seed)[0]["cross_attn"], "transformer_options": {}}


def record(module, model, smoothing, run, monkeypatch):
    """``(where, q before SEG, q the kernel got, k, v)`` for every kernel call of ``run()`` inside
    ``smoothing.applied()``; ``where`` is ``blocks.<i>.self_attn`` or ``blocks.<i>.cross_attn``."""
    original = module.attention_function
    calls, current = [], []

    def inner(q, k, v, *args, **kwargs):
        calls[-1].append(q)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, "attention_function", inner)
    handles = []
    for index, block in enumerate(model.blocks):
        for part in ("self_attn", "cross_attn"):
            name = f"blocks.{index}.{part}"
            sub = getattr(block, part)
            handles.append(sub.register_forward_pre_hook(lambda m, a, name=name: current.append(name)))
            handles.append(sub.register_forward_hook(lambda m, a, o: current.pop() and None))
    try:
        with smoothing.applied():
            seg = module.attention_function

            def outer(q, k, v, *args, **kwargs):
                calls.append([current[-1], q, k, v])
                return seg(q, k, v, *args, **kwargs)

            module.attention_function = outer
            out = run()
    finally:
        for handle in handles:
            handle.remove()
    assert module.attention_function is inner  # SEG put back what it found
    return out, [(where, q, sent, k, v) for where, q, k, v, sent in calls]


def blur_each_frame(span, layout, sigma):
    """The reference: every frame's h×w tokens blurred on their own, frame after frame."""
    per_frame = layout.height * layout.width
    frames = [span[..., f * per_frame : (f + 1) * per_frame, :] for f in range(layout.frames)]
    return torch.cat([blur_queries(frame, layout.height, layout.width, sigma) for frame in frames], dim=-2)


def assert_nothing_left(module, model, kernel):
    for sub in model.modules():
        assert not sub._forward_pre_hooks and not sub._forward_hooks
    assert module.attention_function is kernel


# -- the family --------------------------------------------------------------------------------
def test_wan_models_are_wan_and_only_wan(wan):
    for model in (wan.build(), wan.build(model_type="i2v", in_dim=2 * wan.IN_CHANNELS),
                  wan.build(num_layers=30), wan.build(**wan.BENCH_SHAPE)):  # fmt: skip
        assert transformers.family_of(model) is transformers.WAN
        assert [family for family in transformers.FAMILIES if family.matches(model)] == [transformers.WAN]
    assert transformers.WAN.name == wan.FAMILY == "Wan"


@pytest.mark.parametrize("name", OTHERS)
def test_no_other_neo_family_is_wan(monkeypatch, name):
    other = neo.install(monkeypatch, names=(name,))[name]
    model = other.build()
    assert not transformers.WAN.matches(model)
    assert transformers.family_of(model) is not transformers.WAN


def test_forge_transformers_and_unets_are_not_wan(monkeypatch):
    modules = st.install(monkeypatch)
    for family in ("flux", "chroma", "sd3"):
        assert not transformers.WAN.matches(st.build(modules, family))
    assert not transformers.WAN.matches(sd1_unet(model_channels=32, context_dim=16))


@pytest.mark.parametrize(("latent", "grid"), [((8, 8), (3, 4, 4)), ((6, 10), (3, 3, 5)), ((7, 9), (3, 4, 5)),
                                              ((5, 3), (3, 3, 2)), ((60, 104), (3, 30, 52))])  # fmt: skip
def test_the_grid_is_the_patch_embedders(wan, latent, grid):
    model = wan.build()
    x = wan.latent(1, *latent, torch.Generator().manual_seed(0))
    layout = transformers.WAN.layout(model, (x, torch.zeros(1)), {"context": torch.zeros(1, 5, wan.TEXT_DIM)})
    assert (layout.frames, layout.height, layout.width, layout.before) == (*grid, 0)
    assert layout == wan.reference_layout(x, wan.conds(1))
    tokens = model.patch_embedding(torch.nn.functional.pad(x, (0, latent[1] % 2, 0, latent[0] % 2)))
    assert tokens.shape[2:] == grid  # what the model's own 3-D convolution makes of it


def test_a_latent_that_is_not_a_video_is_refused(wan):
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        transformers.WAN.layout(wan.build(), (torch.zeros(1, 4, 8, 8),), {})


def test_blocks_defaults_and_descriptions(wan):
    def names(model, text):
        chosen, missing = transformers.resolve_blocks(model, transformers.WAN, parse_layers(text))
        return [name for name, _ in chosen], missing

    small, v13b, v14b = wan.build(), wan.build(num_layers=30), wan.build(**wan.BENCH_SHAPE)
    assert names(v14b, "middle") == (["blocks.9"], [])  # Skip Layer Guidance's block on the 14B
    assert names(v13b, "middle") == (["blocks.9"], [])  # and on the 1.3B (and 2.2 5B)
    assert transformers.WAN.default(small) == transformers.default_at_depth(4) == "block 1-3"
    assert names(small, "middle") == (["blocks.1", "blocks.2", "blocks.3"], [])
    assert names(small, "all") == ([f"blocks.{i}" for i in range(4)], [])
    assert names(small, "block 2, block 50-51") == (["blocks.2"], ["block 50-51"])
    assert names(small, "double 1, input 4") == ([], ["double 1", "input 4"])
    assert transformers.describe_blocks(small, transformers.WAN) == "block 0-3"
    assert transformers.describe_blocks(v14b, transformers.WAN) == "block 0-39"


def test_only_the_self_attention_is_a_scope_and_the_kernel_is_wans(wan):
    model = wan.build()
    block = model.blocks[2]
    assert transformers.WAN.attention_scopes(block) == [block.self_attn]
    [slot] = forge.transformer_kernels("Wan", [block])
    assert slot.namespace is vars(wan) and slot.name == "attention_function"


# -- what the kernel receives --------------------------------------------------------------------
@pytest.mark.parametrize("latent", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_each_frame_of_the_chosen_self_attentions_is_blurred_on_its_own(wan, monkeypatch, latent, sigma):
    model = wan.build()
    x, t, kwargs = inputs(wan, 2, latent)
    baseline = model(x, t, **kwargs)
    smoothing, chosen = smoothing_for(model, "block 1, block 3", sigma)
    assert chosen == ["blocks.1", "blocks.3"]
    out, calls = record(wan, model, smoothing, lambda: model(x, t, **kwargs), monkeypatch)
    layout = wan.reference_layout(x, None)
    assert len(calls) == 2 * len(model.blocks)
    for where, q, sent, k, _ in calls:
        block, part = where.rsplit(".", 1)
        if part == "cross_attn" or block not in chosen:
            assert sent is q
            continue
        assert q.shape[-2] == k.shape[-2] == layout.image_tokens  # the video tokens, nothing else
        assert torch.equal(sent, blur_each_frame(q, layout, sigma))
        per_frame = layout.height * layout.width
        if math.isinf(sigma):  # every query of a frame becomes that frame's mean query
            for f in range(layout.frames):
                frame = q[..., f * per_frame : (f + 1) * per_frame, :]
                torch.testing.assert_close(sent[..., f * per_frame : (f + 1) * per_frame, :],
                                           frame.mean(dim=-2, keepdim=True).expand_as(frame))  # fmt: skip
        if layout.frames > 1:  # frames are kept apart: not the blur of the frames as one tall image
            tall = blur_queries(q, layout.frames * layout.height, layout.width, sigma)
            assert not torch.equal(sent, tall)
    assert smoothing.blurred_calls == len(chosen)
    assert not torch.equal(out, baseline)
    assert_nothing_left(wan, model, wan.attention_function)
    assert torch.equal(model(x, t, **kwargs), baseline)


def test_time_dim_concat_frames_after_the_video_are_left_alone(wan, monkeypatch):
    model = wan.build()
    x, t, kwargs = inputs(wan, 2, (6, 8))
    kwargs["time_dim_concat"] = torch.randn(2, wan.IN_CHANNELS, 2, 6, 8)  # two reference frames
    smoothing, _ = smoothing_for(model, "block 2", 2.0)
    out, calls = record(wan, model, smoothing, lambda: model(x, t, **kwargs), monkeypatch)
    layout = wan.reference_layout(x, None)
    video = layout.image_tokens
    selfs = [(q, sent) for where, q, sent, _, _ in calls if where == "blocks.2.self_attn"]
    assert len(selfs) == 1
    q, sent = selfs[0]
    assert q.shape[-2] == (3 + 2) * layout.height * layout.width
    assert torch.equal(sent[..., :video, :], blur_each_frame(q[..., :video, :], layout, 2.0))
    assert torch.equal(sent[..., video:, :], q[..., video:, :])
    assert out.shape == x.shape


def test_image_to_video_conditioning_changes_no_token(wan, monkeypatch):
    model = wan.build(model_type="i2v", in_dim=2 * wan.IN_CHANNELS)
    x, t, kwargs = inputs(wan, 1, (7, 6))
    monkeypatch.setattr(wan.dynamic_args, "concat_latent", torch.randn(1, wan.IN_CHANNELS, 3, 7, 6))
    kwargs["clip_fea"] = torch.randn(1, 4, 8)  # CLIP image tokens: a second cross-attention
    baseline = model(x, t, **kwargs)
    smoothing, _ = smoothing_for(model, "middle", math.inf)
    out, calls = record(wan, model, smoothing, lambda: model(x, t, **kwargs), monkeypatch)
    layout = wan.reference_layout(x, None)
    assert (layout.frames, layout.height, layout.width) == (3, 4, 3)
    assert sum(where.endswith("cross_attn") for where, *_ in calls) == 2 * len(model.blocks)
    for where, q, sent, _, _ in calls:
        if where in {"blocks.1.self_attn", "blocks.2.self_attn", "blocks.3.self_attn"}:
            assert torch.equal(sent, blur_each_frame(q, layout, math.inf))
        else:
            assert sent is q
    assert smoothing.blurred_calls == 3
    assert not torch.equal(out, baseline)


def test_batch_rows_keys_and_values_are_untouched(wan, monkeypatch):
    model = wan.build()
    x, t, kwargs = inputs(wan, 2, (6, 6))
    elsewhere, _ = smoothing_for(model, "block 3", 1.0)  # block 0 runs as without SEG
    _, plain = record(wan, model, elsewhere, lambda: model(x, t, **kwargs), monkeypatch)
    smoothing, _ = smoothing_for(model, "block 0", 1.0)
    _, calls = record(wan, model, smoothing, lambda: model(x, t, **kwargs), monkeypatch)
    (where, q, sent, k, v), (_, plain_q, plain_sent, plain_k, plain_v) = calls[0], plain[0]
    assert where == "blocks.0.self_attn"
    assert torch.equal(q, plain_q) and torch.equal(plain_sent, plain_q)
    assert torch.equal(k, plain_k) and torch.equal(v, plain_v)  # keys and values as the model made them
    layout = wan.reference_layout(x, None)
    for row in range(2):  # each row is blurred on its own
        assert torch.equal(sent[row], blur_each_frame(q[row : row + 1], layout, 1.0)[0])


# -- Radial Attention ----------------------------------------------------------------------------
def radial_like(wan):
    """Neo's ``sd_forge_radial`` in miniature: ``functools.wraps`` of the module's ``attention``
    that sends blocks from ``dense_block`` on to its own kernel, never to ``attention_function``."""
    original = wan.attention

    @functools.wraps(original)
    def try_radial_attn(q, k, v, heads, transformer_options=None, **kwargs):
        if (transformer_options or {}).get("block_index", -1) >= 1:
            return v  # a stand-in for the sparse kernel
        return original(q, k, v, heads=heads, transformer_options=transformer_options, **kwargs)

    return try_radial_attn


def test_radial_attention_is_refused_with_a_clear_error(wan, monkeypatch):
    model = wan.build()
    x, t, kwargs = inputs(wan, 1)
    kwargs["transformer_options"] = {"radial_attn": {"dense_block": 1, "patch_size": (1, 2, 2)}}
    smoothing, _ = smoothing_for(model, "block 2", 1.0)
    with pytest.raises(ValueError, match="Radial Attention"), smoothing.applied():
        model(x, t, **kwargs)
    assert_nothing_left(wan, model, wan.attention_function)
    # a radial kernel left in place after its generation (its last step not dense) is refused too
    original = wan.attention
    monkeypatch.setattr(wan, "attention", radial_like(wan))
    kwargs["transformer_options"] = {}
    with pytest.raises(ValueError, match="turn Radial Attention off"), smoothing.applied():
        model(x, t, **kwargs)
    assert_nothing_left(wan, model, wan.attention_function)
    monkeypatch.setattr(wan, "attention", original)
    with smoothing.applied():
        model(x, t, **kwargs)
    assert smoothing.blurred_calls == 1


def test_the_script_says_why_and_generates_without_seg_under_radial_attention(monkeypatch):
    webui = sw.install(monkeypatch)
    module = neo.install(monkeypatch, names=("wan",))["wan"]
    script = sw.load_script(webui).SmoothedEnergyGuidanceScript()
    script.ui(False)
    model = module.build()
    webui.shared.sd_model = sf.forge_model(model)
    webui.shared.sd_model.is_sd1 = False
    options = webui.shared.sd_model.forge_objects.unet.model_options["transformer_options"]
    options["radial_attn"] = {"dense_block": 1, "patch_size": (1, 2, 2)}  # what sd_forge_radial adds
    args = SEGParams.from_values({"enabled": True, "layers": "block 2"}).to_args()
    cond, neg = module.conds(1), module.conds(1, seed=9)
    x = module.latent(1, 6, 8, torch.Generator().manual_seed(1))
    off = sf.sample(webui, sw.Processing(), x, sw.sigmas(2), cond, neg, 4.0)
    p = sw.Processing()
    script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    script.process_before_every_sampling(p, *args)
    guided = sf.sample(webui, p, x, sw.sigmas(2), cond, neg, 4.0)
    script.postprocess(p, None, *args)
    assert "turn Radial Attention off" in p.extra_generation_params["SEG warning"]
    assert torch.equal(guided, off)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
