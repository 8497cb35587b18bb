"""SEG step time on diffusion transformers next to the same step without SEG, through the script's
real Forge code path.

Drives ``scripts/sd_webui_seg.py`` with the Forge stand-in (``tests/standin_forge.py``: Forge's
UnetPatcher, batch evaluator and post-CFG order) on the test transformers laid out as Forge's
(``tests/forge_nn``) or Forge Neo's (``tests/neo_nn``: Qwen-Image, Lumina-2 / Z-Image, Wan, …),
built at the real model's block count and a narrower width (``SHAPES`` here, each Neo test
module's ``BENCH_SHAPE``) so a CPU step takes seconds, random weights. Prints per configuration, in one
run: the step time without SEG, with SEG, their ratio, and the peak memory of each, at CFG 1 (no
negative pass, Flux-dev's usual setting) and at CFG > 1.

    python bench/transformer_step.py                          # Flux-like, 512x512, CFG 1 and 3.5
    python bench/transformer_step.py --family sd3 --layers "joint 7-9" --json out.json
    python bench/transformer_step.py --family qwen          # a Forge Neo family (tests/neo_nn/qwen.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import standin_forge as sf  # noqa: E402
import standin_forge_transformers as st  # noqa: E402
import standin_neo_transformers as neo  # noqa: E402
import standin_webui as sw  # noqa: E402
from seg_step import _Patcher, _peak, _reset_peak  # noqa: E402

from lib_seg import SEGParams  # noqa: E402

# the real block counts (Flux and Chroma: 19 double + 38 single; SD3.5 Medium: 24 joint)
FLUX_SHAPE = dict(depth=19, depth_single_blocks=38, hidden_size=256, num_heads=4, axes_dim=(16, 24, 24),
                  context_in_dim=64)  # fmt: skip
SHAPES = {
    "flux": FLUX_SHAPE,
    "chroma": FLUX_SHAPE,
    "sd3": dict(
        depth=24,
        hidden_size=256,
        num_heads=4,
        context_dim=64,
        pos_embed_max_size=96,
        x_block_self_attn_layers=tuple(range(13)),
    ),
}


class Bench:
    def __init__(self, family, tokens):
        self.family, self.tokens = family, tokens
        patcher = _Patcher()
        self.webui = sw.install(patcher)
        if family in SHAPES:
            modules = st.install(patcher)
            st.CONTEXT_DIM = 64
            self.model = st.build(modules, family, **SHAPES[family])
            self.neo = None
        else:
            self.neo = neo.install(patcher, names=(family,))[family]
            self.model = self.neo.build(**self.neo.BENCH_SHAPE)
        self.webui.shared.sd_model = sf.forge_model(self.model)
        self.webui.shared.sd_model.is_sd1 = False
        module = sw.load_script(self.webui)
        self.script = module.SmoothedEnergyGuidanceScript()
        self.script.ui(False)

    def step(self, args, batch, size, cfg, repeats):
        """Median time of one Forge sampling step (after one warm-up) and its peak memory."""
        generator = torch.Generator().manual_seed(0)
        if self.neo is None:
            cond = st.conds(batch, self.family, tokens=self.tokens)
            neg = st.conds(batch, self.family, tokens=self.tokens, seed=9)
            x = torch.randn(batch, 4, size[0] // 8, size[1] // 8, generator=generator)
        else:  # the family's own VAE downscale (8 unless its test module says otherwise)
            scale = getattr(self.neo, "VAE_SCALE", 8)
            cond = self.neo.conds(batch, tokens=self.tokens)
            neg = self.neo.conds(batch, tokens=self.tokens, seed=9)
            x = self.neo.latent(batch, size[0] // scale, size[1] // scale, generator)
        sigma = torch.full((batch,), 3.0)
        p = sw.Processing()
        self.script.process(p, *args)
        sf.reset_forge_objects(self.webui.shared.sd_model)
        self.script.process_before_every_sampling(p, *args)
        cb = self.webui.callbacks
        cb.cfg_denoiser_callback(
            cb.CFGDenoiserParams(x, None, sigma, 0, 10, cond, neg, sw.types.SimpleNamespace(p=p))
        )
        patcher = self.webui.shared.sd_model.forge_objects.unet
        times = []
        with torch.no_grad():
            sf.sampling_function_inner(patcher.model, x, sigma, neg, cond, cfg, patcher.model_options)
            base = _reset_peak(torch.device("cpu"))
            for _ in range(repeats):
                start = time.perf_counter()
                sf.sampling_function_inner(patcher.model, x, sigma, neg, cond, cfg, patcher.model_options)
                times.append(time.perf_counter() - start)
        peak = _peak(torch.device("cpu"), base)
        self.script.postprocess(p, None, *args)
        return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(SHAPES) + list(neo.NAMES), default="flux")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--sizes", nargs="+", default=["512x512"], help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 3.5])
    parser.add_argument("--layers", default="middle", help="SEG blocks (middle = the family default)")
    parser.add_argument("--sigma", default="inf")
    parser.add_argument("--tokens", type=int, default=256, help="text tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--json", help="write the results here")
    options = parser.parse_args()
    torch.manual_seed(0)
    bench = Bench(options.family, options.tokens)
    seg = SEGParams.from_values({"enabled": True, "sigma": options.sigma, "layers": options.layers}).to_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {options.family}-like "
        f"({sum(p.numel() for p in bench.model.parameters()) / 1e6:.1f}M parameters), layers "
        f"'{options.layers}', sigma {options.sigma}, {options.tokens} text tokens"
    )
    print(
        f"{'size':>9} {'batch':>5} {'cfg':>4} {'without SEG':>12} {'with SEG':>10} {'ratio':>7} "
        f"{'peak without':>13} {'peak with':>13}"
    )
    results = []
    for size_text in options.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        for batch in options.batches:
            for cfg in options.cfgs:
                # interleaved, so drift on a shared machine hits both alike
                plain, plain_peak = bench.step([False], batch, size, cfg, options.repeats)
                guided, guided_peak = bench.step(seg, batch, size, cfg, options.repeats)
                plain2, _ = bench.step([False], batch, size, cfg, options.repeats)
                plain = min(plain, plain2)
                row = dict(
                    size=size_text,
                    batch=batch,
                    cfg=cfg,
                    without=plain,
                    seg=guided,
                    ratio=guided / plain,
                    peak_without=plain_peak,
                    peak_seg=guided_peak,
                )
                results.append(row)
                print(
                    f"{size_text:>9} {batch:>5} {cfg:>4g} {plain:>11.2f}s {guided:>9.2f}s "
                    f"{guided / plain:>6.3f}x "
                    f"{plain_peak / 2**20:>9.0f} MiB {guided_peak / 2**20:>9.0f} MiB",
                    flush=True,
                )
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
