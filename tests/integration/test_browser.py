"""SEG's UI inside a real webui (A1111 v1.10.1 or Forge), driven in a real headless Chromium.

Opt-in like the API tier (it uses the same ``webui`` fixture: set SEG_WEBUI_ROOT or SEG_WEBUI_URL),
and it also needs the Python ``playwright`` package and a Chromium binary (default
``/usr/bin/chromium``, or SEG_CHROMIUM); it never downloads a browser. Without them every test
here is skipped with the reason, before any webui is started.

Set SEG_SCREENSHOT=path/to/file.png to also save a screenshot of the open SEG panel
(docs/seg-panel.png is made that way, on Forge).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.webui

CHROMIUM = Path(os.environ.get("SEG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
PREFIX = "smoothed_energy_guidance"
TABS = ("txt2img", "img2img")
LOAD_TIMEOUT_MS = 300_000  # a webui on two busy CPU cores can take minutes to serve its UI
UPDATE_TIMEOUT_S = 60  # how long to wait for the UI to reflect a click; never asserted on
GENERATE_TIMEOUT_MS = 900_000  # Forge loads the checkpoint at the first generation

# The defaults the UI must show (README's controls table), as the browser reads them.
DEFAULTS = {"enabled": False, "scale": 3.0, "sigma": "inf", "branch": "uncond", "layers": "middle",
            "start": 0.0, "end": 1.0, "hires": "same", "hires_scale": 3.0, "hires_sigma": "inf"}  # fmt: skip
SLIDERS = ("scale", "start", "end", "hires_scale")
DROPDOWNS = ("sigma", "hires_sigma")
RADIOS = ("branch", "hires")
LABELS = {"scale": "SEG scale (γ)", "sigma": "Blur sigma (σ)", "branch": "Smoothed branch",
          "layers": "Blocks", "start": "Start (fraction of steps)", "end": "End (fraction of steps)",
          "hires": "Hires. fix pass"}  # fmt: skip
XYZ_AXES = ("[SEG] Scale", "[SEG] Sigma", "[SEG] Start", "[SEG] End", "[SEG] Layers", "[SEG] Branch",
            "[SEG] Hires")  # fmt: skip
SETTINGS = {"seg_default_scale": 3.0, "seg_default_sigma": "inf", "seg_default_branch": "uncond",
            "seg_default_layers": "middle", "seg_one_call": True, "seg_share_prefix": True}  # fmt: skip

# What the generation test sets in the UI (non-default), and what the other tests expect back.
GENERATED = {**DEFAULTS, "enabled": True, "scale": 2.5, "sigma": "10", "branch": "cond"}
PASTED_INFOTEXT = (
    "a cat\nNegative prompt: blurry\n"
    "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 128x128, SEG scale: 2.5, SEG sigma: 4, "
    "SEG branch: cond, SEG layers: input 7-8, SEG start: 0.1, SEG end: 0.9, SEG hires: custom, "
    "SEG hires scale: 2, SEG hires sigma: 16"
)
PASTED = {"enabled": True, "scale": 2.5, "sigma": "4", "branch": "cond", "layers": "input 7-8",
          "start": 0.1, "end": 0.9, "hires": "custom", "hires_scale": 2.0, "hires_sigma": "16"}  # fmt: skip
PLAIN_INFOTEXT = "a dog\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 2, Size: 128x128"
BASE_INFOTEXT = (
    "a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 128x128"
)


# --- browser plumbing ----------------------------------------------------------------------------


class Session:
    """One Chromium for the module; every page it opens reports its console errors here."""

    def __init__(self, context, webui):
        self.context = context
        self.webui = webui
        self.errors: list[dict] = []  # {"test", "kind", "text", "url"}
        self.test = "?"
        self.closing: set = set()

    def record(self, page, kind: str, text: str, url: str = "") -> None:
        if page not in self.closing:
            self.errors.append({"test": self.test, "kind": kind, "text": text, "url": url})

    def open_ui(self):
        page = self.context.new_page()
        page.set_default_timeout(UPDATE_TIMEOUT_S * 1000)
        page.on("console", lambda message: message.type == "error" and self.record(
            page, "console", message.text, message.location.get("url", "")))  # fmt: skip
        page.on("pageerror", lambda error: self.record(
            page, "pageerror", f"{error.name}: {error.message}\n{error.stack}"))  # fmt: skip
        page.goto(self.webui.url, timeout=LOAD_TIMEOUT_MS)
        # the visible header checkboxes are made by the webui's onUiLoaded JavaScript: the UI is ready
        for tab in TABS:
            page.wait_for_selector(f"#{cid(tab, 'enabled')}-visible-checkbox", state="attached",
                                   timeout=LOAD_TIMEOUT_MS)  # fmt: skip
        return page

    def close(self, page) -> None:
        # What a page logs while it is being closed is the test's doing, not the UI's: closing
        # cuts gradio 4's open /heartbeat stream (Forge logs ERR_INCOMPLETE_CHUNKED_ENCODING).
        self.closing.add(page)
        page.close()


@pytest.fixture(scope="module")
def session(request, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tier: pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip(
            f"browser tier: no Chromium at {CHROMIUM} (apt-get install chromium, or set SEG_CHROMIUM)"
        )
    webui = request.getfixturevalue("webui")  # only now: no webui is started for a skipped tier
    profile = tempfile.mkdtemp(prefix="seg-chromium-")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1200}, accept_downloads=True,
        )  # fmt: skip
        try:
            yield Session(context, webui)
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(autouse=True)
def _label_errors(session, request):
    session.test = request.node.name  # console errors are reported with the test that saw them


@pytest.fixture
def page(session):
    page = session.open_ui()
    yield page
    session.close(page)


def cid(tab: str, name: str) -> str:
    """The element id A1111's ``Script.elem_id`` gives a SEG control."""
    return f"script_{tab}_{PREFIX}_{name}"


