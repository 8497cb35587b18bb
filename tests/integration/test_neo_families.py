"""SEG on Forge Neo's newer transformer families in a real Neo, through the HTTP API. Opt-in per
family, beside the rest of the tier (random-weight checkpoints are fine):
    SEG_WEBUI_ANIMA=<checkpoint title or name the webui lists>     (Anima)
    SEG_WEBUI_LUMINA2=...   (Lumina 2 / Neta-Lumina)   SEG_WEBUI_WAN=...   (Wan 2.1 / 2.2 T2V)
    SEG_WEBUI_FLUX2=...     (Flux.2 Klein)             SEG_WEBUI_ZIMAGE=... (Z-Image)
    [SEG_WEBUI_<FAMILY>_MODULES=<comma-separated text encoder / VAE files, Neo's "VAE / Text Encoder">]
    [SEG_WEBUI_<FAMILY>_FULL_SIZE=0: a checkpoint of reduced depth; its default blocks are not compared
     with the full-size model's]
Each family's cases switch the webui to that checkpoint (and modules) and back. One step at 128×128
(Wan: one frame, plus one two-latent-frame video case): a full-size transformer on a CPU is slow."""

from __future__ import annotations

import base64
import os
import re

import pytest

from lib_seg import SEGParams

from .test_webui_api import pixels, txt2img

pytestmark = pytest.mark.webui

# env suffix: (SEG's family name, its default blocks on the full-size model, the module list they
# are in, as SEG's log line names them)
FAMILIES = {
    "ANIMA": ("Anima", "block 8-10", "blocks"),
    "LUMINA2": ("Lumina 2", "block 8-10", "layers"),
    "WAN": ("Wan", "block 9", "blocks"),
    "FLUX2": ("Flux.2", "double 2-4", "double_blocks"),
    "ZIMAGE": ("Z-Image", "block 9-11", "layers"),
}
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": 1, "width": 128, "height": 128, "seed": 1,
        "cfg_scale": 1, "distilled_cfg_scale": 3.5, "sampler_name": "Euler", "scheduler": "Simple",
        "batch_size": 1}  # fmt: skip
TRACEBACK = "Traceback (most recent call last)"


def generate(webui, args=None, **fields):
    return txt2img(webui, args, base=BASE, **fields)


def log_since(webui, start: int) -> str:
    return webui.log.read_text(errors="ignore")[start:] if webui.log is not None else ""


def log_size(webui) -> int:
    return len(webui.log.read_text(errors="ignore")) if webui.log is not None else 0


def module_names(blocks: str, module_list: str) -> list[str]:
    """``"block 8-10"``, ``"blocks"`` -> ``["blocks.8", "blocks.9", "blocks.10"]``."""
    numbers = blocks.split(" ", 1)[1]
    first, _, last = numbers.partition("-")
    return [f"{module_list}.{i}" for i in range(int(first), int(last or first) + 1)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def neo_family(request, webui):
    key = request.param
    checkpoint = os.environ.get(f"SEG_WEBUI_{key}")
    if not checkpoint:
        pytest.skip(f"{FAMILIES[key][0]} cases: set SEG_WEBUI_{key} to a checkpoint the webui lists")
    if not webui.neo:
        pytest.skip("these families are Forge Neo's")
    modules = [m for m in os.environ.get(f"SEG_WEBUI_{key}_MODULES", "").split(",") if m]
    status, before = webui.get("/sdapi/v1/options")
    assert status == 200
    switched = {"sd_model_checkpoint": checkpoint, "forge_additional_modules": modules}
    status, body = webui.post("/sdapi/v1/options", switched)
    assert status == 200, body
    webui.family_key, (webui.family_name, webui.family_default, webui.family_list) = key, FAMILIES[key]
    yield webui
    webui.post("/sdapi/v1/options", {key: before[key] for key in switched})


def test_off_is_bit_identical_and_on_guides_reproducibly(neo_family):
    plain = generate(neo_family)
    start = log_size(neo_family)
    off = generate(neo_family, [False])
    assert off["images"][0] == plain["images"][0]
    on = generate(neo_family, [True])
    again = generate(neo_family, [True])
    log = log_since(neo_family, start)
    assert "SEG scale: 3" in on["info"] and "SEG warning" not in on["info"], on["info"]
    assert TRACEBACK not in log and "SEG: this" not in log, log[-4000:]
    if neo_family.log is not None:  # the smoothed rows rode in Neo's call, the first blocks shared
        assert "guided evaluations (shared-prefix:" in log, log[-4000:]
    assert pixels(on["images"][0]) != pixels(plain["images"][0])
    assert base64.b64decode(again["images"][0]) == base64.b64decode(on["images"][0])
    if neo_family.log is not None:
        # the blocks SEG smoothed, as its log names them: the family's default at the model's depth
        named = re.findall(rf"SEG: \d+ {re.escape(neo_family.family_name)} blocks: (.*)", log)
        assert named, log[-4000:]
        blocks = [name.strip() for name in named[-1].split(",")]
        print(f"{neo_family.family_name}: default blocks {blocks}")
        if os.environ.get(f"SEG_WEBUI_{neo_family.family_key}_FULL_SIZE", "1") != "0":
            assert blocks == module_names(neo_family.family_default, neo_family.family_list)


def test_infotext_carries_the_seg_keys_and_round_trips(neo_family):
    side = neo_family.family_default.split(" ")[0]
    layers = f"{side} 1-2"
    on = generate(neo_family, [{"enabled": True, "scale": 2.5, "sigma": 4, "layers": layers}])
    image = "data:image/png;base64," + on["images"][0]
    status, parsed = neo_family.post("/sdapi/v1/png-info", {"image": image})
    assert status == 200
    params = parsed["parameters"]
    assert (params["SEG scale"], params["SEG sigma"], params["SEG layers"]) == ("2.5", "4", layers)
    assert "SEG warning" not in params
    again = generate(neo_family, SEGParams.from_infotext(params).to_args())
    assert base64.b64decode(again["images"][0]) == base64.b64decode(on["images"][0])


def test_a_block_the_model_lacks_is_named(neo_family):
    side = neo_family.family_default.split(" ")[0]
    body = generate(neo_family, [{"enabled": True, "layers": f"{side} 1, {side} 90"}])
    assert f"has no {side} 90" in body["info"], body["info"]
    plain = generate(neo_family)
    assert pixels(body["images"][0]) != pixels(plain["images"][0])  # block 1 is still smoothed


def test_wan_video_frames_each_on_their_grid(neo_family):
    if neo_family.family_key != "WAN":
        pytest.skip("Wan only: a video of two latent frames")
    # Neo takes Wan's frame count from batch_size: 5 frames are two latent frames; it saves every
    # video with the ffmpeg binary, so a webui without one fails the request itself
    start = log_size(neo_family)
    status, plain = neo_family.post("/sdapi/v1/txt2img", {**BASE, "batch_size": 5})
    if status != 200 and "No such file or directory: 'ffmpeg'" in log_since(neo_family, start):
        pytest.skip("Neo saves each Wan video with ffmpeg, which this webui's PATH lacks")
    assert status == 200, plain
    start = log_size(neo_family)
    on = generate(neo_family, [True], batch_size=5)
    log = log_since(neo_family, start)
    assert "SEG scale: 3" in on["info"] and "SEG warning" not in on["info"], on["info"]
    assert TRACEBACK not in log, log[-4000:]
    assert on["images"] and [pixels(i) for i in on["images"]] != [pixels(i) for i in plain["images"]]
