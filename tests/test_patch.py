"""The attn1 query patch on real ldm UNets: chosen rows change, others and later runs do not."""

import logging
import math

import pytest
import torch
from attention_backends import BACKENDS, reference_attention
from reference import conv2d_reference
from unets import forward

from lib_seg import parse_layers, resolve_attn1
from lib_seg.backends.a1111.patch import QueryBlurPatch


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    from ldm.modules.attention import CrossAttention

    if BACKENDS[request.param] is not None:
        monkeypatch.setattr(CrossAttention, "forward", BACKENDS[request.param])
    return request.param


def test_memory_efficient_backend_needs_xformers():
    from ldm.modules import attention

    if attention.XFORMERS_IS_AVAILBLE:  # pragma: no cover - CPU machines have no xformers
        pytest.fail("xformers present: add MemoryEfficientCrossAttention to BACKENDS")
    pytest.skip("MemoryEfficientCrossAttention (the other ldm backend) needs xformers: not on CPU")


@pytest.mark.parametrize("sigma", [1.0, 3.0, math.inf])
def test_single_module_equals_attention_with_blurred_queries(sd1, backend, sigma):
    module = sd1.input_blocks[1][1].transformer_blocks[0].attn1
    height, width = 6, 10
    x = torch.randn(2, height * width, module.to_q.in_features)
    with torch.no_grad():
        expected = reference_attention(module, x, conv2d_reference(module.to_q(x), height, width, sigma))
        with QueryBlurPatch([module], sigma, latent_hw=(height, width)) as patch:
            patch.rows = slice(None)
            out = module(x)
        assert patch.blurred_calls == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _inputs(unet, batch=3, latent=(16, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
    x = torch.randn(1, 4, *latent, generator=g).expand(batch, -1, -1, -1).contiguous()
    context = torch.randn(1, 5, ctx_dim, generator=g).expand(batch, -1, -1).contiguous()
    return x, torch.full((batch,), 500), context


@pytest.mark.parametrize("model", ["sd1", "sd2", "sdxl_like"])
@pytest.mark.parametrize("layers", ["middle", "input 4-5, output 3-5"])
def test_only_patched_rows_change_and_patch_leaves_no_trace(request, backend, model, layers):
    unet = request.getfixturevalue(model)
    x, t, context = _inputs(unet)
    with torch.no_grad():
        before = forward(unet, x, t, context)
        modules = [m for _, m in resolve_attn1(unet, parse_layers(layers))]
        assert modules
        with QueryBlurPatch(modules, 2.0, unet=unet) as patch:
            patch.rows = [1]
            patched = forward(unet, x, t, context)
            patch.rows = None
            idle = forward(unet, x, t, context)
        after = forward(unet, x, t, context)
    assert torch.equal(patched[0], before[0]) and torch.equal(patched[2], before[2])
    assert not torch.allclose(patched[1], before[1], atol=1e-4)
    assert patch.latent_hw == (16, 24) and patch.failure is None
    assert torch.equal(idle, before)
    assert torch.equal(after, before)
    assert all(not m.to_q._forward_hooks for m in modules)
    assert not unet._forward_pre_hooks


def test_rows_accept_masks_lists_and_tensors(sd1):
    x, t, context = _inputs(sd1, batch=4)
    modules = [m for _, m in resolve_attn1(sd1, parse_layers("input 7-8, middle"))]
    with torch.no_grad():
        base = forward(sd1, x, t, context)
        outs = []
        with QueryBlurPatch(modules, math.inf, unet=sd1) as patch:
            for rows in ([1, 3], torch.tensor([False, True, False, True]), torch.tensor([1, 3])):
                patch.rows = rows
                outs.append(forward(sd1, x, t, context))
            patch.rows = slice(None)
            every = forward(sd1, x, t, context)
            patch.rows = []
            assert patch.rows is None
    for out in outs:
        assert torch.equal(out, outs[0])
        assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    # every smoothed row of identical inputs is the same smoothed prediction
    torch.testing.assert_close(every[0], outs[0][1])


def test_patch_is_removed_after_an_exception(sd1):
    modules = [m for _, m in resolve_attn1(sd1, parse_layers("middle"))]
    with pytest.raises(RuntimeError, match="interrupted"), QueryBlurPatch(modules, 1.0, unet=sd1) as patch:
        patch.rows = slice(None)
        raise RuntimeError("interrupted")
    assert not patch.installed
    assert all(not m.to_q._forward_hooks for m in modules)
    assert not sd1._forward_pre_hooks


def test_unusable_grid_or_rows_warn_once_and_pass_through(sd1, caplog):
    module = sd1.middle_block[1].transformer_blocks[0].attn1
    x = torch.randn(2, 12, module.to_q.in_features)
    with torch.no_grad():
        plain = module(x)
        with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
            with QueryBlurPatch([module], 2.0) as patch:  # no unet, no latent size
                patch.rows = slice(None)
                assert torch.equal(module(x), plain)
                patch.latent_hw = (5, 5)  # 12 tokens fit no level of a 5x5 latent
                assert torch.equal(module(x), plain)
                patch.latent_hw = (3, 4)
                patch.rows = [7]  # outside the batch
                assert torch.equal(module(x), plain)
    assert patch.failure is not None
    assert len([r for r in caplog.records if "SEG" in r.getMessage()]) == 1


def test_identity_sigma_changes_nothing(sd1):
    x, t, context = _inputs(sd1)
    modules = [m for _, m in resolve_attn1(sd1, parse_layers("all"))]
    with torch.no_grad():
        base = forward(sd1, x, t, context)
        with QueryBlurPatch(modules, 0.0, unet=sd1) as patch:
            patch.rows = [0, 2]
            assert torch.equal(forward(sd1, x, t, context), base)
