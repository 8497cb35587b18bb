"""The A1111 script driven through a stand-in of the v1.10.1 modules API, on a real ldm UNet."""

import argparse
import logging
import math
import types

import pytest
import standin_webui as sw
import torch
from unets import sd1_unet, sd2_unet

from lib_seg import ARG_NAMES, INFOTEXT_KEYS, SEGParams, parse_layers, resolve_attn1
from lib_seg.backends.a1111.patch import QueryBlurPatch
from lib_seg.ui_spec import CONTROLS

CTX = 32
LATENT = (16, 24)


def make_model(unet=None, **flags):
    unet = unet or sd1_unet(model_channels=32, context_dim=CTX)
    model = types.SimpleNamespace(
        model=types.SimpleNamespace(diffusion_model=unet, conditioning_key="crossattn"),
        cond_stage_key="txt",
        cond_stage_model_empty_prompt=torch.zeros(1, 4, CTX),
        is_sd1=True,
        is_sd2=False,
        is_sdxl=False,
        is_sd3=False,
    )
    for key, value in flags.items():
        setattr(model, key, value)
    return model


@pytest.fixture(scope="module")
def shared_unet():
    return sd1_unet(model_channels=32, context_dim=CTX)


@pytest.fixture
def webui(monkeypatch, shared_unet):
    ui = sw.install(monkeypatch)
    ui.shared.sd_model = make_model(shared_unet)
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors
    assert_no_hooks(ui.shared.sd_model.model.diffusion_model)


