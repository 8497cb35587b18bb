"""SEG on Qwen-Image / Qwen-Image-Edit laid out as Forge Neo's ``backend/nn/qwen.py``
(``tests/neo_nn/qwen.py``): detection, which queries reach the kernel blurred (the image tokens
after the text, never Edit's reference tokens after them), over which grid (the padded 5-D
latent's 2×2 patches), in which blocks, and that nothing is left behind."""

import math

import pytest
import standin_forge as sf
import standin_neo_transformers as sn
import standin_webui as sw
import torch
from torch import nn
from transformer_checks import smoothing_for
from unets import sd1_unet

from lib_seg import SEGParams, blur_queries, parse_layers, transformers
from lib_seg.backends.model_patcher import forge

OTHERS = tuple(name for name in sn.NAMES if name != "qwen")


@pytest.fixture
def qwen(monkeypatch):
    return sn.install(monkeypatch, names=("qwen",))["qwen"]


def names_of(model, text):
    chosen, missing = transformers.resolve_blocks(model, transformers.QWEN_IMAGE, parse_layers(text))
    return [name for name, _ in chosen], missing


def assert_nothing_left(qwen, model, kernel):
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert qwen.attention_function is kernel


def kernel_calls(qwen, model, smoothing, run):
    """(block name, q before SEG, (q, k, v) the kernel got, k and v before SEG) per attention call."""
    kernel = qwen.attention_function
    calls, current = [], []

    def inner(q, k, v, *args, **kw):
        calls[-1].append((q, k, v))
        return kernel(q, k, v, *args, **kw)

    qwen.attention_function = inner
    smoothing.slots = [transformers.KernelSlot(vars(qwen), "attention_function")]
    handles = [
        block.register_forward_pre_hook(lambda m, a, name=f"transformer_blocks.{i}": current.append(name))
        for i, block in enumerate(model.transformer_blocks)
    ]
    try:
        with smoothing.applied():
            seg = qwen.attention_function

            def outer(q, k, v, *args, **kw):
                calls.append([current[-1], q, (k, v)])
                return seg(q, k, v, *args, **kw)

            qwen.attention_function = outer
            out = run()
        assert qwen.attention_function is inner
    finally:
        qwen.attention_function = kernel
        for handle in handles:
            handle.remove()
    return out, calls


def test_qwen_image_is_its_own_family(qwen):
    model = qwen.build()
    assert transformers.family_of(model) is transformers.QWEN_IMAGE
    assert transformers.QWEN_IMAGE.name == qwen.FAMILY == "Qwen-Image"
    assert transformers.QWEN_IMAGE in transformers.FAMILIES
    assert not any(f.matches(model) for f in transformers.FAMILIES if f is not transformers.QWEN_IMAGE)
    assert transformers.family_of(sd1_unet(model_channels=32, context_dim=16)) is None  # its
    # SpatialTransformers hold ``transformer_blocks`` deeper down
    bare = nn.Module()
    bare.transformer_blocks = nn.ModuleList([nn.Linear(2, 2)])  # a block list alone is not Qwen
    assert transformers.family_of(bare) is None


@pytest.mark.parametrize("name", OTHERS)
def test_other_neo_families_are_not_qwen_image(monkeypatch, name):
    module = sn.install(monkeypatch, names=(name,))[name]
    model = module.build()
    assert not transformers.QWEN_IMAGE.matches(model)
    assert transformers.family_of(model).name == module.FAMILY != "Qwen-Image"


