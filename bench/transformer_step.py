"""SEG step time on diffusion transformers next to the same step without SEG, through the script's
real Forge code path.

Drives ``scripts/sd_webui_seg.py`` with the Forge stand-in (``tests/standin_forge.py``: Forge's
UnetPatcher, batch evaluator and post-CFG order) on the test transformers laid out as Forge's
(``tests/forge_nn``) or Forge Neo's (``tests/neo_nn``: Qwen-Image, Lumina-2 / Z-Image, Wan, …),
built at the real model's block count and a narrower width (``SHAPES`` here, each Neo test
module's ``BENCH_SHAPE``) so a CPU step takes seconds, random weights. Prints per configuration, in one
run: the step time without SEG, the ratio of a SEG step to it on each path (shared prefix: the
smoothed rows in the webui's call with the blocks before the first smoothed one run once; one
call: the same rows computed in full; separate: an extra evaluation), the exact floor and each
path's distance to it, and the peak memory of each, at CFG 1 (no negative pass, Flux-dev's usual
setting) and at CFG > 1.

The floor: with R conditioning chunks in the webui's call (1 at CFG 1, 2 above) and one smoothed
chunk added, exact SEG needs (R + f) / R of a CFG-only step, f being the share of one forward's
FLOPs from the first smoothed block on (everything but the shared blocks; counted here with
``torch.utils.flop_counter`` on the step itself, attention included).

    python bench/transformer_step.py                          # Flux-like, 512x512, CFG 1 and 3.5
    python bench/transformer_step.py --family sd3 --layers "joint 7-9" --json out.json
    python bench/transformer_step.py --family qwen          # a Forge Neo family (tests/neo_nn/qwen.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import standin_forge as sf  # noqa: E402
import standin_forge_transformers as st  # noqa: E402
import standin_neo_transformers as neo  # noqa: E402
import standin_webui as sw  # noqa: E402
from seg_step import PATHS, _Patcher, _peak, _reset_peak  # noqa: E402

from lib_seg import SEGParams, parse_layers, transformers  # noqa: E402

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
        self.controller = module.controller
        self.script = module.SmoothedEnergyGuidanceScript()
        self.script.ui(False)

    def inputs(self, batch, size):
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
        return x, torch.full((batch,), 3.0), cond, neg

    def prefix_share(self, layers, batch, size, cfg):
        """f: the share of a forward's FLOPs outside the blocks before the first smoothed one,
        counted on a CFG-only step (attention included)."""
        family = transformers.family_of(self.model)
        chosen, _ = transformers.resolve_blocks(self.model, family, parse_layers(layers))
        first = chosen[0][1]
        shared = []
        for blocks in transformers.block_lists(self.model, family).values():
            for block in blocks:
                if block is first:
                    break
                shared.append(block)
            else:
                continue
            break
        x, sigma, cond, neg = self.inputs(batch, size)
        counted = {"shared": 0}
        sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa) as mode:
            starts = {}

            def before(module, args):
                starts[id(module)] = mode.get_total_flops()

            def after(module, args, output):
                counted["shared"] += mode.get_total_flops() - starts[id(module)]

            handles = [h for b in shared for h in (b.register_forward_pre_hook(before),
                                                     b.register_forward_hook(after))]  # fmt: skip
            try:
                patcher = self.webui.shared.sd_model.forge_objects.unet
                sf.sampling_function_inner(patcher.model, x, sigma, neg, cond, cfg, patcher.model_options)
            finally:
                for handle in handles:
                    handle.remove()
            total = mode.get_total_flops()
        return 1 - counted["shared"] / total, len(shared)

    def step(self, args, batch, size, cfg, repeats, path="shared-prefix"):
        """Median time of one Forge sampling step (after one warm-up), its peak memory and the
        paths SEG took."""
        opts = self.webui.shared.opts
        opts.seg_one_call, opts.seg_share_prefix = PATHS[path]
        x, sigma, cond, neg = self.inputs(batch, size)
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
        guidance = self.controller.guidance
        paths = dict(guidance.paths) if guidance is not None else {}
        self.script.postprocess(p, None, *args)
        return statistics.median(times), peak, paths


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
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the paths (min)")
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
    results = []
    for size_text in options.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        for batch in options.batches:
            for cfg in options.cfgs:
                share, shared_blocks = bench.prefix_share(options.layers, batch, size, cfg)
                chunks = 1 if cfg == 1 else 2  # the webui's rows per image: prompt (and negative)
                floor = (chunks + share) / chunks
                print(f"\n{size_text} batch {batch} CFG {cfg:g}: f = {share:.3f} ({shared_blocks} blocks "
                      f"before the first smoothed one), floor {floor:.3f}x")  # fmt: skip
                times, peaks, seen = {}, {}, {}
                # interleaved, so drift on a shared machine hits every path alike
                for _ in range(options.rounds):
                    for path in ("cfg", *PATHS):
                        args = [False] if path == "cfg" else seg
                        t, m, ran = bench.step(args, batch, size, cfg, options.repeats,
                                               path if path != "cfg" else "shared-prefix")  # fmt: skip
                        times.setdefault(path, []).append(t)
                        peaks[path] = max(peaks.get(path, 0), m)
                        seen[path] = ran
                times = {path: min(values) for path, values in times.items()}
                row = dict(size=size_text, batch=batch, cfg=cfg, share=share, floor=floor,
                           shared_blocks=shared_blocks, times=times, peaks=peaks, paths=seen)  # fmt: skip
                print(
                    f"  {'CFG-only':<14} {times['cfg']:8.2f} s  {'':>8}  peak {peaks['cfg'] / 2**20:7.0f} MiB"
                )
                for path in PATHS:
                    ratio = times[path] / times["cfg"]
                    row.setdefault("ratios", {})[path] = ratio
                    extra = (peaks[path] - peaks["cfg"]) / 2**20
                    print(f"  {path:<14} {times[path]:8.2f} s  {ratio:6.3f}x  floor {ratio - floor:+.3f}  "
                          f"peak {peaks[path] / 2**20:7.0f} MiB ({extra:+.0f})  ran: {seen[path] or '-'}",
                          flush=True)  # fmt: skip
                results.append(row)
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2)


def _attention_flops(query, key, *args, out_shape=None, **kwargs):
    """torch's CPU flash attention (which the flop counter does not count): QKᵀ and the product
    with V, 2 FLOPs per multiply-add each."""
    return 4 * math.prod(query[:-2]) * query[-2] * key[-2] * query[-1]


if __name__ == "__main__":
    main()