def assert_no_hooks(unet):
    for module in unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def conds(lengths, seed=0, weights=None):
    """A Multicond batch: one entry per image, each a list of AND parts (token length per part)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, parts in enumerate(lengths):
        parts = parts if isinstance(parts, list) else [parts]
        ws = (weights or {}).get(i, [1.0] * len(parts))
        batch.append(
            [sw.Composable(torch.randn(n, CTX, generator=g), w) for n, w in zip(parts, ws, strict=True)]
        )
    return sw.Multicond(batch)


def uncond(batch, length, seed=1):
    return torch.randn(batch, length, CTX, generator=torch.Generator().manual_seed(seed))


def args_for(**values):
    params = SEGParams.from_values({"enabled": True, **values})
    return params.to_args()


def generate(
    webui, args, *, batch=1, cond=None, neg=None, cfg=7.0, steps=3, heun=False, hires=None, p=None, **kw
):
    """Drive the script hooks around sampling passes in the order the webui calls them."""
    p = p or sw.Processing()
    cond = cond or conds([4] * batch)
    neg = uncond(batch, 4) if neg is None else neg
    script = webui.script
    script.process(p, *args)
    outputs = []
    for is_hr in [False] + ([True] if hires else []):
        p.is_hr_pass = is_hr
        script.process_before_every_sampling(p, *args)
        x = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(42))
        out = sw.sample(webui, p, x, sw.sigmas(steps), cond, neg, cfg, heun=heun, **kw)
        script.post_sample(p, webui.scripts.PostSampleArgs(out), *args)
        script.postprocess_batch(p, *args, images=out)
        outputs.append(out)
    script.postprocess(p, types.SimpleNamespace(images=outputs[-1]), *args)
    return outputs[-1], p


def count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls, handle


# ------------------------------------------------------------------------------------------ UI
def test_ui_controls_are_the_api_order_with_labels_ids_and_help(webui):
    components = webui.components
    assert len(components) == len(ARG_NAMES)
    ids = [c.accordion_id if hasattr(c, "accordion_id") else c.elem_id for c in components]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("script_txt2img_smoothed_energy_guidance_") for i in ids)
    for component, control in zip(components, CONTROLS, strict=True):
        assert component.label == control.label and control.info
    assert components[0].value is False
    assert [c.value for c in components[1:]] == SEGParams().to_args()[1:]
    labels = [c.label for c in components]
    assert len(set(labels)) == len(labels)  # ui-config keys are per label


def test_ui_is_idempotent_and_infotext_fields_cover_every_control(webui):
    callbacks_before = {k: len(v) for k, v in webui.callbacks.callbacks.items()}
    again = webui.script.ui(False)
    assert [c.label for c in again] == [c.label for c in webui.components]
    assert {k: len(v) for k, v in webui.callbacks.callbacks.items()} == callbacks_before
    fields = webui.script.infotext_fields
    assert [f[0] for f in fields] == again
    assert [f[1] for f in fields[1:]] == list(INFOTEXT_KEYS.values())
    assert set(webui.script.paste_field_names) == {str(f[1]) for f in fields}


def test_title_and_file_name():
    assert sw.ROOT.joinpath("scripts", "sd_webui_seg.py").is_file()
    from lib_seg.ui_spec import TITLE

    assert TITLE == "Smoothed Energy Guidance"


# ------------------------------------------------------------------------------- off / on
def test_disabled_is_bit_identical_to_no_extension(monkeypatch, shared_unet):
    bare = sw.install(monkeypatch)
    bare.shared.sd_model = make_model(shared_unet)
    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(42))
    baseline = sw.sample(bare, sw.Processing(), x, sw.sigmas(3), conds([4, 4]), uncond(2, 4), 7.0)

    webui = sw.install(monkeypatch)
    webui.shared.sd_model = make_model(shared_unet)
    script = sw.load_script(webui).SmoothedEnergyGuidanceScript()
    script.ui(False)
    webui.script = script
    off, _ = generate(webui, SEGParams().to_args(), batch=2)
    on, _ = generate(webui, args_for(), batch=2)
    off_again, _ = generate(webui, [False], batch=2)
    assert torch.equal(off, baseline) and torch.equal(off_again, baseline)
    assert not torch.allclose(on, baseline)
    assert not webui.callbacks.errors
    assert_no_hooks(shared_unet)


def test_same_seed_same_params_reproduce(webui):
    first, _ = generate(webui, args_for(sigma=2), batch=2)
    second, _ = generate(webui, args_for(sigma=2), batch=2)
    assert torch.equal(first, second)


# ---------------------------------------------------------------- one step against the formula
def one_step(webui, args, cond, neg, cfg=5.0, mask=None, denoiser_class=sw.CFGDenoiser):
    p = sw.Processing()
    webui.script.process(p, *args)
    webui.script.process_before_every_sampling(p, *args)
    batch = len(cond.batch)
    sampler = types.SimpleNamespace(sampler_extra_args={"cond": cond, "uncond": neg})
    denoiser = denoiser_class(sampler, webui, p)
    denoiser.total_steps = 4
    if mask is not None:
        denoiser.mask, denoiser.nmask, denoiser.init_latent = (
            mask,
            1 - mask,
            torch.full((batch, 4, *LATENT), 0.25),
        )
    webui.shared.state.sampling_step, webui.shared.state.sampling_steps = 0, 4
    x = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(3)) * 3
    sigma = torch.full((batch,), 3.0)
    out = denoiser(x, sigma, neg, cond, cfg, 0.0, torch.zeros(batch, 5, 1, 1))
    webui.script.post_sample(p, None, *args)
    return out, x, sigma, p


def reference_step(
    webui, cond, neg, x, sigma, cfg, scale, sigma_blur, branch, skip_uncond=False, padded_neg=None
):
    """Row by row: every prediction in its own model call, SEG computed from spec §1."""
    model = sw.KDiffusionWrapper(webui.shared.sd_model)
    unet = webui.shared.sd_model.model.diffusion_model
    modules = [m for _, m in resolve_attn1(unet, parse_layers("middle"))]
    conds_list, tensor = sw.reconstruct_multicond_batch(cond, 0)
    neg = neg if padded_neg is None else padded_neg

    def predict(i, context, smoothed=False):
        call = dict(cond={"c_crossattn": [context[None]], "c_concat": [torch.zeros(1, 5, 1, 1)]})
        if not smoothed:
            return model(x[i : i + 1], sigma[i : i + 1], **call)[0]
        with QueryBlurPatch(modules, sigma_blur, unet=unet) as patch:
            patch.rows = slice(None)
            return model(x[i : i + 1], sigma[i : i + 1], **call)[0]

    outs = []
    for i, parts in enumerate(conds_list):
        c = [(predict(i, tensor[row]), w, row) for row, w in parts]
        if skip_uncond:
            u, w_cfg = c[0][0], 1.0
        else:
            u, w_cfg = predict(i, neg[i]), cfg
        out = u + sum((ci - u) * (w * w_cfg) for ci, w, _ in c)
        if branch == "uncond" and not skip_uncond:
            out = out + scale * (u - predict(i, neg[i], smoothed=True))
        else:
            norm = sum(abs(w) for _, w, _ in c)
            for ci, w, row in c:
                out = out + scale * (w / norm) * (ci - predict(i, tensor[row], smoothed=True))
        outs.append(out)
    return torch.stack(outs)


LAYOUTS = {
    "batch1": dict(cond=[4], neg_len=4),
    "batch2-prompts-of-different-length": dict(cond=[4, 6], neg_len=6),
    "and-prompts": dict(cond=[[4, 4], 4], neg_len=4, weights={0: [1.0, 0.5]}),
    "neg-longer-chunked": dict(cond=[4, 4], neg_len=8),
    "neg-shorter-padded": dict(cond=[8, 8], neg_len=4, opts={"pad_cond_uncond": True}),
    "neg-shorter-padded-v0": dict(cond=[8], neg_len=4, opts={"pad_cond_uncond_v0": True}),
    "batch-cond-uncond-off": dict(cond=[4, [4, 4]], neg_len=4, opts={"batch_cond_uncond": False}),
    "skip-early-cfg": dict(cond=[4, 4], neg_len=4, opts={"skip_early_cond": 1.0}),
}


STRATEGIES = {"shared-prefix": (True, True), "one-call": (True, False), "separate": (False, False)}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("branch", ["uncond", "cond"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_equals_spec_formula_for_every_batch_layout(webui, layout, branch, strategy):
    opts = webui.shared.opts
    opts.seg_one_call, opts.seg_share_prefix = STRATEGIES[strategy]
    spec = LAYOUTS[layout]
    for key, value in spec.get("opts", {}).items():
        setattr(webui.shared.opts, key, value)
    cond = conds(spec["cond"], weights=spec.get("weights"))
    batch = len(spec["cond"])
    neg = uncond(batch, spec["neg_len"])
    out, x, sigma, p = one_step(webui, args_for(scale=2.0, sigma=math.inf, branch=branch), cond, neg)
    padded = None
    if spec.get("opts", {}).get("pad_cond_uncond") or spec.get("opts", {}).get("pad_cond_uncond_v0"):
        denoiser = sw.CFGDenoiser(None, webui, None)
        _, tensor = sw.reconstruct_multicond_batch(cond, 0)
        pad = denoiser.pad_cond_uncond if spec["opts"].get("pad_cond_uncond") else denoiser.pad_cond_uncond_v0
        padded = pad(tensor, neg)[1]
    skip = spec.get("opts", {}).get("skip_early_cond", 0) > 0
    expected = reference_step(webui, cond, neg, x, sigma, 5.0, 2.0, math.inf, branch, skip, padded)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert "SEG warning" not in p.extra_generation_params


def test_cfg_scale_one_and_no_seg_difference(webui):
    cond, neg = conds([4]), uncond(1, 4)
    with_seg, x, sigma, _ = one_step(webui, args_for(scale=3.0), cond, neg, cfg=1.0)
    expected = reference_step(webui, cond, neg, x, sigma, 1.0, 3.0, math.inf, "uncond")
    torch.testing.assert_close(with_seg, expected, atol=2e-4, rtol=1e-4)


def test_inpaint_keeps_the_masked_area(webui):
    mask = torch.zeros(1, 1, *LATENT)
    mask[..., :8, :] = 1.0  # keep the top half
    out, _, _, _ = one_step(webui, args_for(scale=3.0), conds([4]), uncond(1, 4), mask=mask)
    assert torch.equal(out[..., :8, :], torch.full_like(out[..., :8, :], 0.25))
    plain, _, _, _ = one_step(webui, [False], conds([4]), uncond(1, 4), mask=mask)
    assert not torch.allclose(out[..., 8:, :], plain[..., 8:, :])


# ----------------------------------------------------------------------- samplers and passes
@pytest.mark.parametrize("heun", [False, True], ids=["euler", "heun"])
def test_samplers_guide_every_scheduled_evaluation(webui, heun):
    unet = webui.shared.sd_model.model.diffusion_model
    calls, handle = count_unet_calls(unet)
    try:
        generate(webui, [False], batch=2, heun=heun, steps=4)
        plain = len(calls)
        calls.clear()
        generate(webui, args_for(), batch=2, heun=heun, steps=4)
    finally:
        handle.remove()
    # the smoothed copies of the 2 negative rows ride in the webui's own call: no extra call
    assert len(calls) == plain
    assert calls == [6] * plain


def test_schedule_limits_the_guided_steps(webui):
    unet = webui.shared.sd_model.model.diffusion_model
    calls, handle = count_unet_calls(unet)
    try:
        generate(webui, args_for(start=0.25, end=0.75), steps=4)
    finally:
        handle.remove()
    assert calls == [2, 3, 3, 2]  # steps 1 and 2 of 4 carry the smoothed row


@pytest.mark.parametrize(("mode", "hires_rows"), [("same", 3), ("off", 2), ("custom", 3)])
def test_hires_modes(webui, monkeypatch, mode, hires_rows):
    unet = webui.shared.sd_model.model.diffusion_model
    sigmas_used = []
    original_init = QueryBlurPatch.__init__

    def spy(self, modules, sigma, **kwargs):
        sigmas_used.append(sigma)
        original_init(self, modules, sigma, **kwargs)

    monkeypatch.setattr(QueryBlurPatch, "__init__", spy)
    calls, handle = count_unet_calls(unet)
    try:
        generate(webui, args_for(sigma=4, hires=mode, hires_scale=1.0, hires_sigma=2), steps=2, hires=True)
    finally:
        handle.remove()
    assert calls == [3, 3, hires_rows, hires_rows]
    assert sigmas_used == {"same": [4.0, 4.0], "off": [4.0], "custom": [4.0, 2.0]}[mode]


def test_refiner_switch_moves_the_patch_to_the_new_unet(webui):
    first = webui.shared.sd_model
    second = make_model(sd1_unet(model_channels=32, context_dim=CTX, seed=5))
    p = sw.Processing()
    args = args_for()
    webui.script.process(p, *args)
    webui.script.process_before_every_sampling(p, *args)
    calls, handle = count_unet_calls(second.model.diffusion_model)
    try:
        cond, neg = conds([4]), uncond(1, 4)
        sampler = types.SimpleNamespace(sampler_extra_args={"cond": cond, "uncond": neg})
        denoiser = sw.CFGDenoiser(sampler, webui, p)
        denoiser.total_steps = 2
        x = torch.randn(1, 4, *LATENT)
        webui.shared.state.sampling_step, webui.shared.state.sampling_steps = 0, 2
        denoiser(x, torch.full((1,), 2.0), neg, cond, 5.0, 0.0, torch.zeros(1, 5, 1, 1))
        webui.shared.sd_model = second  # the webui swaps in the refiner mid-sampling
        denoiser.model_wrap = None
        webui.shared.state.sampling_step = 1
        denoiser(x, torch.full((1,), 1.0), neg, cond, 5.0, 0.0, torch.zeros(1, 5, 1, 1))
        assert calls == [3]  # the webui's call, with SEG's smoothed row, runs on the refiner
    finally:
        handle.remove()
        webui.script.postprocess(p, None, *args)
    assert_no_hooks(first.model.diffusion_model)
    assert_no_hooks(second.model.diffusion_model)


def test_sd2_layout_unet(webui):
    webui.shared.sd_model = make_model(
        sd2_unet(model_channels=32, context_dim=CTX), is_sd1=False, is_sd2=True
    )
    cond, neg = conds([4, 4]), uncond(2, 4)
    out, x, sigma, _ = one_step(webui, args_for(scale=2.0, sigma=3), cond, neg)
    expected = reference_step(webui, cond, neg, x, sigma, 5.0, 2.0, 3.0, "uncond")
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert_no_hooks(webui.shared.sd_model.model.diffusion_model)


# ---------------------------------------------------------------- unsupported and bad input
def off_output(webui, batch=1):
    return generate(webui, [False], batch=batch)[0]


@pytest.mark.parametrize("flag", ["is_sd3", "no_unet", "edit"])
def test_unsupported_model_warns_once_and_generates_normally(webui, caplog, shared_unet, flag):
    model = webui.shared.sd_model = make_model(shared_unet)
    if flag == "is_sd3":
        model.is_sd3 = True
    elif flag == "edit":
        model.cond_stage_key = "edit"
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        if flag == "no_unet":  # the stand-in sampler cannot run this model: check the hooks alone
            model.model = types.SimpleNamespace(
                diffusion_model=torch.nn.Identity(), conditioning_key="crossattn"
            )
            p = sw.Processing()
            webui.script.process(p, *args_for())
            webui.script.process_before_every_sampling(p, *args_for())
            assert webui.script_module.controller.guidance is None
            webui.script.postprocess(p, None, *args_for())
        else:
            out, p = generate(webui, args_for())
            assert torch.equal(out, off_output(webui))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "without SEG" in warnings[0].getMessage()
    assert "SEG scale" not in p.extra_generation_params
    assert "without SEG" in p.extra_generation_params["SEG warning"]
    assert any("without SEG" in c for c in p.comments)
    if flag == "no_unet":
        model.model = types.SimpleNamespace(diffusion_model=shared_unet, conditioning_key="crossattn")


@pytest.mark.parametrize(
    ("args", "field"),
    [([True, "strong"], "scale"), ([True, 3, float("nan")], "sigma"),
     ([{"enabled": True, "sigmaa": 3}], "sigmaa"), ([True, 3, "inf", "both"], "branch"),
     ([True, 3, "inf", "uncond", "nowhere"], "layers"), ([{"enabled": "yes please"}], "enabled")],
)  # fmt: skip
def test_bad_api_values_skip_seg_with_a_message_naming_the_field(webui, caplog, args, field):
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        out, p = generate(webui, args)
    message = p.extra_generation_params["SEG warning"]
    assert f"SEG setting '{field}'" in message and "skipped" in message
    assert message in p.comments
    assert "SEG scale" not in p.extra_generation_params
    assert [r.exc_info for r in caplog.records] == [None]  # one line, no traceback
    assert torch.equal(out, off_output(webui))


def test_clamped_values_run_and_are_reported(webui):
    out, p = generate(webui, [True, 99, "10", "cond", "middle", -1, 2])
    assert p.extra_generation_params["SEG scale"] == "30"
    assert "clamped" in p.extra_generation_params["SEG warning"]
    assert not torch.equal(out, off_output(webui))


def test_api_dict_and_positional_forms_agree(webui):
    positional, _ = generate(webui, [True, 2.5, "4", "cond", "middle", 0, 1, "same", 3, "inf"])
    named, _ = generate(webui, [{"enabled": True, "scale": 2.5, "sigma": 4, "branch": "cond"}, False, 3.0])
    assert torch.equal(positional, named)


def failing_unet(monkeypatch, unet, failing_call=None, error=None, fails=None):
    """The UNet raises ``error`` (the webui's out-of-memory error by default) on call number
    ``failing_call``, or on every call whose batch size ``fails(batch)`` picks."""
    original = type(unet).forward
    state = {"calls": 0}

    def failing(self, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] == failing_call or (fails is not None and fails(int(args[0].shape[0]))):
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", failing)
    return lambda: monkeypatch.setattr(type(unet), "forward", original)


def test_exception_inside_the_separate_pass_only_stops_guidance(webui, monkeypatch):
    webui.shared.opts.seg_one_call = False
    unet = webui.shared.sd_model.model.diffusion_model
    restore = failing_unet(monkeypatch, unet, failing_call=2)  # SEG's own extra call of step 0
    _, p = generate(webui, args_for(), steps=2)
    restore()
    assert "out of memory" in p.extra_generation_params["SEG warning"]
    assert_no_hooks(unet)


def test_exception_in_the_webuis_call_leaves_nothing_for_the_next_generation(webui, monkeypatch):
    # with SEG's rows in the webui's own call, a failure there that is not about memory ends the
    # generation as it would without SEG; the next generation starts clean
    unet = webui.shared.sd_model.model.diffusion_model
    baseline = off_output(webui)
    restore = failing_unet(monkeypatch, unet, failing_call=2, error=ValueError("broken"))
    p = sw.Processing()
    webui.script.process(p, *args_for())
    webui.script.process_before_every_sampling(p, *args_for())
    with pytest.raises(ValueError, match="broken"):
        sw.sample(webui, p, torch.randn(1, 4, *LATENT), sw.sigmas(3), conds([4]), uncond(1, 4), 7.0)
    restore()
    assert torch.equal(off_output(webui), baseline)
    assert_no_hooks(unet)


def test_out_of_memory_with_seg_rows_finishes_the_step_as_a_separate_call(webui, monkeypatch):
    unet = webui.shared.sd_model.model.diffusion_model
    webui.shared.opts.seg_one_call = False
    separate, _ = generate(webui, args_for(), batch=2)
    webui.shared.opts.seg_one_call = True
    restore = failing_unet(monkeypatch, unet, fails=lambda batch: batch > 4)  # the webui's call is 4 rows
    wrappers, wrapper_class = [], sw.KDiffusionWrapper
    monkeypatch.setattr(sw, "KDiffusionWrapper", type("Recorded", (wrapper_class,), {
        "__init__": lambda self, model: (wrapper_class.__init__(self, model), wrappers.append(self))[0]
    }))  # fmt: skip
    guided, p = generate(webui, args_for(), batch=2)
    restore()
    torch.testing.assert_close(guided, separate, atol=1e-5, rtol=1e-5)
    assert "out of memory with SEG's rows" in p.extra_generation_params["SEG warning"]
    assert_no_hooks(unet)
    assert wrappers and all("forward" not in vars(model) and not model._forward_hooks for model in wrappers)


def test_out_of_memory_for_seg_rows_alone_leaves_those_steps_unguided(webui, monkeypatch):
    unet = webui.shared.sd_model.model.diffusion_model
    baseline = off_output(webui, batch=2)
    restore = failing_unet(monkeypatch, unet, fails=lambda batch: batch != 4)  # only the webui's calls fit
    guided, p = generate(webui, args_for(), batch=2)
    restore()
    assert torch.equal(guided, baseline)
    warning = p.extra_generation_params["SEG warning"]
    assert "out of memory also for SEG's rows" in warning or "step left unguided" in warning
    assert torch.equal(off_output(webui, batch=2), baseline)


def test_interrupt_then_cleanup(webui):
    p = sw.Processing()
    args = args_for()
    webui.script.process(p, *args)
    webui.script.process_before_every_sampling(p, *args)
    webui.shared.state.interrupted = True
    with pytest.raises(InterruptedError):
        sw.sample(webui, p, torch.randn(1, 4, *LATENT), sw.sigmas(2), conds([4]), uncond(1, 4), 5.0)
    webui.shared.state.interrupted = False
    webui.script.postprocess(p, None, *args)
    assert_no_hooks(webui.shared.sd_model.model.diffusion_model)
    assert webui.script_module.controller.guidance is None


def test_crashed_generation_is_cleaned_by_the_next_one(webui):
    p = sw.Processing()
    webui.script.process(p, *args_for())
    webui.script.process_before_every_sampling(p, *args_for())  # then the webui crashed: no postprocess
    assert webui.script_module.controller.guidance is not None
    out, _ = generate(webui, [False])
    assert webui.script_module.controller.guidance is None
    assert torch.equal(out, off_output(webui))


# ----------------------------------------------------------------------------- infotext
def paste_ui(webui, infotext_params):
    """The UI paste path: on_infotext_pasted callbacks, then each field by name or callable, with
    the webui's conversion (bool "False" -> False, else type(component.value)(v))."""
    params = dict(infotext_params)
    webui.callbacks.infotext_pasted_callback("", params)
    values = []
    for component, key in webui.script.infotext_fields:
        value = key(params) if callable(key) else params.get(key)
        if value is None:
            values.append(component.value)
        elif isinstance(component.value, bool) and value == "False":
            values.append(False)
        else:
            values.append(type(component.value)(value))
    return values


def paste_api(webui, infotext_params, request_args):
    """The API path: no callbacks; a field's value is set only when its reader returns one."""
    args = list(request_args)
    for index, (component, key) in enumerate(webui.script.infotext_fields):
        value = key(infotext_params) if callable(key) else infotext_params.get(key)
        if value is not None:
            args[index] = (
                type(component.value)(value) if not isinstance(value, type(component.value)) else value
            )
    return args


def test_infotext_written_only_when_seg_ran_and_pasting_restores_every_control(webui):
    custom = SEGParams(True, 2.5, 10.0, "cond", "input 7-8, middle", 0.1, 0.8, "custom", 1.0, 4.0)
    _, p = generate(webui, custom.to_args())
    written = {k: v for k, v in p.extra_generation_params.items() if k.startswith("SEG")}
    assert set(written) == set(INFOTEXT_KEYS.values())
    # the UI holds other values before pasting: every control must come back
    for component in webui.components[1:]:
        component.value = type(component.value)(component.value)
    webui.components[1].value = 7.0
    restored = paste_ui(webui, {"Steps": "20", **written})
    assert SEGParams.from_args(restored) == custom
    api = paste_api(webui, written, [False, *SEGParams().to_args()[1:]])
    assert SEGParams.from_args(api) == custom


def test_pasting_defaults_and_no_seg(webui):
    _, p = generate(webui, args_for(sigma=10))
    written = {k: v for k, v in p.extra_generation_params.items() if k.startswith("SEG")}
    assert written == {"SEG scale": "3", "SEG sigma": "10"}
    assert SEGParams.from_args(paste_ui(webui, written)) == SEGParams(enabled=True, sigma=10.0)
    # an infotext without SEG keys turns SEG off and puts every control, scale included, back
    webui.components[0].value, webui.components[1].value = True, 7.0
    without_seg = paste_ui(webui, {"Steps": "20"})
    assert without_seg[0] is False
    assert SEGParams.from_args(without_seg) == SEGParams()
    # PNG info runs the same callbacks on the parsed parameters: they must stay as written
    parsed = {"Steps": "20"}
    webui.callbacks.infotext_pasted_callback("", parsed)
    assert parsed == {"Steps": "20"}


def test_stale_keys_do_not_leak_into_the_next_xyz_cell(webui):
    shared_extra = {}
    generate(webui, args_for(branch="cond"), p=sw.Processing(extra_generation_params=shared_extra))
    assert "SEG branch" in shared_extra
    generate(webui, [False], p=sw.Processing(extra_generation_params=shared_extra))
    assert not any(key.startswith("SEG") for key in shared_extra)


def test_send_to_carries_every_control_by_name(webui):
    names = webui.script.paste_field_names
    fields = webui.script.infotext_fields
    assert [f[0] for f in fields if f[1] in names] == webui.components


# ----------------------------------------------------------------------------------- XYZ
def test_xyz_axes_registered_once_and_turn_seg_on(webui):
    class AxisOption:
        def __init__(
            self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None
        ):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    xyz = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Seed", int, None)])

    class XYZScript(webui.scripts.Script):
        pass

    XYZScript.__module__ = "xyz_grid.py"
    webui.scripts.scripts_data.append(webui.scripts.ScriptClassData(XYZScript, "xyz_grid.py", "", xyz))
    webui.callbacks.before_ui_callback()
    webui.callbacks.before_ui_callback()  # UI reload
    labels = [o.label for o in xyz.axis_options]
    for label in (
        "[SEG] Scale",
        "[SEG] Sigma",
        "[SEG] Start",
        "[SEG] End",
        "[SEG] Layers",
        "[SEG] Branch",
        "[SEG] Hires",
    ):
        assert labels.count(label) == 1
    by_label = {o.label: o for o in xyz.axis_options}
    assert by_label["[SEG] Branch"].choices() == ["uncond", "cond"]
    p = sw.Processing()
    by_label["[SEG] Sigma"].apply(p, float("inf"), [])
    by_label["[SEG] Branch"].apply(p, "cond", [])
    _, p = generate(webui, [False], p=p)
    assert p.extra_generation_params["SEG sigma"] == "inf"
    assert p.extra_generation_params["SEG branch"] == "cond"


def test_title_clash_is_reported(webui, caplog):
    class Other(webui.scripts.Script):
        def title(self):
            return "Smoothed Energy Guidance"

    webui.scripts.scripts_data.append(webui.scripts.ScriptClassData(Other, "other/seg.py", "", None))
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        webui.callbacks.before_ui_callback()
    assert any("other/seg.py" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ settings, preload
def test_settings_defaults_reach_the_ui(webui):
    webui.callbacks.ui_settings_callback()
    assert {"seg_default_scale", "seg_default_sigma", "seg_default_branch", "seg_default_layers"} <= set(
        webui.shared.opts.data_labels
    )
    assert all(
        info.section == ("seg", "Smoothed Energy Guidance") for info in webui.shared.opts.data_labels.values()
    )
    webui.shared.opts.seg_default_sigma = "10"
    webui.shared.opts.seg_default_scale = 2.0
    components = webui.script.ui(False)
    assert components[1].value == 2.0 and components[2].value == "10"
    webui.shared.opts.seg_default_sigma = "bogus"
    assert webui.script.ui(False)[2].value == "inf"
    assert {"seg_one_call", "seg_share_prefix"} <= set(webui.shared.opts.data_labels)
    webui.shared.opts.seg_one_call = False
    assert guided_paths(webui, args_for()) == {"separate": 1}
    webui.shared.opts.seg_one_call, webui.shared.opts.seg_share_prefix = True, False
    assert guided_paths(webui, args_for()) == {"one-call": 1}


def test_preload_flag_disables_every_hook(monkeypatch, shared_unet):
    import importlib.util

    spec = importlib.util.spec_from_file_location("seg_preload", sw.ROOT / "preload.py")
    preload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preload)
    parser = argparse.ArgumentParser()
    preload.preload(parser)
    assert parser.parse_args(["--seg-disable"]).seg_disable is True
    webui = sw.install(monkeypatch)
    webui.shared.cmd_opts.seg_disable = True
    webui.shared.sd_model = make_model(shared_unet)
    script = sw.load_script(webui).SmoothedEnergyGuidanceScript()
    assert script.show(False) is False
    assert not any(webui.callbacks.callbacks.values())


def test_install_py_runs_without_error():
    import runpy

    runpy.run_path(str(sw.ROOT / "install.py"))


def guided_paths(webui, args, **kw):
    """Run one denoiser step and return which evaluation path SEG used."""
    controller = webui.script_module.controller
    seen = {}
    original = controller.end_pass

    def spy():
        if controller.guidance is not None and not seen:
            seen.update(controller.guidance.paths)
        original()

    controller.end_pass = spy
    try:
        one_step(webui, args, conds([4, 4]), uncond(2, kw.pop("neg_len", 4)), **kw)
    finally:
        controller.end_pass = original
    return seen


def test_the_path_taken_follows_the_layout(webui, monkeypatch):
    assert guided_paths(webui, args_for()) == {"shared-prefix": 1}
    assert guided_paths(webui, args_for(layers="input 1, middle")) == {"shared-prefix": 1}  # input 0 shared
    assert guided_paths(webui, args_for(), neg_len=8) == {"separate": 1}  # negative of another length
    assert guided_paths(webui, args_for(branch="cond"), neg_len=8) == {"shared-prefix": 1}
    webui.shared.opts.skip_early_cond = 1.0  # the webui drops the negative rows after SEG placed copies
    assert guided_paths(webui, args_for()) == {"separate": 1}
    webui.shared.opts.skip_early_cond = 0.0
    webui.shared.opts.seg_share_prefix = False
    assert guided_paths(webui, args_for()) == {"one-call": 1}
    webui.shared.opts.seg_one_call = False
    assert guided_paths(webui, args_for()) == {"separate": 1}


def test_a_wrapped_unet_forward_keeps_the_webuis_batch(webui, monkeypatch):
    # another extension's forward may assume the webui's own [cond, uncond] layout: SEG's rows
    # then go in a separate call, automatically, whatever the Settings switches say
    unet = webui.shared.sd_model.model.diffusion_model
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: original(*a, **k), raising=False)
    assert guided_paths(webui, args_for()) == {"separate": 1}
    monkeypatch.delattr(unet, "forward")
    assert guided_paths(webui, args_for()) == {"shared-prefix": 1}


