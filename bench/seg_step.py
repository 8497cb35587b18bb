"""SEG step time next to CFG-only, through the script's real A1111 and Forge-family code paths.

Drives ``scripts/sd_webui_seg.py`` on the real SD1.5 UNet architecture with random weights, in the
A1111 v1.10.1 CFG-denoiser layout of the test stand-in (``tests/standin_webui.py``), in Forge's
(``tests/standin_forge.py``: Forge's UnetPatcher, its chunked batch evaluator with
``model_function_wrapper`` and memory estimate, and its UNet layout around the same layers), and in
reForge's and Forge Classic's (``tests/standin_ldm_patched.py``: ldm_patched's evaluators and its
UNet layout, whose blocks' layers run one by one), and prints, per configuration, in one run and
per webui: the CFG-only step time, the SEG step time and their ratio for each evaluation path
(shared prefix, one call without prefix sharing, separate extra evaluation), an off-schedule step,
the peak memory of each, the query blur's share of a SEG step, and each Forge-family webui's
shared-prefix ratio minus A1111's.

    python bench/seg_step.py                       # CPU: all four webuis, 512x512, batch 1 and 4
    python bench/seg_step.py --device cuda --half --batches 1 2 4 8 --sizes 512x512 768x512 \
        --sigmas 10 inf --layers middle "input 7-8" --json out.json --plot docs/performance.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import standin_forge as sf  # noqa: E402
import standin_ldm_patched as sl  # noqa: E402
import standin_webui as sw  # noqa: E402

from lib_seg import SEGParams, blur_queries, parse_layers, resolve_attn1, token_grid  # noqa: E402

PATHS = {  # name: (one_call, share_prefix)
    "shared-prefix": (True, True),
    "one-call": (True, False),
    "separate": (False, False),
}

STEP_KINDS = ("cfg", "off-schedule", *PATHS)
WEBUIS = ("a1111", "forge", "reforge", "classic")


class _Patcher:
    """The monkeypatch methods the stand-in installers use, without pytest."""

    def setitem(self, mapping, key, value):
        mapping[key] = value

    def setattr(self, target, name, value, raising=True):
        setattr(target, name, value)

    def syspath_prepend(self, path):
        sys.path.insert(0, path)


def sd15_unet(device, dtype):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
        num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
        legacy=False, use_checkpoint=False,
    )  # fmt: skip
    return unet.to(device=device, dtype=dtype).eval()


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _release_free_memory()
    try:  # reset the process's peak RSS to its current RSS (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss("VmRSS")


def _release_free_memory():
    """Hand memory freed by earlier steps back to the OS (glibc), so that each measurement's peak
    RSS counts what its own step allocates, not what an earlier step left in the heap."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak(device, base):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _rss("VmHWM") - base