def test_the_kernel_is_attention_function_in_the_blocks_module(qwen):
    model = qwen.build()
    slots = forge.transformer_kernels("Qwen-Image", list(model.transformer_blocks[:2]))
    assert {(id(slot.namespace), slot.name) for slot in slots} == {(id(vars(qwen)), "attention_function")}
    scopes = transformers.QWEN_IMAGE.attention_scopes(model.transformer_blocks[0])
    assert scopes == [model.transformer_blocks[0].attn]  # the joint attention, not the MLPs


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9), (5, 3)])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
@pytest.mark.parametrize("edit", [False, True])
def test_the_image_queries_of_the_chosen_blocks_are_blurred(qwen, monkeypatch, size, sigma, edit):
    model = qwen.build()
    g = torch.Generator().manual_seed(3)
    x, t = qwen.latent(2, *size, g), torch.rand(2, generator=g)
    conds = qwen.conds(2, tokens=5)
    context = conds[0]["cross_attn"]
    refs = [qwen.reference_latent(5, 6)] if edit else []
    monkeypatch.setattr(qwen.dynamic_args, "ref_latents", refs)  # where Neo's Edit engine puts them
    ref_tokens = 3 * 3 if edit else 0
    layout = qwen.reference_layout(x, conds)
    baseline = model(x, t, context=context)
    assert baseline.shape == x.shape
    smoothing, chosen = smoothing_for(model, "block 1, block 3-4", sigma)
    assert chosen == ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.4"]
    kernel = qwen.attention_function
    out, calls = kernel_calls(qwen, model, smoothing, lambda: model(x, t, context=context))
    text, image = layout.before, layout.image_tokens
    assert transformers.QWEN_IMAGE.layout(model, (x, t), {"context": context}) == layout
    assert [name for name, *_ in calls] == [f"transformer_blocks.{i}" for i in range(6)]
    for name, q, (k, v), (sent, sent_k, sent_v) in calls:
        assert q.shape == (2, text + image + ref_tokens, model.inner_dim)
        assert sent_k is k and sent_v is v
        if name not in chosen:
            assert sent is q
            continue
        span = q[..., text : text + image, :]
        assert torch.equal(sent[..., :text, :], q[..., :text, :])  # text
        assert torch.equal(sent[..., text + image :, :], q[..., text + image :, :])  # Edit's references
        assert torch.equal(
            sent[..., text : text + image, :], blur_queries(span, layout.height, layout.width, sigma)
        )
        if math.isinf(sigma):
            mean = span.mean(dim=-2, keepdim=True).expand_as(span)
            torch.testing.assert_close(sent[..., text : text + image, :], mean)
    assert smoothing.blurred_calls == 3
    assert not torch.equal(out, baseline)
    assert_nothing_left(qwen, model, kernel)
    assert torch.equal(model(x, t, context=context), baseline)


def test_references_passed_to_the_call_also_stay_after_the_image(qwen):
    model = qwen.build(num_layers=3)
    x, conds = qwen.latent(1, 7, 7), qwen.conds(1, tokens=4)
    refs = [qwen.reference_latent(4, 4), qwen.reference_latent(3, 5, seed=2)]
    smoothing, _ = smoothing_for(model, "block 1", 2.0)
    kernel = qwen.attention_function
    t = torch.rand(1)
    _, calls = kernel_calls(
        qwen, model, smoothing, lambda: model(x, t, conds[0]["cross_attn"], ref_latents=refs)
    )
    (_, q, _, (sent, _, _)) = calls[1]
    text, image = 4, 4 * 4
    assert q.shape[1] == text + image + 2 * 2 + 2 * 3
    blurred = blur_queries(q[..., text : text + image, :], 4, 4, 2.0)
    assert torch.equal(sent, torch.cat((q[..., :text, :], blurred, q[..., text + image :, :]), dim=-2))
    assert_nothing_left(qwen, model, kernel)


def test_a_dit_replace_patch_that_runs_the_block_is_smoothed_too(qwen):
    model = qwen.build(num_layers=3)
    x, conds = qwen.latent(1, 6, 6), qwen.conds(1)
    options = {
        "patches_replace": {"dit": {("double_block", 1): lambda args, extra: extra["original_block"](args)}}
    }
    smoothing, _ = smoothing_for(model, "block 1", math.inf)
    with smoothing.applied():
        model(x, torch.rand(1), conds[0]["cross_attn"], transformer_options=options)
    assert smoothing.blurred_calls == 1