@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_controlnet_applies_to_the_smoothed_rows_exactly_as_to_their_sources(webui, branch):
    from standin_wrappers import ControlNetStandin

    unet = webui.shared.sd_model.model.diffusion_model
    cond, neg = conds([[4, 4], 4], weights={0: [1.0, 0.5]}), uncond(2, 4)
    hint = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(9))
    controlnet = ControlNetStandin(unet, hint, neg)
    try:
        args = args_for(scale=2.0, sigma=math.inf, branch=branch)
        out, x, sigma, p = one_step(webui, args, cond, neg)
        again, *_ = one_step(webui, args, cond, neg)
        expected = reference_step(webui, cond, neg, x, sigma, 5.0, 2.0, math.inf, branch)
        calls = list(controlnet.calls)
    finally:
        controlnet.remove()
    assert torch.equal(out, again)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    smoothed_rows = 2 if branch == "uncond" else 3
    assert calls[:2] == [5, smoothed_rows]  # the webui's own call unchanged, then SEG's rows
    assert "SEG warning" not in p.extra_generation_params


@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_a_replaced_cfg_combination_never_sees_the_smoothed_rows(webui, branch):
    # Dynamic Thresholding reads every row before the uncond rows as a cond prediction: SEG's
    # rows would enter its result as extra AND prompts, so they go in a separate call
    from standin_wrappers import dynamic_thresholding_denoiser

    custom = dynamic_thresholding_denoiser(sw.CFGDenoiser)
    cond, neg = conds([[4, 4], [4, 4]], weights={0: [1.0, 0.5], 1: [0.7, 0.3]}), uncond(2, 4)
    args = args_for(scale=2.0, sigma=math.inf, branch=branch)
    out, x, sigma, p = one_step(webui, args, cond, neg, denoiser_class=custom)
    again, *_ = one_step(webui, args, cond, neg, denoiser_class=custom)
    expected = reference_step(webui, cond, neg, x, sigma, 5.0, 2.0, math.inf, branch)
    assert torch.equal(out, again)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert "SEG warning" not in p.extra_generation_params
    seen = {}
    controller = webui.script_module.controller
    original = controller.end_pass

    def spy():
        seen.update(controller.guidance.paths if controller.guidance is not None else {})
        original()

    controller.end_pass = spy
    try:
        one_step(webui, args, cond, neg, denoiser_class=custom)
    finally:
        controller.end_pass = original
    assert seen == {"separate": 1}
    assert guided_paths(webui, args) == {"shared-prefix": 1}  # the webui's own combination again


