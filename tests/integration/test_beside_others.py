"""SEG beside what users switch on in the same generation, in a real webui (A1111 or Forge):
Hypertile and token merging (A1111 built-ins), soft inpainting and the refiner (A1111), Forge's
built-in PAG, SAG, FreeU and Dynamic Thresholding, and ControlNet where it is installed. Each
combination must run guided without a warning, reproduce with the same seed, differ from the same
generation without SEG, and leave nothing behind."""

from __future__ import annotations

import base64
import io
import re

import pytest

from .test_webui_api import BASE, TITLE, pixels, txt2img

pytestmark = pytest.mark.webui


def script_titles(webui) -> set[str]:
    status, scripts = webui.get("/sdapi/v1/scripts")
    assert status == 200
    return set(scripts["txt2img"]) | set(scripts["img2img"])


def guided_pair(webui, seg_args, **fields):
    """(without SEG, with SEG, with SEG again) for the same request."""
    extra = dict(fields.pop("alwayson_scripts", {}))
    plain = txt2img(webui, alwayson_scripts=extra, **fields)
    with_seg = {**extra, TITLE: {"args": seg_args}}
    guided = txt2img(webui, alwayson_scripts=with_seg, **fields)
    again = txt2img(webui, alwayson_scripts=with_seg, **fields)
    return plain, guided, again


def assert_guided(plain, guided, again):
    assert "SEG scale" in guided["info"] and "SEG warning" not in guided["info"], guided["info"]
    assert guided["images"][0] == again["images"][0]
    assert pixels(guided["images"][0]) != pixels(plain["images"][0])


@pytest.fixture(scope="module")
def baseline(webui):
    return txt2img(webui)


# ----------------------------------------------------------------------------- A1111 built-ins
HYPERTILE = {"hypertile_enable_unet": True, "hypertile_max_tile_unet": 128, "hypertile_swap_size_unet": 3,
             "hypertile_max_depth_unet": 3}  # fmt: skip


def test_hypertile_tiles_are_blurred_over_the_whole_image(webui):
    if webui.forge:
        pytest.skip("A1111's Hypertile settings (Forge has none; reForge's is a script of its own)")
    start = len(webui.log.read_text(errors="ignore")) if webui.log else 0
    # 256 px: the full-resolution layers (32x32 tokens) are cut into 16x16-token tiles
    assert_guided(*guided_pair(webui, [{"enabled": True, "layers": "input 1-2, middle, output 9-11"}],
                               width=256, height=256, override_settings=HYPERTILE))  # fmt: skip
    if webui.log is not None:
        assert "arrived in tiles (Hypertile)" in webui.log.read_text(errors="ignore")[start:]


def test_token_merging_keeps_middle_guided_and_names_itself_on_merged_layers(webui):
    if webui.forge:
        pytest.skip("token merging is an A1111 setting")
    merging = {"token_merging_ratio": 0.5}
    assert_guided(*guided_pair(webui, [True], width=256, height=256, override_settings=merging))
    merged = txt2img(webui, [{"enabled": True, "layers": "input 1"}], width=256, height=256,
                     override_settings=merging)  # fmt: skip
    assert "token merging" in merged["info"] and "Token merging ratio" in merged["info"]