def _rss(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Bench:
    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.webui = sw.install(_Patcher())
        self.unet = sd15_unet(device, dtype)
        self.webui.shared.sd_model = types.SimpleNamespace(
            model=types.SimpleNamespace(diffusion_model=self.unet, conditioning_key="crossattn"),
            cond_stage_key="txt", is_sd3=False,
            cond_stage_model_empty_prompt=torch.zeros(1, 77, 768, device=device, dtype=dtype),
        )  # fmt: skip
        self.a1111_model = self.webui.shared.sd_model
        sf.install(_Patcher())
        self.forge_model = sf.forge_model(self.unet)  # Forge's UNet layout around the same layers
        sl.install(_Patcher())
        self.ldm_patched_model = sl.forge_model(self.unet)  # ldm_patched's layout, the same layers
        self.samplers = sys.modules[sl.EVALUATOR_MODULE]
        self.calc_cond_batch = self.samplers.calc_cond_batch
        module = sw.load_script(self.webui)
        self.controller = module.controller
        self.script = module.SmoothedEnergyGuidanceScript()
        self.script.ui(False)

    def autocast(self):
        # as the webui runs half-precision weights: under autocast (fp32 timestep embeddings)
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.dtype == torch.float16)

    def step(self, webui, args, batch, size, path=None, warmup=True):
        """Time one step of ``webui`` (``WEBUIS``) after one warm-up, and its peak memory."""
        if path is not None:  # the Settings options the script reads at every generation
            opts = self.webui.shared.opts
            opts.seg_one_call, opts.seg_share_prefix = PATHS[path]
        if webui != "a1111":
            return self.forge_step(webui, args, batch, size, warmup)
        self.webui.shared.sd_model = self.a1111_model
        height, width = size[0] // 8, size[1] // 8
        g = torch.Generator().manual_seed(0)
        kw = dict(device=self.device, dtype=self.dtype)
        cond = sw.Multicond(
            [[sw.Composable(torch.randn(77, 768, generator=g).to(**kw))] for _ in range(batch)]
        )
        neg = torch.randn(batch, 77, 768, generator=g).to(**kw)
        x = torch.randn(batch, 4, height, width, generator=g).to(**kw)
        sigma = torch.full((batch,), 7.0, **kw)
        image_cond = torch.zeros(batch, 5, 1, 1, **kw)
        p = sw.Processing()
        self.script.process(p, *args)
        self.script.process_before_every_sampling(p, *args)
        denoiser = sw.CFGDenoiser(
            types.SimpleNamespace(sampler_extra_args={"cond": cond, "uncond": neg}), self.webui, p
        )
        denoiser.total_steps = 10
        state = self.webui.shared.state
        state.sampling_step, state.sampling_steps = 0, 10
        with torch.no_grad(), self.autocast():
            if warmup:
                denoiser(x, sigma, neg, cond, 7.0, 0.0, image_cond)
            _synchronize(self.device)
            base = _reset_peak(self.device)
            start = time.perf_counter()
            denoiser(x, sigma, neg, cond, 7.0, 0.0, image_cond)
            _synchronize(self.device)
            elapsed = time.perf_counter() - start
        peak = _peak(self.device, base)
        guidance = self.controller.guidance
        paths = dict(guidance.paths) if guidance is not None else {}
        self.script.postprocess(p, None, *args)
        return elapsed, peak, paths

    def forge_step(self, webui, args, batch, size, warmup):
        """A Forge-family sampling function for one step: pre-CFG hooks (reForge: its batch
        function), the chunked evaluation of the prompt and the negative prompt, CFG, post-CFG
        hooks."""
        if webui == "forge":
            sd_model, sampling_function = self.forge_model, sf.sampling_function_inner
        else:  # Forge Classic has only the two-list evaluator
            sd_model, sampling_function = self.ldm_patched_model, sl.sampling_function
            if webui == "classic":
                vars(self.samplers).pop("calc_cond_batch", None)
            else:
                self.samplers.calc_cond_batch = self.calc_cond_batch
        self.webui.shared.sd_model = sd_model
        g = torch.Generator().manual_seed(0)
        kw = dict(device=self.device, dtype=self.dtype)
        cond = [{"cross_attn": torch.randn(batch, 77, 768, generator=g).to(**kw)}]
        neg = [{"cross_attn": torch.randn(batch, 77, 768, generator=g).to(**kw)}]
        x = torch.randn(batch, 4, size[0] // 8, size[1] // 8, generator=g).to(**kw)
        sigma = torch.full((batch,), 7.0, **kw)
        p = sw.Processing()
        self.script.process(p, *args)
        sf.reset_forge_objects(sd_model)
        self.script.process_before_every_sampling(p, *args)
        callbacks = self.webui.callbacks
        callbacks.cfg_denoiser_callback(
            callbacks.CFGDenoiserParams(x, None, sigma, 0, 10, cond, neg, types.SimpleNamespace(p=p))
        )
        patcher = sd_model.forge_objects.unet
        with torch.no_grad(), self.autocast():
            if warmup:
                sampling_function(patcher.model, x, sigma, neg, cond, 7.0, patcher.model_options)
            _synchronize(self.device)
            base = _reset_peak(self.device)
            start = time.perf_counter()
            sampling_function(patcher.model, x, sigma, neg, cond, 7.0, patcher.model_options)
            _synchronize(self.device)
            elapsed = time.perf_counter() - start
        peak = _peak(self.device, base)
        guidance = self.controller.guidance
        paths = dict(guidance.paths) if guidance is not None else {}
        self.script.postprocess(p, None, *args)
        return elapsed, peak, paths

    def blur_time(self, batch, size, sigma, layers):
        """Summed blur time of the selected layers' queries for the smoothed rows (``batch`` rows)."""
        captured = []
        modules = resolve_attn1(self.unet, parse_layers(layers))
        handles = [
            m.to_q.register_forward_hook(lambda mod, a, out: captured.append(out[:batch].clone()))
            for _, m in modules
        ]
        x = torch.randn(batch, 4, size[0] // 8, size[1] // 8, device=self.device, dtype=self.dtype)
        with torch.no_grad(), self.autocast():
            self.unet(x, torch.full((batch,), 500, device=self.device),
                      context=torch.randn(batch, 77, 768, device=self.device, dtype=self.dtype))  # fmt: skip
        for handle in handles:
            handle.remove()
        total = 0.0
        for q in captured:
            grid = token_grid(q.shape[1], size[0] // 8, size[1] // 8)
            blur_queries(q, *grid, sigma)
            _synchronize(self.device)
            start = time.perf_counter()
            for _ in range(5):
                blur_queries(q, *grid, sigma)
            _synchronize(self.device)
            total += (time.perf_counter() - start) / 5
        return total


def fmt_bytes(n):
    return f"{n / 2**20:8.0f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--half", action="store_true", help="float16 weights and activations")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sizes", nargs="+", default=["512x512"], help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--sigmas", nargs="+", default=["inf"])
    parser.add_argument("--layers", nargs="+", default=["middle"])
    parser.add_argument("--webuis", nargs="+", choices=WEBUIS, default=list(WEBUIS))
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per measurement (median)")
    parser.add_argument(
        "--warmup",
        choices=["each", "first"],
        default="each",
        help="an untimed step before every measurement, or only before a configuration's first",
    )
    parser.add_argument(
        "--attention",
        choices=["sdp", "ldm"],
        default="sdp",
        help="sdp: torch's scaled_dot_product_attention, as the webui's sdp optimisation "
        "swaps in; ldm: ldm's own einsum softmax",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG of SEG/CFG step-time ratio vs batch size here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if args.half else torch.float32
    if args.attention == "sdp":
        from attention_backends import sdp_forward
        from ldm.modules.attention import CrossAttention

        CrossAttention.forward = sdp_forward
    bench = Bench(device, dtype)
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"SD1.5 UNet architecture (random weights), {dtype}, {args.attention} attention, {name}, "
        f"torch {torch.__version__}"
    )
    rows = []
    for size_text in args.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        for layers in args.layers:
            for sigma_text in args.sigmas:
                sigma = math.inf if sigma_text == "inf" else float(sigma_text)
                for batch in args.batches:
                    seg_args = SEGParams(enabled=True, sigma=sigma, layers=layers).to_args()
                    off_args = SEGParams(enabled=True, sigma=sigma, layers=layers, start=0.5).to_args()
                    # A1111's keys as they were ("cfg", "shared-prefix", ...); Forge's prefixed
                    keys = [(webui, name) for webui in args.webuis for name in STEP_KINDS]
                    label = {key: key[1] if key[0] == "a1111" else " ".join(key) for key in keys}
                    measured = {label[key]: [] for key in keys}
                    memory, path_seen = {}, {}
                    for repeat in range(args.repeats):  # interleaved, so drift hits every path alike
                        for key in keys:
                            webui, name = key
                            warm = args.warmup == "each" or (repeat == 0 and name == "cfg")
                            if name == "cfg":
                                t, m, seen = bench.step(webui, [False], batch, size, warmup=warm)
                            elif name == "off-schedule":
                                t, m, seen = bench.step(webui, off_args, batch, size, "shared-prefix", warm)
                            else:
                                t, m, seen = bench.step(webui, seg_args, batch, size, name, warmup=warm)
                            measured[label[key]].append(t)
                            memory[label[key]] = max(memory.get(label[key], 0), m)
                            path_seen[label[key]] = seen
                    times = {key: statistics.median(v) for key, v in measured.items()}
                    blur = bench.blur_time(batch, size, sigma, layers)
                    row = {"size": size_text, "layers": layers, "sigma": sigma_text, "batch": batch,
                           "times": times, "samples": measured, "memory": memory, "paths": path_seen,
                           "blur": blur}  # fmt: skip
                    rows.append(row)
                    guided = label[(args.webuis[0], "shared-prefix")]
                    print(f"\n{size_text} layers={layers!r} sigma={sigma_text} batch={batch}"
                          f"  (blur of the smoothed rows: {blur * 1000:.2f} ms = "
                          f"{100 * blur / times[guided]:.2f}% of a SEG step)")  # fmt: skip
                    for (webui, _), key in label.items():
                        cfg = label[(webui, "cfg")]
                        extra = (memory[key] - memory[cfg]) / 2**20
                        ratio = times[key] / times[cfg]
                        print(f"  {key:<20} {times[key] * 1000:10.1f} ms  {ratio:5.3f}x CFG-only"
                              f"  peak {fmt_bytes(memory[key])} ({extra:+.0f} MiB)"
                              f"  ran: {path_seen[key] or '-'}")  # fmt: skip
                    if "a1111" in args.webuis:
                        base = times["shared-prefix"] / times["cfg"]
                        for webui in (w for w in args.webuis if w != "a1111"):
                            ratio = times[f"{webui} shared-prefix"] / times[f"{webui} cfg"]
                            row.setdefault("difference", {})[webui] = ratio - base
                            print(f"  {webui} shared prefix minus A1111's: {ratio - base:+.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "dtype": str(dtype), "attention": args.attention, "rows": rows}, f, indent=1
            )
    if args.plot:
        from plot import ratio_plot

        ratio_plot(rows, args.plot, f"SEG step / CFG-only step, SD1.5 ({name})")


if __name__ == "__main__":
    main()