def switch_tab(page, tab: str) -> None:
    """Select a top-level tab (txt2img, img2img, pnginfo, settings) the way a user does."""
    button = page.locator("#tabs button").filter(has_text=re.compile(
        {"txt2img": r"^\s*txt2img\s*$", "img2img": r"^\s*img2img\s*$", "pnginfo": r"^\s*PNG Info\s*$",
         "settings": r"^\s*Settings\s*$"}[tab], re.IGNORECASE))  # fmt: skip
    button.first.click()
    page.locator(f"#tab_{tab}").wait_for(state="visible")


READ_CONTROLS = """([tab, prefix, sliders, dropdowns, radios]) => {
    const app = gradioApp();
    const q = (name) => app.querySelector(`#script_${tab}_${prefix}_${name}`);
    const out = {
        enabled: q('enabled-visible-checkbox').checked,
        enabled_input: app.querySelector(`#script_${tab}_${prefix}_enabled-checkbox input`).checked,
    };
    for (const name of sliders) out[name] = q(name).querySelector('input[type=number]').value;
    for (const name of dropdowns) out[name] = q(name).querySelector('input').value;
    for (const name of radios) {
        const checked = Array.from(q(name).querySelectorAll('input[type=radio]')).filter(i => i.checked);
        out[name] = checked.length === 1 ? checked[0].value : checked.map(i => i.value);
    }
    out.layers = q('layers').querySelector('textarea, input').value;
    return out;
}"""


def read_controls(page, tab: str) -> dict:
    """Every SEG control of a tab as the browser shows it (sliders as numbers). ``enabled`` is the
    header checkbox the user sees, ``enabled_input`` the hidden gradio checkbox it drives (the
    value a generation uses); the two follow each other a moment apart."""
    shown = page.evaluate(READ_CONTROLS, [tab, PREFIX, list(SLIDERS), list(DROPDOWNS), list(RADIOS)])
    for name in SLIDERS:
        shown[name] = float(shown[name]) if shown[name] not in ("", None) else shown[name]
    return shown


