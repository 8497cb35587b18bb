"""SEG inside a real webui (A1111 v1.10.1 or Forge), checked through the HTTP API."""

from __future__ import annotations

import base64
import io
import json

import pytest

pytestmark = pytest.mark.webui

TITLE = "smoothed energy guidance"
BASE = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 4, "width": 128, "height": 128,
        "seed": 1, "cfg_scale": 7, "sampler_name": "Euler", "batch_size": 1}  # fmt: skip


def pixels(b64: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def txt2img(webui, args=None, base=None, **fields):
    payload = {**(base or BASE), **fields}
    if args is not None:
        payload["alwayson_scripts"] = {TITLE: {"args": args}}
    status, body = webui.post("/sdapi/v1/txt2img", payload)
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def baseline(webui):
    return txt2img(webui)


def test_script_is_listed_with_its_args(webui):
    status, scripts = webui.get("/sdapi/v1/scripts")
    assert status == 200
    assert TITLE in scripts["txt2img"] and TITLE in scripts["img2img"]
    status, info = webui.get("/sdapi/v1/script-info")
    ours = [s for s in info if s["name"] == TITLE and s["is_alwayson"]]
    assert len(ours) == 2
    labels = [arg["label"] for arg in ours[0]["args"]]
    assert labels[:3] == ["Smoothed Energy Guidance", "SEG scale (γ)", "Blur sigma (σ)"]
    assert len(labels) == 10


def test_disabled_changes_nothing_and_enabled_changes_the_image(webui, baseline):
    off = txt2img(webui, [False, 3, "inf"])
    assert off["images"][0] == baseline["images"][0]
    on = txt2img(webui, [True, 3, "inf"])
    assert pixels(on["images"][0]) != pixels(baseline["images"][0])
    again = txt2img(webui, [True, 3, "inf"])
    assert again["images"][0] == on["images"][0]
    info = on["info"]
    assert "SEG scale: 3" in info and "SEG sigma: inf" in info


def test_infotext_round_trips_through_png_info(webui):
    on = txt2img(webui, [True, 2.5, "10", "cond", "middle", 0, 1, "same", 3, "inf"])
    status, parsed = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + on["images"][0]})
    assert status == 200
    params = parsed["parameters"]
    assert params["SEG scale"] == "2.5" and params["SEG sigma"] == "10" and params["SEG branch"] == "cond"
    if webui.backend == "forge":  # lllyasviel's Forge and Forge Neo 2.26 alike
        pytest.skip("Forge's API fails every request with an 'infotext' field (isinstance on List[str])")
    # pasting the infotext through the API reproduces the image
    status, body = webui.post("/sdapi/v1/txt2img", {**BASE, "infotext": parsed["info"]})
    assert status == 200, body
    again = json.loads(body["info"])["infotexts"][0]
    assert all(f"{key}: {params[key]}" in again for key in ("SEG scale", "SEG sigma", "SEG branch")), again
    added = sorted(set(infotext_keys(again)) - set(infotext_keys(parsed["info"])))
    if added:  # mcmonkey's Dynamic Thresholding does this on A1111: its infotext reader returns a
        # gr.update dict, which the API takes as "enabled" for any pasted infotext
        pytest.skip(f"another extension switched itself on from the pasted infotext: {', '.join(added)}")
    assert pixels(body["images"][0]) == pixels(on["images"][0])


def infotext_keys(infotext: str) -> list[str]:
    last = infotext.strip().split("\n")[-1]
    return [part.split(":", 1)[0].strip() for part in last.split(", ") if ":" in part]


def test_named_dict_equals_positional(webui):
    positional = txt2img(webui, [True, 2, "4", "uncond", "middle", 0, 1, "same", 3, "inf"])
    named = txt2img(webui, [{"enabled": True, "scale": 2, "sigma": 4}])
    assert pixels(named["images"][0]) == pixels(positional["images"][0])


@pytest.mark.parametrize("args", [[True, 3, "abc"], [{"enabled": True, "sigmaa": 1}], [True, "x"]])
def test_bad_args_give_a_clean_message_and_a_normal_image(webui, baseline, args):
    body = txt2img(webui, args)
    status, parsed = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
    assert status == 200
    assert "SEG setting" in parsed["parameters"]["SEG warning"]
    assert "SEG scale" not in parsed["parameters"]
    assert pixels(body["images"][0]) == pixels(baseline["images"][0])


