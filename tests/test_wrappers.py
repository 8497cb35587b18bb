"""SEG beside attention wrappers users switch on: Hypertile (tiles) and token merging."""

import logging
import math

import pytest
import torch
from attention_backends import _heads
from standin_wrappers import Hypertile, apply_token_merging, remove_token_merging, tile, untile
from unets import forward

from lib_seg import blur_queries, parse_layers, resolve_attn1
from lib_seg.backends.a1111.patch import QueryBlurPatch
from lib_seg.grid import level_size

LATENT = (16, 24)


def tiled_reference(module, x, grid, nh, nw, sigma, transposed=False):
    """Hypertile's tile-local attention, with queries blurred over the whole image grid."""
    q = blur_queries(module.to_q(x), *grid, sigma)
    h, w = grid[::-1] if transposed else grid
    q, k, v = (tile(t, h, w, nh, nw) for t in (q, module.to_k(x), module.to_v(x)))
    q, k, v = (_heads(t, module.heads) for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    out = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    return module.to_out(untile(out, h, w, nh, nw))


@pytest.mark.parametrize("sigma", [2.0, math.inf])
@pytest.mark.parametrize(
    ("nh", "nw", "transposed"), [(2, 2, False), (2, 1, False), (1, 3, False), (2, 2, True)]
)
def test_hypertile_blurs_the_whole_image_grid_of_the_smoothed_rows_only(sd1, nh, nw, transposed, sigma):
    module = sd1.input_blocks[1][1].transformer_blocks[0].attn1
    grid = LATENT
    x = torch.randn(3, grid[0] * grid[1], module.to_q.in_features, generator=torch.Generator().manual_seed(0))
    hypertile = Hypertile([module], lambda n: grid, nh, nw, transposed)
    try:
        with torch.no_grad():
            plain = module(x)
            with QueryBlurPatch([module], sigma, latent_hw=LATENT) as patch:
                patch.rows = [1]
                out = module(x)
            assert patch.failure is None and patch.tiled_calls == 1
            expected = tiled_reference(module, x[1:2], grid, nh, nw, sigma, transposed)
    finally:
        hypertile.remove()
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    torch.testing.assert_close(out[1:2], expected, atol=1e-5, rtol=1e-5)


def test_hypertile_inside_a_unet_changes_only_the_smoothed_row(sd1):
    matched = resolve_attn1(sd1, parse_layers("input 1-2, output 9-11"))
    modules = [m for _, m in matched]
    hypertile = Hypertile(modules, lambda n: LATENT, 2, 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *LATENT, generator=g).expand(2, -1, -1, -1).contiguous()
    context = torch.randn(2, 5, 32, generator=g)
    try:
        with torch.no_grad():
            plain = forward(sd1, x, torch.full((2,), 500), context)
            with QueryBlurPatch(modules, math.inf, unet=sd1) as patch:
                patch.rows = [1]
                out = forward(sd1, x, torch.full((2,), 500), context)
    finally:
        hypertile.remove()
    assert patch.failure is None and patch.tiled_calls == len(modules)
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1])


def test_an_unknown_token_layout_is_reported_not_blurred(sd1, caplog):
    module = sd1.input_blocks[1][1].transformer_blocks[0].attn1
    original = module.forward
    shuffle = torch.randperm(LATENT[0] * LATENT[1], generator=torch.Generator().manual_seed(0))
    module.forward = lambda x, *a, **k: original(
        x[:, shuffle].reshape(x.shape[0] * 2, -1, x.shape[2]), *a, **k
    )
    x = torch.randn(1, LATENT[0] * LATENT[1], module.to_q.in_features)
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING, "sd_webui_seg"):
            plain = module(x)
            with QueryBlurPatch([module], math.inf, latent_hw=LATENT) as patch:
                patch.rows = slice(None)
                out = module(x)
    finally:
        del module.forward
    assert "layout SEG does not recognise" in patch.failure
    assert torch.equal(out, plain)


def test_token_merging_is_named_and_never_matched_to_another_level(sd1):
    # 4 merged tokens per group: level 0 (16x24 = 384 tokens) then holds 96 tokens, exactly the
    # token count of level 1 (8x12): the layer's level, not its token count, fixes the grid
    assert level_size(*LATENT, 1)[0] * level_size(*LATENT, 1)[1] * 4 == LATENT[0] * LATENT[1]
    modules = [m for _, m in resolve_attn1(sd1, parse_layers("input 1"))]
    blocks = apply_token_merging(sd1)
    try:
        with torch.no_grad(), QueryBlurPatch(modules, math.inf, unet=sd1) as patch:
            patch.rows = slice(None)
            forward(sd1, torch.randn(1, 4, *LATENT), torch.full((1,), 500), torch.randn(1, 5, 32))
    finally:
        remove_token_merging(blocks)
    assert patch.blurred_calls == 0
    assert "token merging" in patch.failure and "Token merging ratio" in patch.failure


def test_without_wrappers_the_level_grid_is_used(sd1):
    modules = [m for _, m in resolve_attn1(sd1, parse_layers("all"))]
    with torch.no_grad(), QueryBlurPatch(modules, 2.0, unet=sd1) as patch:
        patch.rows = slice(None)
        forward(sd1, torch.randn(1, 4, *LATENT), torch.full((1,), 500), torch.randn(1, 5, 32))
    assert patch.failure is None and patch.blurred_calls == len(modules) and patch.tiled_calls == 0


def test_token_merging_leaves_the_default_middle_block_guided(sd1):
    modules = [m for _, m in resolve_attn1(sd1, parse_layers("middle"))]
    blocks = apply_token_merging(sd1)
    try:
        with torch.no_grad(), QueryBlurPatch(modules, math.inf, unet=sd1) as patch:
            patch.rows = slice(None)
            forward(sd1, torch.randn(1, 4, 32, 32), torch.full((1,), 500), torch.randn(1, 5, 32))
    finally:
        remove_token_merging(blocks)
    assert patch.failure is None and patch.blurred_calls == 1
