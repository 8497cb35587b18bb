"""SEG's ComfyUI node on one tiny random-weight model per transformer family, in process, run by
ComfyUI's own python (``test_comfyui_models.py`` starts it; it can also be run by hand):

    cd /path/to/ComfyUI && PYTHONPATH=. /path/to/venv/bin/python \
        /path/to/sd-webui-seg/tests/integration/comfyui_models_check.py [family ...]

Each model is built by ComfyUI's own model config (``comfy.supported_models.<Config>(unet_config)
.get_model({})``: the real ``BaseModel`` with its ``extra_conds`` and ``apply_model``), given
seeded random weights, wrapped in a CPU ``ModelPatcher`` and sampled by ``comfy.sample.sample``
(euler, 2 steps) with conditioning in ComfyUI's format. Per family and CFG (1 and 3): the model
without the node, the node at scale 0 (bitwise equal), the node on (different, reproducible,
"SEG: N guided evaluations (path: N)" logged, every blurred span where the family's tokens are).
Afterwards no hook is left on any module and ComfyUI's attention functions are its own again.
HunyuanVideo must pass through unguided (the node logs why).

The blurred spans are recorded by a spy on ``TransformerSmoothing._blur_span`` (it calls the
original); the expected span is written here from ComfyUI's token order (text first in the joint
attentions, the padded ``ceil(h/2) x ceil(w/2)`` grid), not from SEG's own layout code.

Prints one JSON object on stdout (everything else goes to stderr) and exits 0, also when a family
fails: ``{"families": {name: {"status": "ok"|"failed"|"skipped", "failures": [...], "log": [...],
"timings": {...}, ...}}, "seconds": ...}``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE = "SmoothedEnergyGuidance"
MODULE_NAME = "sd_webui_seg_models_check"
STEPS = 2
SEED = 7
TEXT_TOKENS = 5
CONTEXT_DIM = 8
GUIDED = re.compile(r"SEG: (\d+) guided evaluations \((.*)\)")


# -- the families: ComfyUI's config class, a tiny unet_config, the latent, the conditioning ----------
def family_specs() -> dict[str, dict]:
    """name -> spec. ``span``: the allowed (start, frames, height, width, tokens) of each blurred
    query span; ``scopes``: the attention calls SEG blurs per guided step (one per chosen
    self-attention); ``path``: the evaluation path the guided line must name; ``guide``: False for a
    model the node must pass through."""
    text = TEXT_TOKENS
    flux_like = {"in_channels": 16, "out_channels": 16, "context_in_dim": CONTEXT_DIM, "hidden_size": 64,
                 "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                 "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}  # fmt: skip
    joint_4x5 = {(text, 1, 4, 5, text + 20)}
    # fmt: off
    return {
        "SD3": {
            "config": "SD3", "latent": (1, 16, 8, 10), "pooled": 8, "blocks": "joint 1-2",
            "unet_config": _mmdit_config(depth=3), "span": joint_4x5, "path": "shared-prefix", "scopes": 2,
        },
        "SD3 odd latent (SD3.5 M x-block attn)": {
            "config": "SD3", "latent": (1, 16, 7, 9), "pooled": 8, "blocks": "joint 1-2",
            "unet_config": _mmdit_config(depth=3, x_block_self_attn_layers=[1, 2]),
            # 7x9 pads to 8x10: a 4x5 grid; the x-block attn2 is image-only
            "span": joint_4x5 | {(0, 1, 4, 5, 20)}, "path": "shared-prefix", "scopes": 4,
        },
        "Flux": {
            "config": "Flux", "latent": (1, 16, 8, 10), "pooled": 8, "guidance": 3.5,
            "blocks": "double 1, single 0-1",
            "unet_config": {"image_model": "flux", **flux_like, "vec_in_dim": 8, "guidance_embed": True},
            "span": joint_4x5, "path": "shared-prefix", "scopes": 3, "tiny_default": True,
        },
        "Chroma": {
            "config": "Chroma", "latent": (1, 16, 7, 9), "pooled": None, "blocks": "double 1, single 0-1",
            "unet_config": {"image_model": "chroma", **flux_like, "in_channels": 64, "out_channels": 64,
                            "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1},
            "span": joint_4x5, "path": "shared-prefix", "scopes": 3, "tiny_default": True,
        },
        "Qwen-Image": {
            "config": "QwenImage", "latent": (1, 16, 8, 10), "blocks": "middle",  # 4 blocks: block 1-3
            "unet_config": {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
                            "out_channels": 16, "num_layers": 4, "attention_head_dim": 32,
                            "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
                            "pooled_projection_dim": 8, "axes_dims_rope": (8, 12, 12)},
            "span": joint_4x5, "path": "shared-prefix", "scopes": 3,
            "names": ["transformer_blocks.1", "transformer_blocks.3"],
        },
        "Lumina 2": {
            "config": "Lumina2", "latent": (1, 16, 8, 10), "blocks": "middle", "caption_mask": True,
            "unet_config": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64,
                            "cap_feat_dim": CONTEXT_DIM, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 2,
                            "n_kv_heads": 1, "multiple_of": 16, "qk_norm": True, "axes_dims": [8, 12, 12],
                            "axes_lens": [300, 512, 512]},
            "span": joint_4x5, "path": "shared-prefix", "scopes": 3, "names": ["layers.1", "layers.3"],
        },
        "Wan 2.1 T2V": {
            "config": "WAN21_T2V", "latent": (1, 16, 3, 8, 8), "blocks": "middle",
            "unet_config": {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2),
                            "text_len": 16, "in_dim": 16, "dim": 64, "ffn_dim": 96, "freq_dim": 32,
                            "text_dim": CONTEXT_DIM, "out_dim": 16, "num_heads": 2, "num_layers": 4,
                            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
            "span": {(0, 3, 4, 4, 48)}, "path": "shared-prefix", "scopes": 3,
            "names": ["blocks.1", "blocks.3"],
        },
        "Cosmos-Predict2": {
            "config": "CosmosT2IPredict2", "latent": (1, 16, 1, 8, 10), "blocks": "middle",
            "unet_config": {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240,
                            "max_frames": 128, "in_channels": 16, "out_channels": 16, "patch_spatial": 2,
                            "patch_temporal": 1, "concat_padding_mask": True, "model_channels": 64,
                            "num_blocks": 4, "num_heads": 2, "crossattn_emb_channels": CONTEXT_DIM,
                            "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "use_adaln_lora": True,
                            "adaln_lora_dim": 16, "rope_h_extrapolation_ratio": 4.0,
                            "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0,
                            "rope_enable_fps_modulation": False},
            "span": {(0, 1, 4, 5, 20)}, "path": "shared-prefix", "scopes": 3,
            "names": ["blocks.1", "blocks.3"],
        },
        "UNet (SD1.5-like)": {
            "config": "SD15", "latent": (1, 4, 16, 16), "blocks": "middle",
            "unet_config": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                            "num_res_blocks": 1, "channel_mult": [1, 2], "use_spatial_transformer": True,
                            "transformer_depth": [1, 1], "transformer_depth_middle": 1,
                            "transformer_depth_output": [1, 1, 1, 1], "context_dim": CONTEXT_DIM,
                            "legacy": False, "use_linear_in_transformer": False, "adm_in_channels": None,
                            "use_temporal_attention": False, "use_temporal_resblock": False},
            "span": None, "path": "shared-prefix", "names": ["middle_block.1.transformer_blocks.0.attn1"],
        },
        "HunyuanVideo (must pass through)": {
            "config": "HunyuanVideo", "latent": (1, 16, 3, 8, 8), "pooled": 8, "guidance": 6.0,
            "blocks": "double 0-1", "guide": False,
            "unet_config": {"image_model": "hunyuan_video", **flux_like, "vec_in_dim": 8, "theta": 256,
                            "patch_size": [1, 2, 2], "guidance_embed": True, "byt5": False,
                            "meanflow": False},
        },
    }
    # fmt: on


def _mmdit_config(depth: int, x_block_self_attn_layers=()) -> dict:
    hidden = 64 * depth  # ComfyUI's MMDiT: 64 channels and one head per depth
    embedder = {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": hidden}}
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
            "adm_in_channels": 8, "num_patches": 32 * 32, "pos_embed_max_size": 32, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": list(x_block_self_attn_layers),
            "context_embedder_config": embedder}  # fmt: skip


# -- ComfyUI and the node ----------------------------------------------------------------------------
class Records(logging.Handler):
    """The node's log records ("sd_webui_seg"), as ``LEVEL: message``."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")

    def since(self, mark: int) -> list[str]:
        return self.lines[mark:]


