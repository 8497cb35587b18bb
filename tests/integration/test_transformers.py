"""SEG on diffusion transformers in a real Forge (``backend/``), through the HTTP API. Opt-in per
family, beside the rest of the tier:
    SEG_WEBUI_FLUX=<Flux-dev checkpoint title or name the webui lists>
    SEG_WEBUI_FLUX_SCHNELL=...   SEG_WEBUI_CHROMA=...   SEG_WEBUI_SD35=...
    [SEG_WEBUI_<FAMILY>_MODULES=<comma-separated paths for Forge's "VAE / Text Encoder" choice>]
Each family's cases switch the webui to that checkpoint (and modules) and back."""

from __future__ import annotations

import base64
import os

import pytest

from lib_seg import SEGParams

from .test_webui_api import pixels, txt2img

pytestmark = pytest.mark.webui
FAMILIES = ("FLUX", "FLUX_SCHNELL", "CHROMA", "SD35")
# Forge's defaults for these models: Euler with the Simple schedule; Flux-dev at CFG 1 with its
# distilled guidance (no negative pass: SEG's c + γ(c − c̃) form)
# a full-size Flux step takes minutes on a CPU: SEG_WEBUI_TRANSFORMER_STEPS=1 keeps the tier short
STEPS = int(os.environ.get("SEG_WEBUI_TRANSFORMER_STEPS", "2"))
BASE = {"prompt": "a cat", "negative_prompt": "", "steps": STEPS, "width": 128, "height": 128, "seed": 1,
        "cfg_scale": 1, "distilled_cfg_scale": 3.5, "sampler_name": "Euler", "scheduler": "Simple",
        "batch_size": 1}  # fmt: skip


def generate(webui, args=None, **fields):
    return txt2img(webui, args, base=BASE, **fields)


@pytest.fixture(scope="module", params=FAMILIES)
def transformer(request, webui):
    family = request.param
    checkpoint = os.environ.get(f"SEG_WEBUI_{family}")
    if not checkpoint:
        pytest.skip(f"{family} cases: set SEG_WEBUI_{family} to a checkpoint the webui lists")
    if webui.backend != "forge":
        pytest.skip("SEG on transformers is for Forge (backend/)")
    modules = [m for m in os.environ.get(f"SEG_WEBUI_{family}_MODULES", "").split(",") if m]
    status, before = webui.get("/sdapi/v1/options")
    assert status == 200
    switched = {"sd_model_checkpoint": checkpoint, "forge_additional_modules": modules}
    status, body = webui.post("/sdapi/v1/options", switched)
    assert status == 200, body
    webui.family = family
    yield webui
    webui.post("/sdapi/v1/options", {key: before[key] for key in switched})


def test_off_is_bit_identical_and_on_guides(transformer):
    plain = generate(transformer)
    assert generate(transformer, [False])["images"][0] == plain["images"][0]
    start = len(transformer.log.read_text(errors="ignore")) if transformer.log is not None else 0
    on = generate(transformer, [True])
    assert "SEG scale: 3" in on["info"] and "SEG warning" not in on["info"], on["info"]
    assert pixels(on["images"][0]) != pixels(plain["images"][0])
    if transformer.log is not None:  # the smoothed rows rode in Forge's call, the first blocks shared
        log = transformer.log.read_text(errors="ignore")[start:]
        assert f"guided evaluations (shared-prefix: {STEPS})" in log, log[-4000:]


def test_infotext_round_trips(transformer):
    layers = "joint 7-8" if transformer.family == "SD35" else "double 7-8, single 1"
    on = generate(transformer, [{"enabled": True, "scale": 2.5, "sigma": 4, "layers": layers}])
    image = "data:image/png;base64," + on["images"][0]
    status, parsed = transformer.post("/sdapi/v1/png-info", {"image": image})
    assert status == 200
    params = parsed["parameters"]
    assert (params["SEG scale"], params["SEG sigma"], params["SEG layers"]) == ("2.5", "4", layers)
    # what "paste" gives the script: the same image (this is also the reproducibility check)
    again = generate(transformer, SEGParams.from_infotext(params).to_args())
    assert base64.b64decode(again["images"][0]) == base64.b64decode(on["images"][0])


def test_cfg_with_a_negative_prompt_and_an_odd_latent(transformer):
    # 136×200 px is a 17×25 latent: Flux and Chroma pad it to 9×13 patches
    fields = {"cfg_scale": 3, "negative_prompt": "blurry", "width": 200, "height": 136}
    if transformer.family == "SD35":  # SD3's patch embedder needs an even latent
        fields.update(width=192, height=128)
    plain = generate(transformer, **fields)
    guided = generate(transformer, [{"enabled": True, "branch": "uncond"}], **fields)
    assert "SEG scale" in guided["info"] and "SEG warning" not in guided["info"], guided["info"]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])


def test_blocks_the_model_lacks_are_named(transformer):
    layers = "joint 7, input 4" if transformer.family == "SD35" else "double 7, single 90"
    body = generate(transformer, [{"enabled": True, "layers": layers}])
    missing = "input 4" if transformer.family == "SD35" else "single 90"
    assert f"has no {missing}" in body["info"], body["info"]