def test_shared_prefix_equals_full_recomputation(webui):
    cond, neg = conds([[4, 4], 4], weights={0: [1.0, 0.5]}), uncond(2, 4)
    results = {}
    for strategy, flags in STRATEGIES.items():
        for branch in ("uncond", "cond"):
            webui.shared.opts.seg_one_call, webui.shared.opts.seg_share_prefix = flags
            results[strategy, branch] = one_step(
                webui, args_for(scale=2.0, sigma=2, branch=branch), cond, neg
            )[0]
    for branch in ("uncond", "cond"):
        torch.testing.assert_close(
            results["shared-prefix", branch], results["separate", branch], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            results["one-call", branch], results["separate", branch], atol=1e-4, rtol=1e-4
        )


def test_sdxl_dict_conditioning_keeps_its_class_and_shape():
    from lib_seg.backends.batch_rows import concat_rows, insert_rows

    class DictWithShape(dict):  # A1111's SDXL conditioning: shape is a read-only property
        def __init__(self, x, shape=None):
            super().__init__()
            self.update(x)

        @property
        def shape(self):
            return self["crossattn"].shape

    cond = DictWithShape({"crossattn": torch.randn(3, 77, 8), "vector": torch.randn(3, 5)})
    joined = concat_rows(
        [cond, DictWithShape({"crossattn": torch.randn(2, 77, 8), "vector": torch.randn(2, 5)})]
    )
    assert type(joined) is DictWithShape and joined.shape == (5, 77, 8) and joined["vector"].shape == (5, 5)
    inserted = insert_rows(cond, torch.tensor([2]), 1)
    assert type(inserted) is DictWithShape and inserted.shape[0] == 4
    assert torch.equal(inserted["vector"][1], cond["vector"][2])
    assert cond.shape[0] == 3  # the webui's own object is left as it was
