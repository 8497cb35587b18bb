"""SEG on diffusion transformers laid out as Forge's (``tests/forge_nn``): which queries are
blurred, over which grid, in which blocks, and that nothing is left behind."""

import math
import types

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import torch
from torch import nn
from transformer_checks import smoothing_for
from unets import sd1_unet

from lib_seg import blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge


@pytest.fixture
def modules(monkeypatch):
    return st.install(monkeypatch)



def block_names(model):
    family = transformers.family_of(model)
    return {
        block: f"{attribute}.{i}"
        for _, attribute in family.sides
        for i, block in enumerate(getattr(model, attribute))
    }


def assert_nothing_left(model, slots_before):
    assert not model._forward_pre_hooks and not model._forward_hooks
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    for namespace, name, value in slots_before:
        assert namespace[name] is value


@pytest.mark.parametrize("latent", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_flux_blurs_the_roped_image_queries_of_the_chosen_blocks_only(modules, monkeypatch, latent, sigma):
    flux = modules["flux"]
    model = st.build(modules, "flux")
    x, t, kwargs = st.model_inputs("flux", 2, latent=latent)
    kwargs["ref_latents"] = [torch.randn(2, 4, 4, 6)]  # Flux Kontext's reference tokens follow the image
    baseline = model(x, t, **kwargs)
    roped, kernel_queries = [], []
    rope, kernel = flux.apply_rope, flux.attention_function

    def recording_rope(q, k, pe):
        q, k = rope(q, k, pe)
        roped.append(q)
        return q, k

    def recording_kernel(q, *args, **kw):
        kernel_queries.append(q)
        return kernel(q, *args, **kw)

    monkeypatch.setattr(flux, "apply_rope", recording_rope)
    monkeypatch.setattr(flux, "attention_function", recording_kernel)
    smoothing, chosen = smoothing_for(model, "double 7-8, single 2", sigma)
    assert chosen == ["double_blocks.7", "double_blocks.8", "single_blocks.2"]
    with smoothing.applied():
        smoothed = model(x, t, **kwargs)
    names = [f"double_blocks.{i}" for i in range(10)] + [f"single_blocks.{i}" for i in range(4)]
    grid_h, grid_w = (latent[0] + 1) // 2, (latent[1] + 1) // 2  # Forge pads odd latents to even
    text, image = kwargs["context"].shape[1], grid_h * grid_w
    assert len(roped) == len(kernel_queries) == len(names)
    for name, q, sent in zip(names, roped, kernel_queries, strict=True):
        if name not in chosen:
            assert sent is q
            continue
        blurred = blur_queries(q[..., text : text + image, :], grid_h, grid_w, sigma)
        assert torch.equal(sent, torch.cat((q[..., :text, :], blurred, q[..., text + image :, :]), dim=-2))
        if math.isinf(sigma):  # every image query of an image becomes that image's mean query
            mean = q[..., text : text + image, :].mean(dim=-2, keepdim=True)
            torch.testing.assert_close(sent[..., text : text + image, :], mean.expand(-1, -1, image, -1))
    assert smoothing.blurred_calls == 3 * 1
    assert not torch.equal(smoothed, baseline)
    assert_nothing_left(model, [(vars(flux), "attention_function", recording_kernel)])
    assert torch.equal(model(x, t, **kwargs), baseline)


def recorded_kernel_calls(model, smoothing, run, monkeypatch):
    """(block name, queries before SEG, queries the kernel got) for every attention call."""
    slot = smoothing.slots[0]
    original = slot.namespace[slot.name]
    calls, current = [], []

    def inner(q, *args, **kw):
        calls[-1].append(q)
        return original(q, *args, **kw)

    monkeypatch.setitem(slot.namespace, slot.name, inner)
    smoothing.slots = [transformers.KernelSlot(slot.namespace, slot.name)]
    names = block_names(model)
    handles = [
        block.register_forward_pre_hook(lambda m, a, name=name: current.append(name))
        for block, name in names.items()
    ]
    try:
        with smoothing.applied():
            seg = slot.namespace[slot.name]

            def outer(q, *args, **kw):
                calls.append([current[-1], q])
                return seg(q, *args, **kw)

            slot.namespace[slot.name] = outer
            out = run()
    finally:
        for handle in handles:
            handle.remove()
    assert slot.namespace[slot.name] is inner
    return out, calls


@pytest.mark.parametrize(
    ("family", "latent"), [("chroma", (7, 9)), ("chroma", (8, 8)), ("sd3", (6, 10)), ("sd3", (8, 8))]
)
def test_chroma_and_sd3_blur_the_image_queries_after_the_text(modules, monkeypatch, family, latent):
    model = st.build(modules, family)
    x, t, kwargs = st.model_inputs(family, 2, latent=latent)
    baseline = model(x, t, **kwargs)
    layers = "double 7, single 0" if family == "chroma" else "middle"
    smoothing, chosen = smoothing_for(model, layers, 2.0)
    out, calls = recorded_kernel_calls(model, smoothing, lambda: model(x, t, **kwargs), monkeypatch)
    if family == "chroma":
        grid = ((latent[0] + 1) // 2, (latent[1] + 1) // 2)
        text = kwargs["context"].shape[1]
        assert chosen == ["double_blocks.7", "single_blocks.0"]
    else:  # the patch embedder's grid; the register token precedes the context
        grid = (latent[0] // 2, latent[1] // 2)
        text = model.register_length + kwargs["context"].shape[1]
        assert chosen == ["joint_blocks.7", "joint_blocks.8", "joint_blocks.9"]
    image = grid[0] * grid[1]
    image_only_calls = 0
    for name, q, sent in calls:
        if name not in chosen:
            assert sent is q
        elif q.shape[-2] == image:  # SD3.5's x-only self-attention: all of its queries are image
            image_only_calls += 1
            assert torch.equal(sent, blur_queries(q, *grid, 2.0))
        else:
            blurred = blur_queries(q[..., text : text + image, :], *grid, 2.0)
            assert q.shape[-2] == text + image
            assert torch.equal(sent, torch.cat((q[..., :text, :], blurred), dim=-2))
    assert image_only_calls == (2 if family == "sd3" else 0)  # blocks 7 and 8 have one
    assert not torch.equal(out, baseline)
    assert_nothing_left(model, [])
    assert torch.equal(model(x, t, **kwargs), baseline)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_everything_is_restored_after_an_exception_or_interrupt(modules, error):
    flux = modules["flux"]
    model = st.build(modules, "flux")
    x, t, kwargs = st.model_inputs("flux", 1)
    baseline = model(x, t, **kwargs)
    kernel = flux.attention_function
    smoothing, _ = smoothing_for(model, "double 7-9", math.inf)

    def fail(module, args):
        raise error

    handle = model.single_blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(type(error)), smoothing.applied():
        model(x, t, **kwargs)
    handle.remove()
    assert_nothing_left(model, [(vars(flux), "attention_function", kernel)])
    assert torch.equal(model(x, t, **kwargs), baseline)


def test_families_grids_and_defaults(modules):
    flux, schnell = st.build(modules, "flux"), st.build(modules, "flux-schnell")
    chroma, sd3 = st.build(modules, "chroma"), st.build(modules, "sd3")
    assert transformers.family_of(flux) is transformers.family_of(schnell) is transformers.FLUX
    assert transformers.family_of(chroma) is transformers.CHROMA
    assert transformers.family_of(sd3) is transformers.SD3
    assert transformers.family_of(sd1_unet(model_channels=32, context_dim=16)) is None
    context = torch.zeros(1, 5, st.CONTEXT_DIM)

    def grid(family, model, height, width):
        layout = family.layout(model, (torch.zeros(1, 4, height, width),), {"context": context})
        return layout.frames, layout.height, layout.width, layout.before

    assert grid(transformers.FLUX, flux, 7, 9) == (1, 4, 5, 5)
    assert grid(transformers.FLUX, flux, 128, 96) == (1, 64, 48, 5)
    assert grid(transformers.SD3, sd3, 6, 10) == (1, 3, 5, 5 + sd3.register_length)

    def names(model, text):
        chosen, missing = transformers.resolve_blocks(
            model, transformers.family_of(model), parse_layers(text)
        )
        return [name for name, _ in chosen], missing

    assert names(flux, "middle") == (["double_blocks.7", "double_blocks.8", "double_blocks.9"], [])
    assert names(chroma, "middle")[0] == ["double_blocks.7", "double_blocks.8", "double_blocks.9"]
    assert names(sd3, "middle") == (["joint_blocks.7", "joint_blocks.8", "joint_blocks.9"], [])
    assert len(names(flux, "all")[0]) == 14 and len(names(sd3, "all")[0]) == 13
    assert names(flux, "single") == ([f"single_blocks.{i}" for i in range(4)], [])
    assert names(flux, "double 9-11, single 3") == (["double_blocks.9", "single_blocks.3"], ["double 10-11"])
    assert names(flux, "input 7, joint 2") == ([], ["joint 2", "input 7"])
    assert names(sd3, "middle, double 1") == (
        ["joint_blocks.7", "joint_blocks.8", "joint_blocks.9"],
        ["double 1"],
    )
    assert transformers.describe_blocks(flux, transformers.FLUX) == "double 0-9, single 0-3"


def test_an_attention_without_room_for_the_grid_is_refused(modules):
    model = st.build(modules, "flux")
    smoothing, _ = smoothing_for(model, "middle", 1.0)
    smoothing.layout = transformers.CallLayout(1, 4, 4, before=5)
    with pytest.raises(ValueError, match="4x4 image grid"):
        smoothing.blur_image_queries(torch.zeros(1, 2, 20, 8))
    smoothing.layout = None
    with pytest.raises(RuntimeError):
        smoothing.blur_image_queries(torch.zeros(1, 2, 21, 8))


def test_a_kernel_forge_does_not_have_is_a_lookup_error(modules, monkeypatch):
    model = st.build(modules, "flux")
    monkeypatch.delattr(modules["flux"], "attention")
    with pytest.raises(LookupError, match="attention"):
        forge.transformer_kernels("Flux", [model.double_blocks[0]])
    with pytest.raises(LookupError, match="attention_function"):  # no Neo-style kernel in Flux's module
        forge.transformer_kernels("Hunyuan", [nn.Linear(1, 1)])


def test_a_smoothed_evaluation_whose_blocks_never_reach_the_kernel_is_an_error(modules):
    """Blocks that run as copies (offloading) or call a fused kernel: never a silent no-op."""
    model = st.build(modules, "flux")
    smoothing, _ = smoothing_for(model, "double 1", 2.0)
    unused = {"attention_function": modules["flux"].attention_function}
    smoothing.slots = [transformers.KernelSlot(unused, "attention_function")]
    x, _, kwargs = st.model_inputs("flux", 1, latent=(6, 6))
    entry = {"cross_attn": kwargs["context"], "y": kwargs["y"], "guidance": kwargs["guidance"],
             "strength": 1.0}
    args = {"model": types.SimpleNamespace(diffusion_model=model), "input": x, "sigma": torch.ones(1),
            "model_options": {"transformer_options": {}}}  # fmt: skip
    with pytest.raises(RuntimeError, match="never reached the kernel"):
        smoothing.evaluate(sf.calc_cond_uncond_batch, args, [entry])
    assert_nothing_left(model, [])