def wait_for_controls(page, tab: str, expected: dict) -> None:
    """Wait until the controls show ``expected`` (the UI updates asynchronously), then compare."""
    if "enabled" in expected:
        expected = {**expected, "enabled_input": expected["enabled"]}
    deadline = time.monotonic() + UPDATE_TIMEOUT_S
    while True:
        shown = read_controls(page, tab)
        if all(shown[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    assert {k: shown[k] for k in expected} == expected, f"{tab}: SEG controls show {shown}"


def open_accordion(page, tab: str, name: str) -> None:
    accordion = page.locator(f"#{cid(tab, name)}")
    content = page.locator(f"#{cid(tab, 'scale' if name == 'enabled' else 'branch')}")
    if not content.is_visible():
        accordion.locator(".label-wrap").first.click()
    content.wait_for(state="visible")


def set_header(page, tab: str, on: bool) -> None:
    box = page.locator(f"#{cid(tab, 'enabled')}-visible-checkbox")
    if box.is_checked() != on:
        box.click()
    page.wait_for_function("([sel, on]) => gradioApp().querySelector(sel).checked === on",
                           arg=[f"#{cid(tab, 'enabled')}-checkbox input", on])  # fmt: skip


def set_slider(page, tab: str, name: str, value: float) -> None:
    box = page.locator(f"#{cid(tab, name)} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def set_dropdown(page, tab: str, name: str, value: str) -> None:
    box = page.locator(f"#{cid(tab, name)} input").first
    box.click()
    box.fill(value)
    box.press("Enter")
    box.blur()


def set_radio(page, tab: str, name: str, value: str) -> None:
    page.locator(f"#{cid(tab, name)} label").filter(has=page.locator(f"input[value='{value}']")).click()


def set_prompt(page, tab: str, text: str, negative: str | None = None) -> None:
    """Before a paste, ``negative=""``: Forge Classic disables the paste button while the negative
    prompt has text (its default "paste safe guard" setting); the paste fills it again."""
    page.locator(f"#{tab}_prompt textarea").fill(text)
    if negative is not None:
        page.locator(f"#{tab}_neg_prompt textarea").fill(negative)


def info_text(page, tab: str) -> str:
    return page.locator(f"#html_info_{tab}").first.inner_text()  # gradio 3 repeats an HTML's id inside


def generate(page, tab: str) -> str:
    """Click Generate and return the generation info shown under the gallery."""
    page.locator(f"#{tab}_generate").click()
    page.wait_for_function(
        """(tab) => {
            const app = gradioApp();
            const info = app.querySelector(`#html_info_${tab}`);
            const log = app.querySelector(`#html_log_${tab}`);
            return (info && /Steps: \\d+/.test(info.innerText)) || (log && /error/i.test(log.innerText));
        }""",
        arg=tab, timeout=GENERATE_TIMEOUT_MS,
    )  # fmt: skip
    log = page.locator(f"#html_log_{tab}").first.inner_text()
    assert not re.search("error", log, re.IGNORECASE), f"generation failed: {log}"
    page.locator(f"#{tab}_gallery img").first.wait_for(state="attached")
    return info_text(page, tab)


def hidden(page, tab: str, name: str) -> bool:
    return page.evaluate(
        "(sel) => { const e = gradioApp().querySelector(sel); return !e || e.offsetParent === null; }",
        f"#{cid(tab, name)}",
    )


# --- the generated image, shared by the tests that use it ------------------------------------------


@pytest.fixture(scope="module")
def generated(session):
    """txt2img with SEG ticked and non-default values set in the UI, generated once; the page stays
    open (the send-to button needs its gallery)."""
    test, session.test = session.test, "generated (fixture)"
    page = session.open_ui()
    switch_tab(page, "txt2img")
    # Prompt, size, steps and seed by pasting: releasing A1111's width slider raises an uncaught
    # "Cannot read properties of undefined (reading 'props')" in gradio's Blocks.js (its hires
    # "upscaled resolution" preview; seen with --disable-all-extensions too), which
    # test_no_console_errors would report. The paste leaves SEG at its defaults.
    set_prompt(page, "txt2img", BASE_INFOTEXT, negative="")
    page.locator("#txt2img_tools #paste").click()
    page.wait_for_function("() => gradioApp().querySelector('#txt2img_prompt textarea').value === 'a cat'")
    wait_for_controls(page, "txt2img", DEFAULTS)
    open_accordion(page, "txt2img", "enabled")
    set_header(page, "txt2img", True)
    set_slider(page, "txt2img", "scale", GENERATED["scale"])
    set_dropdown(page, "txt2img", "sigma", GENERATED["sigma"])
    open_accordion(page, "txt2img", "advanced")
    set_radio(page, "txt2img", "branch", GENERATED["branch"])
    wait_for_controls(page, "txt2img", GENERATED)
    info = generate(page, "txt2img")
    session.test = test
    yield page, info
    session.close(page)


# --- the tests -------------------------------------------------------------------------------------


def test_accordion_on_both_tabs_unticked_with_defaults(page):
    for tab in TABS:
        switch_tab(page, tab)
        accordion = page.locator(f"#{cid(tab, 'enabled')}")
        assert accordion.is_visible(), f"no SEG accordion on {tab}"
        assert "Smoothed Energy Guidance" in accordion.locator(".label-wrap").first.inner_text()
        assert not page.locator(f"#{cid(tab, 'enabled')}-visible-checkbox").is_checked()
        assert hidden(page, tab, "scale"), f"{tab}: the SEG accordion should start closed"
        wait_for_controls(page, tab, DEFAULTS)
        # opened (which ticks the header, as every InputAccordion does), every control is there
        open_accordion(page, tab, "enabled")
        open_accordion(page, tab, "advanced")
        for name, label in LABELS.items():
            control = page.locator(f"#{cid(tab, name)}")
            assert control.is_visible(), f"{tab}: {name} is not shown"
            assert label in control.inner_text(), f"{tab}: {name} is not labelled {label!r}"
        if tab == "txt2img" and os.environ.get("SEG_SCREENSHOT"):
            page.locator(f"#{cid(tab, 'enabled')}").screenshot(path=os.environ["SEG_SCREENSHOT"])


def test_hires_fields_follow_the_hires_mode_and_sigma_is_checked(page):
    """The extension's own JavaScript: hires scale/sigma are shown only for 'custom', and a sigma
    that blurs nothing is flagged on the field."""
    for tab in TABS:
        switch_tab(page, tab)
        open_accordion(page, tab, "enabled")
        open_accordion(page, tab, "advanced")
        for name in ("hires_scale", "hires_sigma"):
            assert hidden(page, tab, name), f"{tab}: {name} is shown while the hires pass is 'same'"
        set_radio(page, tab, "hires", "custom")
        page.locator(f"#{cid(tab, 'hires_scale')}").wait_for(state="visible")
        assert not hidden(page, tab, "hires_sigma"), (
            f"{tab}: hires_sigma is hidden while the hires pass is custom"
        )
        set_radio(page, tab, "hires", "off")
        page.locator(f"#{cid(tab, 'hires_scale')}").wait_for(state="hidden")
        assert hidden(page, tab, "hires_sigma"), f"{tab}: hires_sigma is shown while the hires pass is 'off'"
        sigma = page.locator(f"#{cid(tab, 'sigma')} input").first
        sigma.fill("0.1")
        assert "blurs nothing" in (sigma.get_attribute("title") or "")
        sigma.fill("10")
        assert not sigma.get_attribute("title")


def test_generate_writes_seg_infotext(generated):
    _page, info = generated
    assert "SEG scale: 2.5" in info, info
    assert "SEG sigma: 10" in info, info
    assert "SEG branch: cond" in info, info
    # defaults are not written, and the values were usable
    for key in ("SEG layers", "SEG start", "SEG end", "SEG hires", "SEG warning"):
        assert key not in info, info


def test_paste_restores_every_control_and_resets_without_seg(page):
    switch_tab(page, "txt2img")
    paste = page.locator("#txt2img_tools #paste")
    set_prompt(page, "txt2img", PASTED_INFOTEXT, negative="")
    paste.click()
    wait_for_controls(page, "txt2img", PASTED)
    # the paste ticked the header, which opened the accordion
    page.locator(f"#{cid('txt2img', 'scale')}").wait_for(state="visible")
    # a pasted 'custom' shows the hires fields (the extension's onUiUpdate hook)
    open_accordion(page, "txt2img", "advanced")
    page.locator(f"#{cid('txt2img', 'hires_scale')}").wait_for(state="visible")
    assert not hidden(page, "txt2img", "hires_sigma")

    # a value changed by hand after the paste ...
    set_slider(page, "txt2img", "scale", 5)
    wait_for_controls(page, "txt2img", {"scale": 5.0})
    # ... and an infotext without SEG keys: SEG off and every control back to its default
    set_prompt(page, "txt2img", PLAIN_INFOTEXT, negative="")
    paste.click()
    page.wait_for_function("() => gradioApp().querySelector('#txt2img_prompt textarea').value === 'a dog'")
    wait_for_controls(page, "txt2img", DEFAULTS)
    page.locator(f"#{cid('txt2img', 'hires_scale')}").wait_for(state="hidden")


def test_send_to_img2img_carries_the_seg_controls(generated):
    page, _info = generated
    wait_for_controls(page, "img2img", DEFAULTS)
    switch_tab(page, "txt2img")
    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#tab_img2img").wait_for(state="visible")
    wait_for_controls(page, "img2img", GENERATED)


def test_png_info_send_to_img2img_restores_the_seg_controls(generated, session, tmp_path):
    """The generated PNG through the PNG Info tab: its infotext is parsed and pasted into img2img."""
    gen_page, _info = generated
    src = gen_page.locator("#txt2img_gallery img").first.get_attribute("src")
    response = gen_page.request.get(src if "://" in src else session.webui.url + "/" + src.lstrip("/"))
    assert response.ok, f"could not fetch the generated image {src}"
    png = tmp_path / "generated.png"
    png.write_bytes(response.body())

    page = session.open_ui()  # a fresh UI: img2img at its defaults
    try:
        wait_for_controls(page, "img2img", DEFAULTS)
        switch_tab(page, "pnginfo")
        page.locator("#pnginfo_image input[type=file]").set_input_files(str(png))
        page.wait_for_function(
            "() => /SEG scale: 2\\.5/.test(gradioApp().querySelector('#tab_pnginfo').innerText)",
            timeout=UPDATE_TIMEOUT_S * 1000,
        )  # fmt: skip
        page.locator("#tab_pnginfo #img2img_tab").click()
        page.locator("#tab_img2img").wait_for(state="visible")
        # the webui's own fields arrive with SEG's: tell a paste that did not happen from a wrong one
        prompt = page.locator("#img2img_prompt textarea")
        try:
            page.wait_for_function(
                "() => gradioApp().querySelector('#img2img_prompt textarea').value === 'a cat'"
            )
        except Exception:
            pytest.fail(f"PNG info → img2img pasted nothing (img2img prompt: {prompt.input_value()!r})")
        wait_for_controls(page, "img2img", GENERATED)
    finally:
        session.close(page)


def test_xyz_plot_lists_the_seg_axes(page):
    for tab in TABS:
        switch_tab(page, tab)
        scripts = page.locator(f"#tab_{tab} #script_list input").first
        scripts.click()
        page.locator(f"#tab_{tab} #script_list li").filter(has_text="X/Y/Z plot").click()
        x_type = page.locator(f"#script_{tab}_xyz_plot_x_type")
        x_type.wait_for(state="visible")
        x_type.locator("input").first.click()
        x_type.locator("li").first.wait_for(state="visible")
        labels = x_type.evaluate(
            """(e) => Array.from(e.querySelectorAll('li')).map(
                li => (li.getAttribute('aria-label') || li.textContent).replace('✓', '').trim())"""
        )  # fmt: skip
        missing = [axis for axis in XYZ_AXES if axis not in labels]
        assert not missing, f"{tab}: X type lacks {missing}; it lists {labels}"
        x_type.locator("input").first.press("Escape")


def test_settings_section(page):
    switch_tab(page, "settings")
    page.locator("#settings button").filter(
        has_text=re.compile(r"^\s*Smoothed Energy Guidance\s*$")
    ).first.click()
    section = page.locator("#settings_seg")
    section.wait_for(state="visible")
    for key in SETTINGS:
        assert page.locator(f"#setting_{key}").is_visible(), f"setting {key} is not shown"
    shown = page.evaluate(
        """() => {
            const q = (key) => gradioApp().querySelector(`#setting_${key}`);
            const checked = (key) => Array.from(q(key).querySelectorAll('input[type=radio]'))
                .filter(i => i.checked);
            return {
                seg_default_scale: Number(q('seg_default_scale').querySelector('input[type=number]').value),
                seg_default_sigma: q('seg_default_sigma').querySelector('textarea, input').value,
                seg_default_branch: checked('seg_default_branch').map(i => i.value).join(),
                seg_default_layers: q('seg_default_layers').querySelector('textarea, input').value,
                seg_one_call: q('seg_one_call').querySelector('input[type=checkbox]').checked,
                seg_share_prefix: q('seg_share_prefix').querySelector('input[type=checkbox]').checked,
            };
        }"""
    )  # fmt: skip
    assert shown == SETTINGS
    text = section.inner_text()
    for label in ("Default SEG scale", "Default blur sigma", "Default smoothed branch", "Default blocks",
                  "webui's own model call", "Share the blocks before the first smoothed one"):  # fmt: skip
        assert label in text, f"Settings → Smoothed Energy Guidance lacks {label!r}"


def _unrelated(error: dict, webui_url: str) -> bool:
    """Console errors that are not the extension's, each seen with the same steps on the same
    webui started with --disable-all-extensions (A1111 v1.10.1 and Forge). Two more are kept out
    of the record rather than filtered: A1111's width-slider error (the tests set the size by
    pasting, see ``generated``) and what a page logs while a test closes it (``Session.close``)."""
    host = urlsplit(webui_url).netloc
    # Requests to other hosts fail on a machine without internet: gradio's own page loads
    # iframe-resizer from cdnjs.cloudflare.com (both webuis, with and without this extension;
    # the extension loads nothing from outside the webui).
    if error["kind"] == "console" and "Failed to load resource" in error["text"]:
        return bool(error["url"]) and urlsplit(error["url"]).netloc not in ("", host)
    return False


def test_no_console_errors(session, page):
    """Last in the file: every page this module opened (the ones above and this one) logged no
    error (console.error or an uncaught exception) that is not explained as unrelated."""
    switch_tab(page, "img2img")
    switch_tab(page, "txt2img")
    ours = [e for e in session.errors if not _unrelated(e, session.webui.url)]
    assert not ours, "console errors:\n" + "\n".join(
        f"[{e['test']}] {e['kind']}: {e['text']} {e['url']}" for e in ours
    )