def import_comfy():
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # run from ComfyUI's folder
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return comfy


def load_node_package():
    """This repository as ComfyUI loads a custom-node folder."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


class SpanSpy:
    """Records each span SEG blurs: (start, frames, height, width, tokens); calls the original."""

    def __init__(self, smoothing_class):
        self.cls = smoothing_class
        self.original = smoothing_class._blur_span
        self.spans: list[tuple[int, int, int, int, int]] = []
        spy = self

        def _blur_span(self, q, start, image, tokens):
            layout = self.layout
            spy.spans.append((int(start), layout.frames, layout.height, layout.width, int(tokens)))
            return spy.original(self, q, start, image, tokens)

        smoothing_class._blur_span = _blur_span

    def close(self):
        self.cls._blur_span = self.original


class FirstStep:
    """Keeps the first step's cond/uncond predictions of each run through a post-CFG function (SEG's
    own runs after it): SEG's smoothed rows must leave ComfyUI's rows alone. The function is a
    plain closure: ComfyUI deep-copies model options, and a deep copy keeps functions as they are."""

    def __init__(self):
        self.seen: list | None = None

    def function(self):
        def keep_first_step(args):
            if self.seen is None:
                uncond = args.get("uncond_denoised")
                self.seen = [args["cond_denoised"].clone(), None if uncond is None else uncond.clone()]
            return args["denoised"]

        return keep_first_step


def hook_count(torch, model) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks")  # fmt: skip
    total = sum(len(getattr(module, name, None) or {}) for module in model.modules() for name in names)
    glob = torch.nn.modules.module
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):  # fmt: skip
        total += len(getattr(glob, name, None) or {})
    return total


def attention_functions(comfy) -> dict[str, int]:
    import comfy.ldm.modules.attention as attention

    return {name: id(value) for name, value in vars(attention).items() if callable(value)}


# -- one family -------------------------------------------------------------------------------------
def reinit(torch, model, seed: int) -> None:
    """Seeded small random weights (ComfyUI builds them uninitialised): N(0, 0.5/sqrt(fan_in)) for
    matrices, 1 for norm scales, N(0, 0.02) for other vectors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                fan_in = max(parameter[0].numel(), 1)
                value = torch.randn(parameter.shape, generator=generator) * (0.5 / math.sqrt(fan_in))
            elif re.search(r"norm|\.scale$|(^|\.)ln", name) and name.endswith(("weight", "scale")):
                value = torch.ones(parameter.shape)
            else:
                value = torch.randn(parameter.shape, generator=generator) * 0.02
            parameter.copy_(value.to(parameter.dtype))
        for _, buffer in model.named_buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                buffer.copy_(torch.nan_to_num(buffer, nan=0.0, posinf=0.0, neginf=0.0))


