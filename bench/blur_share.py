"""How much the SEG query blur costs next to the UNet forward and the attention it precedes.

Real SD1.5 UNet architecture (random weights, float32, CPU unless --device), 64x64 latent, batch 1.
For σ ∈ {1, 10, ∞} and the layer sets ``middle`` and ``input`` (every input block), prints the
summed blur time of the selected attn1 layers as a fraction of one full UNet forward and of those
layers' attention calls. Run: ``python bench/blur_share.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_seg import blur_queries, parse_layers, resolve_attn1, token_grid


def sd15_unet() -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    return UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
        num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
        legacy=False,
    ).eval()  # fmt: skip


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)

    unet = sd15_unet().to(device)
    latent = (args.latent, args.latent)
    x = torch.randn(1, 4, *latent, device=device)
    t = torch.tensor([500], device=device)
    context = torch.randn(1, 77, 768, device=device)

    layer_sets = {"middle": "middle", "input (all input blocks)": "input"}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for _, spec in layer_sets.items():
        for name, module in resolve_attn1(unet, parse_layers(spec)):

            def keep(module, args, name=name):
                inputs[name] = args[0].detach()

            handles.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        unet_time = timed(lambda: unet(x, t, context=context), args.repeats, device)
    for handle in handles:
        handle.remove()

    print(f"device {device}, threads {torch.get_num_threads()}, latent {latent}, batch 1")
    print(f"UNet forward (SD1.5 architecture): {unet_time * 1000:.1f} ms")
    print(f"{'layers':<26} {'sigma':>6} {'blur ms':>9} {'% of UNet':>10} {'% of attn1':>11}")
    with torch.no_grad():
        for label, spec in layer_sets.items():
            modules = resolve_attn1(unet, parse_layers(spec))
            attention_time = sum(
                timed(lambda m=m, n=n: m(inputs[n]), args.repeats, device) for n, m in modules
            )
            for sigma in (1.0, 10.0, math.inf):
                blur_time = 0.0
                for name, module in modules:
                    q = module.to_q(inputs[name])
                    height, width = token_grid(q.shape[1], *latent)
                    blur_time += timed(
                        lambda q=q, h=height, w=width, s=sigma: blur_queries(q, h, w, s), args.repeats, device
                    )
                print(
                    f"{label:<26} {sigma:>6g} {blur_time * 1000:>9.3f} "
                    f"{100 * blur_time / unet_time:>9.3f}% {100 * blur_time / attention_time:>10.2f}%"
                )


if __name__ == "__main__":
    main()
