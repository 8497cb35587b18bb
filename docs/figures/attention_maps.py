"""Draws ``docs/figures/attention-maps.png``: what SEG's query blur does, on one real layer.

One self-attention layer of a small UNet built from the real SD1.5 classes (the `ldm` package the
tests use) with *random test weights*, not a trained model; the picture is labelled so. Its input
is a latent with two soft blobs. The figure shows the layer's attention queries over the 32×32
token grid (their first principal component, one colour scale) blurred by σ = 0, 1, 4, 16 and ∞
(every token gets the mean query), and under each the entropy of the centre query's attention.
With random weights the attention is already close to uniform, so the entropies move little; the
queries show the blur itself.

    .venv/bin/python docs/figures/attention_maps.py [out.png]

Needs the test environment (README: "Run the tests"). Deterministic on the CPU.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from PIL import Image, ImageDraw  # noqa: E402

from lib_seg import blur_queries  # noqa: E402

OUT = Path(__file__).with_name("attention-maps.png")
# Pillow's built-in font has no σ or ∞
SIGMAS = ((0.0, "sigma 0 (no blur)"), (1.0, "sigma 1"), (4.0, "sigma 4"), (16.0, "sigma 16"),
          (math.inf, "sigma inf (mean query)"))  # fmt: skip
GRID = 32  # latent 32×32: the full-resolution layers see 32×32 tokens
CELL = 5  # pixels per token in the figure
# a perceptual dark-to-bright ramp (viridis' ends and middle)
RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def query_maps() -> list[tuple[str, torch.Tensor, float]]:
    """``(label, the queries' first principal component over the grid, entropy of the centre
    query's attention in head 0)`` per σ, from input block 1's attn1."""
    from unets import sd1_unet

    unet = sd1_unet(model_channels=64, context_dim=32, seed=0)
    attention = unet.input_blocks[1][1].transformer_blocks[0].attn1
    captured = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out, key=key: captured.setdefault(key, out))
        for key, layer in (("q", attention.to_q), ("k", attention.to_k))
    ]
    ys, xs = torch.meshgrid(torch.arange(float(GRID)), torch.arange(float(GRID)), indexing="ij")
    blobs = blob(ys, xs, (10, 11), 30) - blob(ys, xs, (22, 20), 50)
    latent = blobs.expand(1, 4, GRID, GRID) * torch.tensor([1.0, -0.5, 0.8, 0.3]).view(1, 4, 1, 1)
    latent = latent + 0.1 * torch.randn(1, 4, GRID, GRID, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unet(latent, torch.tensor([500]), context=torch.zeros(1, 4, 32))
    for handle in handles:
        handle.remove()
    heads = attention.heads
    q, k = captured["q"], captured["k"]
    d = q.shape[-1] // heads
    centre = (GRID // 2) * GRID + GRID // 2
    centred = q[0] - q[0].mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    maps = []
    for sigma, label in SIGMAS:
        blurred = blur_queries(q, GRID, GRID, sigma)
        logits = blurred[0, centre, :d] @ k[0, :, :d].T / math.sqrt(d)
        weights = logits.softmax(-1)
        entropy = float(-(weights * weights.clamp_min(1e-30).log()).sum())
        component = (blurred[0] - q[0].mean(0)) @ direction
        maps.append((label, component.view(GRID, GRID), entropy))
    return maps


def blob(ys, xs, centre, spread):
    return torch.exp(-((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) / spread)


def colour(value: float) -> tuple[int, int, int]:
    position = min(max(value, 0.0), 1.0) * (len(RAMP) - 1)
    low = min(int(position), len(RAMP) - 2)
    t = position - low
    return tuple(round(a + (b - a) * t) for a, b in zip(RAMP[low], RAMP[low + 1], strict=True))


def draw(path: Path = OUT) -> Path:
    maps = query_maps()
    low, high = float(maps[0][1].min()), float(maps[0][1].max())
    side = GRID * CELL
    gap, margin, header, footer = 16, 16, 44, 44
    image = Image.new("RGB", (margin * 2 + len(maps) * side + (len(maps) - 1) * gap, header + side + footer),
                      "white")  # fmt: skip
    canvas = ImageDraw.Draw(image)
    canvas.text((margin, 8), "What SEG blurs: the self-attention queries over the image grid (first "
                "principal component, one colour scale), SD1.5-architecture UNet, input block 1",
                fill="black")  # fmt: skip
    canvas.text((margin, 24), "Random test weights, not a trained model. H: entropy of the centre query's "
                "attention (max ln 1024 = 6.93 nats: uniform)", fill=(90, 90, 90))  # fmt: skip
    for n, (label, weights, entropy) in enumerate(maps):
        left = margin + n * (side + gap)
        tile = Image.new("RGB", (GRID, GRID))
        tile.putdata([colour((float(v) - low) / (high - low)) for v in weights.flatten()])
        image.paste(tile.resize((side, side), Image.NEAREST), (left, header))
        canvas.text((left, header + side + 6), label, fill="black")
        canvas.text((left, header + side + 22), f"H = {entropy:.2f} nats", fill=(90, 90, 90))
    image.save(path)
    return path


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