def test_grids_of_the_padded_5d_latent_and_a_video_latent_refused(qwen):
    model = qwen.build(num_layers=1)
    context = torch.zeros(2, 7, qwen.CONTEXT_DIM)

    def layout(*shape):
        return transformers.QWEN_IMAGE.layout(
            model, (torch.zeros(*shape), torch.zeros(2)), {"context": context}
        )

    assert layout(2, 4, 1, 7, 9) == transformers.CallLayout(1, 4, 5, before=7)
    assert layout(2, 4, 1, 128, 96) == transformers.CallLayout(1, 64, 48, before=7)
    assert layout(2, 4, 1, 1, 1) == transformers.CallLayout(1, 1, 1, before=7)
    assert transformers.QWEN_IMAGE.layout(
        model, (torch.zeros(2, 4, 1, 5, 5), torch.zeros(2), context), {}
    ) == (transformers.CallLayout(1, 3, 3, before=7))
    with pytest.raises(ValueError, match="one frame"):
        layout(2, 4, 3, 8, 8)


def test_blocks_middle_all_missing_and_words(qwen):
    model = qwen.build()  # 6 blocks
    assert names_of(model, "middle") == ([f"transformer_blocks.{i}" for i in (2, 3, 4)], [])
    real = qwen.build(num_layers=60)  # Qwen-Image and -Edit: 60 blocks
    assert transformers.QWEN_IMAGE.default(real) == "block 18-20"
    assert names_of(real, "middle")[0] == [f"transformer_blocks.{i}" for i in (18, 19, 20)]
    assert len(names_of(real, "all")[0]) == 60
    assert names_of(model, "block 4-7") == (["transformer_blocks.4", "transformer_blocks.5"], ["block 6-7"])
    assert names_of(model, "middle, double 1") == (
        [f"transformer_blocks.{i}" for i in (2, 3, 4)],
        ["double 1"],
    )
    assert names_of(model, "input 7, joint 2") == ([], ["joint 2", "input 7"])
    assert transformers.describe_blocks(model, transformers.QWEN_IMAGE) == "block 0-5"
    assert transformers.describe_blocks(real, transformers.QWEN_IMAGE) == "block 0-59"


# -- the script's Forge Neo path: the stand-in KModel hands the model the 5-D latent and the cond --


@pytest.fixture
def webui(monkeypatch):
    ui = sw.install(monkeypatch)
    ui.qwen = sn.install(monkeypatch, names=("qwen",))["qwen"]
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors


def generate(webui, args, x, cfg, batch=1):
    p = sw.Processing()
    qwen = webui.qwen
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    out = sf.sample(webui, p, x, sw.sigmas(3), qwen.conds(batch), qwen.conds(batch, tokens=7, seed=9), cfg)
    webui.script.post_sample(p, None, *args)
    webui.script.postprocess_batch(p, *args)
    webui.script.postprocess(p, None, *args)
    return out, p


@pytest.mark.parametrize(("cfg", "batch"), [(1.0, 1), (4.0, 2)])
def test_the_script_guides_qwen_image_and_off_is_bit_identical(webui, monkeypatch, cfg, batch):
    model = webui.qwen.build()
    webui.shared.sd_model = sf.forge_model(model)
    webui.shared.sd_model.is_sd1 = False
    x = webui.qwen.latent(batch, 7, 10, torch.Generator().manual_seed(42))
    bare = sw.install(monkeypatch)
    bare.shared.sd_model = sf.forge_model(model)
    qwen = webui.qwen
    baseline = sf.sample(bare, sw.Processing(), x, sw.sigmas(3), qwen.conds(batch),
                         qwen.conds(batch, tokens=7, seed=9), cfg)  # fmt: skip
    off, _ = generate(webui, [False], x, cfg, batch)
    guided, p = generate(webui, SEGParams.from_values({"enabled": True}).to_args(), x, cfg, batch)
    assert torch.equal(off, baseline)
    assert guided.shape == x.shape and torch.isfinite(guided).all() and not torch.allclose(guided, baseline)
    assert "SEG warning" not in p.extra_generation_params
    assert torch.equal(generate(webui, [False], x, cfg, batch)[0], baseline)