def build_patcher(comfy, torch, spec: dict, seed: int):
    config_class = getattr(comfy.supported_models, spec["config"])
    model_config = config_class(dict(spec["unet_config"]))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    reinit(torch, model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(torch, spec: dict, seed: int) -> tuple[list, list]:
    """``(positive, negative)`` as CLIPTextEncode (+ FluxGuidance) would hand them to a KSampler."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        tensor = torch.randn(1, TEXT_TOKENS, CONTEXT_DIM, generator=generator)
        extra = {}
        if "pooled" in spec:
            pooled = spec["pooled"]
            extra["pooled_output"] = None if pooled is None else torch.randn(1, pooled, generator=generator)
        if "guidance" in spec:
            extra["guidance"] = spec["guidance"]
        if spec.get("caption_mask"):  # Lumina's Gemma encoder: the caption's attention mask
            extra["attention_mask"] = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
        out.append([[tensor, extra]])
    return out[0], out[1]


def sample(comfy, torch, patcher, spec: dict, cfg: float, positive, negative):
    latent = torch.zeros(spec["latent"])
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)  # as ComfyUI's KSampler node
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, STEPS, cfg, "euler", "simple", positive, negative, latent,
                                   denoise=1.0, disable_pbar=True, seed=SEED)  # fmt: skip


def check_family(comfy, torch, node, smoothing_class, records: Records, name: str, spec: dict) -> dict:
    result: dict = {"status": "ok", "failures": [], "log": [], "timings": {}, "guided": {}, "spans": {}}
    failures = result["failures"]
    started = time.perf_counter()
    if getattr(comfy.supported_models, spec["config"], None) is None:
        return {**result, "status": "skipped",
                "reason": f"this ComfyUI has no comfy.supported_models.{spec['config']}"}  # fmt: skip
    patcher = build_patcher(comfy, torch, spec, seed=11)
    first_step = FirstStep()
    patcher.set_model_sampler_post_cfg_function(first_step.function())  # before the node clones the patcher
    result["model"] = f"{type(patcher.model).__name__} / {type(patcher.model.diffusion_model).__name__}"
    result["timings"]["build"] = round(time.perf_counter() - started, 3)
    positive, negative = conditioning(torch, spec, seed=13)
    hooks_before = hook_count(torch, patcher.model)
    functions_before = attention_functions(comfy)
    seg = {"scale": 3.0, "sigma": -1.0, "branch": "uncond", "blocks": spec["blocks"], "start_percent": 0.0,
           "end_percent": 1.0}  # fmt: skip
    guide = spec.get("guide", True)

    def patch(**values):
        mark = len(records.lines)
        patched = node().patch(patcher, **{**seg, **values})[0]
        return patched, records.since(mark)

    def run(model, cfg, label):
        mark = len(records.lines)
        spy = SpanSpy(smoothing_class)
        clock = time.perf_counter()
        first_step.seen = None
        try:
            samples = sample(comfy, torch, model, spec, cfg, positive, negative)
        finally:
            spy.close()
        result["timings"][label] = round(time.perf_counter() - clock, 3)
        lines = records.since(mark)
        result["log"].extend(f"[{label}] {line}" for line in lines)
        return samples, lines, spy.spans, first_step.seen

    if spec.get("tiny_default"):  # the family default (double/joint 7-9) is beyond a 2-block model
        default, lines = patch(blocks="middle")
        result["middle_on_tiny_model"] = {"passes_through": default is patcher, "log": lines}

    zero, lines = patch(scale=0.0)
    if zero is not patcher:
        failures.append("scale 0: the node returned a clone, not the model it received")
    on_model, lines = patch()
    result["log"].extend(f"[patch] {line}" for line in lines)
    if not guide:
        if on_model is not patcher:
            failures.append("the node returned a patched clone for a model SEG must not guide")
        if not any(line.startswith("WARNING") and "without SEG" in line for line in lines):
            failures.append(f"no log message says why the model passes through: {lines}")
    elif on_model is patcher:
        failures.append(f"the node did not patch the model: {lines}")
    else:
        described = next((line for line in lines if "SEG: scale 3" in line), "")
        for block_name in spec.get("names", []):
            if block_name not in described:
                failures.append(f"the node's block line does not name {block_name}: {described!r}")

    for cfg in (1.0, 3.0):
        tag = f"cfg{cfg:g}"
        off, _, _, off_rows = run(patcher, cfg, f"{tag} off")
        scale_zero, _, _, _ = run(zero, cfg, f"{tag} scale 0")
        if not torch.equal(off, scale_zero):
            failures.append(f"{tag}: scale 0 differs from the model without the node")
        if not torch.isfinite(off).all():
            failures.append(f"{tag}: the model's own output is not finite (test model broken)")
        on, lines, spans, on_rows = run(on_model, cfg, f"{tag} on")
        again, lines_again, _, _ = run(on_model, cfg, f"{tag} on again")
        guided = [GUIDED.search(line) for line in lines]
        guided = [match for match in guided if match]
        problems = [line for line in lines if line.startswith(("WARNING", "ERROR"))]
        if not guide:
            if not torch.equal(on, off):
                failures.append(f"{tag}: the passed-through model's output differs from the model's own")
            if guided or spans:
                failures.append(f"{tag}: SEG guided a model it must pass through: {lines}")
            continue
        if torch.equal(on, off):
            failures.append(f"{tag}: SEG on gives the same output as without the node")
        if not torch.equal(on, again):
            difference = (on - again).abs().max().item()
            failures.append(f"{tag}: SEG on is not reproducible (max diff {difference:.3g})")
        if not torch.isfinite(on).all():
            failures.append(f"{tag}: SEG on gives non-finite values")
        if problems:
            failures.append(f"{tag}: SEG warned while sampling: {problems}")
        if len(guided) != 1:
            failures.append(f"{tag}: expected one guided-evaluations line, got {lines}")
        else:
            count, paths = int(guided[0].group(1)), guided[0].group(2)
            result["guided"][tag] = guided[0].group(0)
            if count != STEPS:
                failures.append(f"{tag}: {count} guided evaluations for {STEPS} steps")
            if paths != f"{spec['path']}: {STEPS}":
                failures.append(f"{tag}: evaluation path {paths!r}, expected {spec['path']!r}")
        for which, mine, own in zip(("cond", "uncond"), on_rows, off_rows, strict=True):
            if (mine is None) != (own is None):
                failures.append(f"{tag}: the {which} prediction is there in one run only")
            elif mine is not None:
                difference = (mine - own).abs().max().item()
                result.setdefault("regular_rows_max_diff", {})[f"{tag} {which}"] = difference
                if difference > 1e-4 * max(1.0, own.abs().max().item()):
                    failures.append(f"{tag}: SEG changed ComfyUI's own {which} prediction at the first step "
                                    f"(max diff {difference:.3g})")  # fmt: skip
        if lines_again != lines:
            failures.append(f"{tag}: the second run logs differently: {lines_again}")
        if spec.get("span") is not None:
            result["spans"][tag] = {"calls": len(spans), "distinct": sorted(set(spans))}
            if len(spans) != STEPS * spec["scopes"]:
                failures.append(f"{tag}: {len(spans)} blurred attention calls, expected {spec['scopes']} per "
                                f"step ({STEPS} steps)")  # fmt: skip
            wrong = sorted(set(spans) - spec["span"])
            if wrong:
                failures.append(f"{tag}: blurred spans (start, frames, h, w, tokens) {wrong}; expected "
                                f"one of {sorted(spec['span'])}")  # fmt: skip

    after = run(patcher, 3.0, "cfg3 off after")[0]
    reference = run(patcher, 3.0, "cfg3 off reference")[0]
    if not torch.equal(after, reference):
        failures.append("the model's own output changed after the SEG runs")
    hooks_after = hook_count(torch, patcher.model)
    if hooks_after != hooks_before:
        failures.append(f"hooks on the model's modules: {hooks_before} before, {hooks_after} after")
    if attention_functions(comfy) != functions_before:
        failures.append("comfy.ldm.modules.attention's functions were replaced and not put back")
    if "sd_webui_seg" in str(getattr(patcher, "wrappers", {})):
        failures.append("the model the node received carries SEG's wrapper")
    result["hooks"] = {"before": hooks_before, "after": hooks_after}
    comfy.model_management.unload_all_models()
    result["timings"]["total"] = round(time.perf_counter() - started, 3)
    if failures:
        result["status"] = "failed"
    return result


def main(argv: list[str]) -> int:
    stdout = sys.stdout
    sys.stdout = sys.stderr  # ComfyUI's prints must not mix with the JSON
    started = time.perf_counter()
    report: dict = {"families": {}}
    try:
        comfy = import_comfy()
        import torch

        package = load_node_package()
        node = package.NODE_CLASS_MAPPINGS[NODE]
        smoothing_class = sys.modules[f"{MODULE_NAME}.lib_seg.transformers.smoothing"].TransformerSmoothing
        records = Records()
        seg_log = logging.getLogger("sd_webui_seg")
        seg_log.addHandler(records)
        seg_log.setLevel(logging.INFO)
        report["torch"] = torch.__version__
        report["comfyui"] = str(Path(comfy.model_management.__file__).resolve().parents[1])
        specs = family_specs()
        chosen = [name for name in specs if not argv or any(word.lower() in name.lower() for word in argv)]
        for name in chosen:
            try:
                report["families"][name] = check_family(comfy, torch, node, smoothing_class, records, name,
                                                        specs[name])  # fmt: skip
            except Exception:
                report["families"][name] = {"status": "failed", "failures": ["exception"],
                                            "traceback": traceback.format_exc()}  # fmt: skip
            print(f"{name}: {report['families'][name]['status']}", file=sys.stderr, flush=True)
    except Exception:
        report["error"] = traceback.format_exc()
    report["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(report, default=str), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
