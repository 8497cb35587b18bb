"""Token grids from the latent size: every size a webui allows, and a real UNet's own grids."""

import pytest
import torch

from lib_seg import token_grid
from lib_seg.grid import level_size


def conv_out(length: int) -> int:
    # torch Conv2d(kernel 3, stride 2, padding 1) output length, written from its formula
    return (length + 2 * 1 - 3) // 2 + 1


@pytest.mark.parametrize("levels", [3, 4], ids=["sdxl", "sd1"])
def test_every_webui_size_resolves_to_its_true_grid(levels):
    sizes = range(64 // 8, 2048 // 8 + 1)  # latent sides for 64..2048 px in steps of 8 px
    for latent_h in sizes:
        for latent_w in sizes:
            h, w = latent_h, latent_w
            for _level in range(levels):
                assert token_grid(h * w, latent_h, latent_w) == (h, w)
                h, w = conv_out(h), conv_out(w)


def test_level_size_matches_conv_arithmetic():
    for side in range(1, 300):
        assert level_size(side, side, 1) == (conv_out(side), conv_out(side))


def test_non_square_examples_that_break_sqrt_inference():
    # 704x960 px (incantations crashes), 2048x512 px (isqrt silently wrong), SDXL buckets
    assert token_grid(22 * 30, 88, 120) == (22, 30)
    assert token_grid(16 * 64, 64, 256) == (16, 64)
    assert token_grid(26 * 38, 104, 152) == (26, 38)
    assert token_grid(65 * 128, 65, 128) == (65, 128)
    assert token_grid(33 * 64, 65, 128) == (33, 64)


def test_unmatched_token_count_raises():
    with pytest.raises(ValueError, match="match no UNet level"):
        token_grid(77, 64, 64)
    with pytest.raises(ValueError):
        token_grid(4, 0, 8)


def test_real_unet_attention_sees_the_inferred_grid(sd1, sdxl_like):
    from unets import forward

    for unet in (sd1, sdxl_like):
        seen = []

        def record(module, args, output, seen=seen):
            seen.append(output.shape[1])

        def record_grid(module, args, seen=seen):
            seen.append(tuple(args[0].shape[-2:]))

        handles = []
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                handles.append(module.to_q.register_forward_hook(record))
            if type(module).__name__ == "SpatialTransformer":
                handles.append(module.register_forward_pre_hook(record_grid))
        try:
            latent = (24, 40)
            ctx = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
            with torch.no_grad():
                forward(unet, torch.randn(1, 4, *latent), torch.tensor([5]), torch.randn(1, 3, ctx))
        finally:
            for handle in handles:
                handle.remove()
        grid = None
        checked = 0
        for item in seen:
            if isinstance(item, tuple):
                grid = item
            else:
                assert token_grid(item, *latent) == grid
                checked += 1
        assert checked > 0
