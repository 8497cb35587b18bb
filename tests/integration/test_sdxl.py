"""SEG on an SDXL-architecture checkpoint through the webui's own SDXL code path (sgm conditioner,
vector conditioning, dict conds; A1111's refiner switch). Opt-in beside the rest of the tier:
    SEG_WEBUI_SDXL=<checkpoint title or name the webui lists>
    [SEG_WEBUI_SDXL_REFINER=<a second SDXL checkpoint, for A1111's refiner switch>]
The module switches the webui to that checkpoint and back."""

from __future__ import annotations

import os

import pytest

from .test_webui_api import pixels, txt2img

pytestmark = pytest.mark.webui
SDXL = os.environ.get("SEG_WEBUI_SDXL")
REFINER = os.environ.get("SEG_WEBUI_SDXL_REFINER")


def set_options(webui, options: dict) -> None:
    status, body = webui.post("/sdapi/v1/options", options)
    assert status == 200, body


@pytest.fixture(scope="module")
def sdxl(webui):
    if not SDXL:
        pytest.skip("SDXL cases: set SEG_WEBUI_SDXL to an SDXL checkpoint the webui lists")
    status, before = webui.get("/sdapi/v1/options")
    assert status == 200
    # offline, the default live preview of SDXL wants a file from the hub
    switched = {"sd_model_checkpoint": SDXL, "show_progress_type": webui.offline_preview}
    switched = {key: value for key, value in switched.items() if key in before}
    set_options(webui, switched)
    status, now = webui.get("/sdapi/v1/options")
    assert SDXL in now["sd_model_checkpoint"], now["sd_model_checkpoint"]
    yield webui
    set_options(webui, {key: before[key] for key in switched})


@pytest.fixture(scope="module")
def sdxl_baseline(sdxl):
    return txt2img(sdxl)


def test_sdxl_off_is_bit_identical_and_on_guides_reproducibly(sdxl, sdxl_baseline):
    assert txt2img(sdxl, [False, 3, "inf"])["images"][0] == sdxl_baseline["images"][0]
    on = txt2img(sdxl, [True, 3, "inf"])
    assert "SEG scale: 3" in on["info"] and "SEG warning" not in on["info"], on["info"]
    assert pixels(on["images"][0]) != pixels(sdxl_baseline["images"][0])
    assert txt2img(sdxl, [True, 3, "inf"])["images"][0] == on["images"][0]
    status, parsed = sdxl.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + on["images"][0]})
    assert status == 200 and parsed["parameters"]["SEG sigma"] == "inf"


@pytest.mark.parametrize(
    "variant",
    [
        {"args": [{"enabled": True, "layers": "input 4-5, middle, output 3-5", "sigma": 2}]},
        {"args": [{"enabled": True, "branch": "cond"}], "batch_size": 2, "width": 192, "height": 128,
         "prompt": "a cat AND a dog"},
        {"args": [True], "cfg_scale": 1},
        {"args": [True], "prompt": "a cat " * 60, "negative_prompt": "x"},
    ],
    ids=["sdxl-blocks", "batch2-non-square-and", "cfg1", "token-mismatch"],
)  # fmt: skip
def test_sdxl_layouts_run_guided(sdxl, variant):
    fields = {k: v for k, v in variant.items() if k != "args"}
    guided = txt2img(sdxl, variant["args"], **fields)
    plain = txt2img(sdxl, **fields)
    assert "SEG scale" in guided["info"] and "SEG warning" not in guided["info"], guided["info"]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])


def test_sdxl_hires_fix(sdxl):
    body = txt2img(sdxl, [{"enabled": True, "hires": "custom", "hires_sigma": 2}], width=64, height=64,
                   enable_hr=True, hr_scale=2, hr_upscaler=sdxl.upscaler("Latent"), hr_second_pass_steps=2,
                   denoising_strength=0.7, **sdxl.hires_fields())  # fmt: skip
    assert "SEG hires: custom" in body["info"] and "SEG warning" not in body["info"], body["info"]


def test_sdxl_refiner_switch(sdxl):
    if sdxl.forge:
        pytest.skip("A1111's refiner switch")
    if not REFINER:
        pytest.skip("set SEG_WEBUI_SDXL_REFINER to a second SDXL checkpoint")
    fields = {"refiner_checkpoint": REFINER, "refiner_switch_at": 0.5}
    plain = txt2img(sdxl, **fields)
    guided = txt2img(sdxl, [True], **fields)
    assert "Refiner" in guided["info"] and "SEG warning" not in guided["info"], guided["info"]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])
    assert txt2img(sdxl, [True], **fields)["images"][0] == guided["images"][0]


def test_sdxl_path_and_nothing_left_behind(sdxl, sdxl_baseline):
    if sdxl.log is not None and not sdxl.forge:
        assert "guided evaluations (shared-prefix" in sdxl.log.read_text(errors="ignore")
    assert txt2img(sdxl)["images"][0] == sdxl_baseline["images"][0]