def test_soft_inpainting(webui, baseline):
    if webui.forge and not webui.neo:  # Forge Neo has it built in
        pytest.skip("A1111's soft inpainting")
    from PIL import Image, ImageDraw

    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((32, 32, 96, 96), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    soft = {"soft inpainting": {"args": [True, 1, 0.5, 4, 0, 0.5, 2]}}
    payload = {**BASE, "init_images": [baseline["images"][0]], "denoising_strength": 0.8, "mask_blur": 4,
               "mask": base64.b64encode(buffer.getvalue()).decode()}  # fmt: skip
    results = []
    for scripts in (soft, {**soft, TITLE: {"args": [True]}}, {**soft, TITLE: {"args": [True]}}):
        status, body = webui.post("/sdapi/v1/img2img", {**payload, "alwayson_scripts": scripts})
        assert status == 200, body
        results.append(body)
    assert "Soft inpainting enabled" in results[1]["info"]
    assert_guided(*results)


# ----------------------------------------------------------------------- Forge-family built-ins
# title -> args, per webui: the same built-in may take other arguments in reForge (its Dynamic
# Thresholding has a "Simple Mode" second argument, its SAG no threshold, its FreeU no start/end)
FORGE_BUILTINS = {
    "perturbedattentionguidance integrated": [True, 3.0, 0.0, 0.0, 1.0],
    "selfattentionguidance integrated (sd 1.x, sd 2.x, sdxl)": [True, 0.5, 2.0, 1.0],
    "freeu integrated (sd 1.x, sd 2.x, sdxl)": [True, 1.01, 1.02, 0.99, 0.95, 0.0, 1.0],
    "dynamicthresholding (cfg-fix) integrated": [True, 7.0, 1.0, "Constant", 0.0, "Constant", 0.0, 1.0,
                                                 "enable", "MEAN", "AD", 1.0],
}  # fmt: skip
LDM_PATCHED_BUILTINS = {
    "selfattentionguidance integrated": [True, 0.5, 2.0],
    "freeu integrated": [True, 1.01, 1.02, 0.99, 0.95],
    "dynamicthresholding (cfg-fix) integrated": [True, False, 7.0, 1.0, "Constant", 0.0, "Constant", 0.0, 1.0,
                                                 "enable", "MEAN", "AD", 1.0],
    "rescalecfg for reforge": [True, "Normal", 0.7],
    '"apg\'s now your cfg" and guidance limiter for reforge': [True, 0.5, 0.18, 15.0, 1.0, False, 5.42, 0.28],
    "mahiro cfg for reforge": [True],
    "rescalecfg": [0.7],  # Forge Classic's
}  # fmt: skip
BUILTINS = {"forge": FORGE_BUILTINS, "ldm_patched": LDM_PATCHED_BUILTINS}


@pytest.mark.parametrize(("backend", "title"), [(b, t) for b, titles in BUILTINS.items() for t in titles])
def test_forge_family_builtin_guidance_beside_seg(webui, backend, title):
    if webui.backend != backend:
        pytest.skip(f"a built-in of the {backend} webuis")
    if title not in script_titles(webui):
        pytest.skip(f"{title} is not installed")
    assert_guided(*guided_pair(webui, [True], alwayson_scripts={title: {"args": BUILTINS[backend][title]}}))


# ----------------------------------------------------------------- A1111 guidance extensions
DYNAMIC_THRESHOLDING = "dynamic thresholding (cfg scale fix)"  # mcmonkeyprojects/sd-dynamic-thresholding


def log_since(webui, start: int) -> str:
    return webui.log.read_text(errors="ignore")[start:] if webui.log is not None else ""


def log_size(webui) -> int:
    return len(webui.log.read_text(errors="ignore")) if webui.log is not None else 0


def test_dynamic_thresholding_extension_beside_seg(webui):
    """Its CFG denoiser reads every row before the negative rows as a cond prediction, so SEG
    keeps its rows out of the webui's batch (a separate call) and adds its term to the result."""
    if webui.forge:
        pytest.skip("the A1111 extension (Forge's built-in is tested above)")
    if DYNAMIC_THRESHOLDING not in script_titles(webui):
        pytest.skip("sd-dynamic-thresholding is not installed")
    args = [True, 7.0, 99.0, "Constant", 0.0, "Constant", 0.0, 4.0, True, "MEAN", "AD", 1.0]
    start = log_size(webui)
    plain, guided, again = guided_pair(webui, [True], cfg_scale=12.0,
                                       alwayson_scripts={DYNAMIC_THRESHOLDING: {"args": args}})  # fmt: skip
    assert "Dynamic thresholding enabled" in guided["info"], guided["info"]
    assert_guided(plain, guided, again)
    without = txt2img(webui, [True], cfg_scale=12.0)
    assert pixels(without["images"][0]) != pixels(guided["images"][0])
    if webui.log is not None:
        assert "CFG combination is replaced" in log_since(webui, start)


# ----------------------------------------------------------------------------------- ControlNet
def control_image() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(image).ellipse((24, 24, 104, 104), outline="white", width=6)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_controlnet_beside_seg(webui):
    """Mikubill's sd-webui-controlnet on A1111, the built-in one on Forge, with a control model
    the harness generated and the control image given directly (no preprocessor)."""
    if "controlnet" not in script_titles(webui):
        pytest.skip("no ControlNet extension in this webui")
    status, models = webui.get("/controlnet/model_list")
    names = [m for m in (models or {}).get("model_list", []) if m and m != "None"] if status == 200 else []
    if not names:
        pytest.skip("no ControlNet model in models/ControlNet")
    status, modules = webui.get("/controlnet/module_list")
    listed = (modules or {}).get("module_list", []) if status == 200 else []
    # the preprocessor that passes the image through: "none" in Mikubill's, "None" in Forge's
    no_preprocessor = next((m for m in listed if str(m).lower() == "none"), "None")
    unit = {"enabled": True, "module": no_preprocessor, "model": names[0], "image": control_image(),
            "weight": 1.0, "resize_mode": "Just Resize", "control_mode": "Balanced",
            "pixel_perfect": False}  # fmt: skip
    start = log_size(webui)
    plain, guided, again = guided_pair(webui, [True], alwayson_scripts={"controlnet": {"args": [unit]}})
    assert "ControlNet" in guided["info"], guided["info"]
    assert_guided(plain, guided, again)
    without_control = txt2img(webui, [True])
    assert pixels(without_control["images"][0]) != pixels(guided["images"][0])
    if webui.log is not None and not webui.forge:
        assert "smoothed rows in a separate call" in log_since(webui, start)
    elif webui.log is not None:  # the residuals are copied with the rows: they ride in the webui's call
        assert re.search(r"guided evaluations \((shared-prefix|one-call): \d+\)", log_since(webui, start))


# last in this file: after every combination above
def test_everything_is_left_as_it_was(webui, baseline):
    assert txt2img(webui)["images"][0] == baseline["images"][0]