def test_hires_fix_with_custom_pass(webui):
    body = txt2img(
        webui, [{"enabled": True, "hires": "custom", "hires_scale": 1.5, "hires_sigma": 2}],
        width=64, height=64, enable_hr=True, hr_scale=2, hr_upscaler=webui.upscaler("Latent"),
        hr_second_pass_steps=2, denoising_strength=0.7, **webui.hires_fields(),
    )  # fmt: skip
    assert "SEG hires: custom" in body["info"] and "SEG hires sigma: 2" in body["info"]


def test_img2img(webui, baseline):
    payload = {**BASE, "init_images": [baseline["images"][0]], "denoising_strength": 0.6}
    status, plain = webui.post("/sdapi/v1/img2img", payload)
    assert status == 200
    status, guided = webui.post(
        "/sdapi/v1/img2img", {**payload, "alwayson_scripts": {TITLE: {"args": [True]}}}
    )
    assert status == 200
    assert "SEG scale" in guided["info"]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])


def test_batch_and_non_square(webui):
    body = txt2img(webui, [True], batch_size=2, width=192, height=128, prompt="a cat AND a dog")
    assert len(body["images"]) == 2 and "SEG scale" in body["info"]


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Heun", "DPM++ SDE", "DDIM", "UniPC", "LCM"])
def test_every_sampler_family(webui, sampler):
    plain = txt2img(webui, sampler_name=sampler, steps=3)
    guided = txt2img(webui, [True, 3, "inf"], sampler_name=sampler, steps=3)
    assert "SEG scale" in guided["info"] and "SEG warning" not in guided["info"]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])


@pytest.mark.parametrize(
    "variant",
    [
        {"override_settings": {"batch_cond_uncond": False}},
        {"override_settings": {"skip_early_cond": 0.5}},
        {"s_min_uncond": 100.0},
        {"override_settings": {"pad_cond_uncond": True}, "prompt": "a cat " * 60, "negative_prompt": "x"},
        {"prompt": "a cat " * 60, "negative_prompt": "x"},
        {"cfg_scale": 1},
        {"n_iter": 2, "batch_size": 2, "width": 128, "height": 192},
    ],
    ids=[
        "cond-uncond-unbatched",
        "skip-early-cfg",
        "ngms",
        "padded-prompts",
        "token-mismatch",
        "cfg1",
        "batches",
    ],
)
def test_batch_layouts_run_guided_without_warnings(webui, variant):
    missing = set(variant.get("override_settings", {})) - webui.options()
    if missing:
        pytest.skip(f"this webui has no {', '.join(sorted(missing))} setting")
    guided = txt2img(webui, [True, 3, "inf"], **variant)
    plain = txt2img(webui, **variant)
    assert "SEG scale" in guided["info"] and "SEG warning" not in guided["info"]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])


def test_hires_with_a_non_latent_upscaler_and_inpaint(webui, baseline):
    body = txt2img(webui, [True], width=64, height=64, enable_hr=True, hr_scale=2,
                   hr_upscaler=webui.upscaler("Lanczos"), hr_second_pass_steps=2, denoising_strength=0.6,
                   **webui.hires_fields())  # fmt: skip
    assert "SEG scale" in body["info"] and "SEG warning" not in body["info"]
    from PIL import Image, ImageDraw

    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((32, 32, 96, 96), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    payload = {**BASE, "init_images": [baseline["images"][0]], "denoising_strength": 0.8,
               "mask": base64.b64encode(buffer.getvalue()).decode(), "inpainting_fill": 1,
               "alwayson_scripts": {TITLE: {"args": [True]}}}  # fmt: skip
    status, inpainted = webui.post("/sdapi/v1/img2img", payload)
    assert status == 200
    assert "SEG scale" in inpainted["info"] and "SEG warning" not in inpainted["info"]


def test_the_log_names_the_evaluation_path(webui):
    if webui.log is None:
        pytest.skip("the webui's log is only known when the tests start the webui")
    # SEG's rows ride in the webui's own model call everywhere, the blocks before the first
    # smoothed one shared (reForge and Forge Classic: hooked layer by layer)
    txt2img(webui, [True])
    assert "guided evaluations (shared-prefix: 4)" in webui.log.read_text(errors="ignore")


def test_nothing_left_behind(webui, baseline):
    # last in this file: after every request above, SEG off is still bit-identical
    assert txt2img(webui)["images"][0] == baseline["images"][0]
