"""SEG's rows in the Forge family's own batched evaluation (``backends/shared_batch``), with the
UNet prefix shared in Forge's and ldm_patched's UNet layouts (``backends/prefix_sharing``): every
path equals the
A1111 path on the same UNet, the webui's batching and memory limits are respected, and failures
leave a normal image. Runs on Forge's stand-in (``backend/``, Forge's UNet layout), reForge's
(``sampler_calc_cond_batch_function``) and Forge Classic's (pre-CFG hook, two-list evaluator)."""

import logging
import math
import sys
import types

import pytest
import standin_forge as sf
import standin_ldm_patched as sl
import standin_webui as sw
import torch
from unets import sd1_unet

from lib_seg import SEGParams, parse_layers, resolve_attn1
from lib_seg.backends.a1111.patch import QueryBlurPatch
from lib_seg.backends.model_patcher import shared_batch
from lib_seg.backends.model_patcher.guidance import MARKER
from lib_seg.backends.model_patcher.prefix_sharing import forge_unet_prefix, ldm_patched_unet_prefix

CTX = 32
LATENT = (16, 24)
WEBUIS = ("forge", "reforge", "classic")


@pytest.fixture(scope="module")
def unet():
    return sd1_unet(model_channels=32, context_dim=CTX)


@pytest.fixture(params=WEBUIS)
def webui(request, monkeypatch, unet):
    name = request.param
    standin = sf if name == "forge" else sl
    ui = sw.install(monkeypatch, unnamed_callbacks=name == "classic")
    standin.install(monkeypatch)
    if name == "classic":  # Forge Classic: only the two-list evaluator, pre-CFG functions before it
        monkeypatch.delattr(sys.modules[sl.EVALUATOR_MODULE], "calc_cond_batch")
    ui.name, ui.standin = name, standin
    ui.sampling_function = sf.sampling_function_inner if name == "forge" else sl.sampling_function
    ui.shared.sd_model = standin.forge_model(unet)
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors
    patcher = ui.shared.sd_model.forge_objects_after_applying_lora.unet
    seg_keys = ("sampler_post_cfg_function", "model_function_wrapper", "sampler_pre_cfg_function")
    assert not any(key in patcher.model_options for key in seg_keys)


PATH_SETTINGS = {"shared-prefix": (True, True), "one-call": (True, False), "separate": (False, False)}


def use_path(webui, monkeypatch, path):
    one_call, share_prefix = PATH_SETTINGS[path]
    monkeypatch.setattr(webui.shared.opts, "seg_one_call", one_call, raising=False)
    monkeypatch.setattr(webui.shared.opts, "seg_share_prefix", share_prefix, raising=False)


def conds(batch, lengths=(4,), seed=0, strengths=None, control=None):
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i, n in enumerate(lengths):
        entry = {"cross_attn": torch.randn(batch, n, CTX, generator=g), "uuid": f"{seed}-{i}",
                 "strength": (strengths or [1.0] * len(lengths))[i]}  # fmt: skip
        if control is not None:
            entry["control"] = control
        entries.append(entry)
    return entries


def on(**values):
    return SEGParams.from_values({"enabled": True, "scale": 2.0, "sigma": 3, **values}).to_args()


def start(webui, args):
    p = sw.Processing()
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    return p


def step(webui, p, x, sigma, cond, neg, cfg, index=0, total=4):
    webui.callbacks.cfg_denoiser_callback(
        webui.callbacks.CFGDenoiserParams(x, None, sigma, index, total, cond, neg, types.SimpleNamespace(p=p))
    )
    patcher = webui.shared.sd_model.forge_objects.unet
    return webui.sampling_function(patcher.model, x, sigma, neg, cond, cfg, patcher.model_options)


def one_step(webui, args, cond, neg, cfg, batch, caplog):
    p = start(webui, args)
    x = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.full((batch,), 3.0)
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        out = step(webui, p, x, sigma, cond, neg, cfg)
        webui.script.postprocess(p, None, *args)
    return out, x, sigma, p


def paths_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "guided evaluations" in r.getMessage()]


def reference(webui, unet, x, sigma, cond, neg, cfg, scale, blur_sigma, branch, layers="middle"):
    """The A1111 code path's smoothing (to_q hook on every row of an extra evaluation) on the same
    UNet, in the webui's own layout and batching, and the spec's formula."""
    model = sf.KModel(webui.shared.sd_model.forge_objects.unet.model.diffusion_model)
    options = {"transformer_options": {}}
    has_uncond = cfg != 1.0
    c, u = sf.calc_cond_uncond_batch(model, cond, neg if has_uncond else None, x, sigma, options)
    modules = [m for _, m in resolve_attn1(unet, parse_layers(layers))]
    source_conds = neg if branch == "uncond" and has_uncond else cond
    with QueryBlurPatch(modules, blur_sigma, unet=model.diffusion_model) as patch:
        patch.rows = slice(None)
        smoothed, _ = sf.calc_cond_uncond_batch(model, source_conds, None, x, sigma, options)
    if not has_uncond:
        return c + scale * (c - smoothed)
    source = u if branch == "uncond" else c
    return u + cfg * (c - u) + scale * (source - smoothed)


CASES = [  # (cfg, batch, AND prompt token lengths): one prompt; CFG 1; batch 2 with AND prompts of
    # one length (one call) and of two lengths (the webui splits the calls)
    (5.0, 1, (4,)),
    (1.0, 1, (4,)),
    (7.0, 2, (4, 4)),
    (7.0, 2, (4, 6)),
]


@pytest.mark.parametrize("path", list(PATH_SETTINGS))
@pytest.mark.parametrize("branch", ["uncond", "cond"])
@pytest.mark.parametrize(("cfg", "batch", "lengths"), CASES)
def test_every_path_equals_the_a1111_path(
    webui, unet, monkeypatch, caplog, path, branch, cfg, batch, lengths
):
    use_path(webui, monkeypatch, path)
    cond, neg = conds(batch, lengths), conds(batch, seed=9)
    out, x, sigma, _ = one_step(webui, on(branch=branch), cond, neg, cfg, batch, caplog)
    expected = reference(webui, unet, x, sigma, cond, neg, cfg, 2.0, 3.0, branch)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert paths_logged(caplog) == [f"SEG: 1 guided evaluations ({path}: 1)"]


def test_the_rows_ride_in_the_webuis_own_calls(webui, monkeypatch):
    """Batch 2, prompt and negative of one length: one model call per step, 2 rows more."""
    model = webui.shared.sd_model.forge_objects.unet.model
    args = on()
    p = start(webui, args)
    x = torch.randn(2, 4, *LATENT)
    model.calls.clear()
    step(webui, p, x, torch.full((2,), 3.0), conds(2), conds(2, seed=9), 5.0)
    webui.script.postprocess(p, None, *args)
    assert model.calls == [6]


def test_the_blocks_before_the_first_smoothed_one_are_shared(webui):
    """Forge's UNet calls its blocks as modules, ldm_patched's runs their layers one by one: on
    both the first layer of a shared block gets the webui's rows only."""
    net = webui.shared.sd_model.forge_objects.unet.model.diffusion_model
    seen: dict[str, list[int]] = {"input 0": [], "middle": [], "output 0": []}
    args = on()
    p = start(webui, args)  # SEG's prefix hooks are in place: ours go after them
    handles = [block[0].register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].shape[0]))
               for name, block in (("input 0", net.input_blocks[0]), ("middle", net.middle_block),
                                   ("output 0", net.output_blocks[0]))]  # fmt: skip
    try:
        step(webui, p, torch.randn(1, 4, *LATENT), torch.full((1,), 3.0), conds(1), conds(1, seed=9), 5.0)
    finally:
        for handle in handles:
            handle.remove()
    webui.script.postprocess(p, None, *args)
    assert seen == {"input 0": [2], "middle": [3], "output 0": [3]}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_controlnet_residuals_are_copied_with_their_rows(webui, unet, monkeypatch, caplog):
    control = sf.ControlNet()
    cond, neg = conds(2, control=control), conds(2, seed=9, control=control)
    out, x, sigma, _ = one_step(webui, on(), cond, neg, 5.0, 2, caplog)
    assert control.calls[0] == 4  # computed once, for the webui's own rows
    expected = reference(webui, unet, x, sigma, cond, neg, 5.0, 2.0, 3.0, "uncond")
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert paths_logged(caplog) == ["SEG: 1 guided evaluations (shared-prefix: 1)"]
    no_control = reference(webui, unet, x, sigma, conds(2), conds(2, seed=9), 5.0, 2.0, 3.0, "uncond")
    assert not torch.allclose(expected, no_control, atol=1e-3)  # the residuals mattered


def test_memory_the_webui_lacks_is_never_asked_for(webui, unet, monkeypatch, caplog):
    """Room for the webui's 2 rows but not 3: the copies get a call of their own; room for 1 row
    (the webui evaluates each entry alone): so do they. No call exceeds the webui's largest."""
    model = webui.shared.sd_model.forge_objects.unet.model
    per_row = model.memory_required([1, 4, *LATENT])
    cond, neg = conds(1), conds(1, seed=9)
    for rows, largest in ((2, 2), (1, 1)):
        monkeypatch.setattr(sf, "FREE_MEMORY", per_row * rows + 1)
        caplog.clear()
        model.calls.clear()
        out, x, sigma, _ = one_step(webui, on(), cond, neg, 5.0, 1, caplog)
        assert max(model.calls) == largest
        expected = reference(webui, unet, x, sigma, cond, neg, 5.0, 2.0, 3.0, "uncond")
        torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
        assert paths_logged(caplog) == ["SEG: 1 guided evaluations (separate: 1)"]


def test_out_of_memory_in_the_enlarged_call_finishes_the_step(webui, unet, monkeypatch, caplog):
    model = webui.shared.sd_model.forge_objects.unet.model
    apply_model = model.apply_model

    def short_of_memory_above_two_rows(x, *args, **kwargs):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return apply_model(x, *args, **kwargs)

    monkeypatch.setattr(model, "apply_model", short_of_memory_above_two_rows)
    cond, neg = conds(1), conds(1, seed=9)
    out, x, sigma, p = one_step(webui, on(), cond, neg, 5.0, 1, caplog)
    monkeypatch.undo()
    expected = reference(webui, unet, x, sigma, cond, neg, 5.0, 2.0, 3.0, "uncond")
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    assert "SEG warning" not in p.extra_generation_params  # a note, not a failure


def test_a_failure_in_the_enlarged_call_leaves_the_webuis_rows_as_they_were(webui, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("boom")

    x = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(3))
    off = sf.sample(webui, sw.Processing(), x, sw.sigmas(3), conds(1), conds(1, seed=9), 5.0,
                    webui.sampling_function)  # fmt: skip
    monkeypatch.setattr(shared_batch, "blur_queries", broken)
    args = on()
    p = start(webui, args)
    out = sf.sample(webui, p, x, sw.sigmas(3), conds(1), conds(1, seed=9), 5.0, webui.sampling_function)
    webui.script.postprocess(p, None, *args)
    assert "boom" in p.extra_generation_params["SEG warning"]
    assert torch.equal(out, off)


def test_an_interrupt_in_the_enlarged_call_leaves_nothing_behind(webui, monkeypatch):
    model = webui.shared.sd_model.forge_objects.unet.model
    net = model.diffusion_model
    x = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(4))
    baseline = sf.sample(webui, sw.Processing(), x, sw.sigmas(2), conds(1), conds(1, seed=9), 5.0,
                         webui.sampling_function)  # fmt: skip
    apply_model = model.apply_model

    def interrupted(x, *args, **kwargs):
        if x.shape[0] > 2:
            raise KeyboardInterrupt
        return apply_model(x, *args, **kwargs)

    monkeypatch.setattr(model, "apply_model", interrupted)
    p = start(webui, on())
    with pytest.raises(KeyboardInterrupt):
        sf.sample(webui, p, x, sw.sigmas(2), conds(1), conds(1, seed=9), 5.0, webui.sampling_function)
    monkeypatch.setattr(model, "apply_model", apply_model)
    webui.controller.end_pass()  # the next generation's process() does this
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    sf.reset_forge_objects(webui.shared.sd_model)
    again = sf.sample(webui, sw.Processing(), x, sw.sigmas(2), conds(1), conds(1, seed=9), 5.0,
                      webui.sampling_function)  # fmt: skip
    assert torch.equal(again, baseline)


def foreign_wrapper(apply_model, args):
    return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.mark.parametrize("other", ["wrapper", "attn1 replace", "regional", "weighted AND"])
def test_what_the_shared_batch_cannot_map_is_evaluated_separately(webui, unet, monkeypatch, caplog, other):
    """Another extension's model wrapper (MultiDiffusion) or attn1 replace on a smoothed block
    (SAG), regional conditioning, AND parts of different weights (branch cond): the separate path,
    with the same result, and a note saying why."""
    branch, cond, neg = "uncond", conds(1, (4, 4)), conds(1, seed=9)
    base = webui.shared.sd_model.forge_objects_after_applying_lora.unet
    saved = dict(base.model_options)
    if other == "wrapper":
        base.model_options["model_function_wrapper"] = foreign_wrapper
    elif other == "attn1 replace":

        def plain_attention(q, k, v, extra):
            return sf.attention_function(q, k, v, extra["n_heads"])

        base.model_options["transformer_options"] = {
            "patches_replace": {"attn1": {("middle", 0, 0): plain_attention}}
        }
    elif other == "regional":
        neg[0]["area"] = (LATENT[0], LATENT[1], 0, 0)
    else:
        branch, cond = "cond", conds(1, (4, 4), strengths=[1.0, 0.5])
    try:
        out, x, sigma, _ = one_step(webui, on(branch=branch), cond, neg, 5.0, 1, caplog)
    finally:
        base.model_options.clear()
        base.model_options.update(saved)
    expected = reference(webui, unet, x, sigma, cond, neg, 5.0, 2.0, 3.0, branch)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert paths_logged(caplog) == ["SEG: 1 guided evaluations (separate: 1)"]
    assert any("evaluated separately" in r.getMessage() for r in caplog.records)


def test_other_guidance_evaluations_get_no_rows(webui, monkeypatch):
    """A post-CFG function that evaluates the model itself (PAG, SAG) after the step's own
    evaluation: its calls are the webui's as they are."""
    sizes = []

    def other_guidance(args):
        evaluate = sf.calc_cond_uncond_batch
        model = args["model"]
        before = len(model.calls)
        evaluate(model, args["cond"], None, args["input"], args["sigma"], args["model_options"])
        sizes.extend(model.calls[before:])
        return args["denoised"]

    base = webui.shared.sd_model.forge_objects_after_applying_lora.unet
    base.model_options["sampler_post_cfg_function"] = [other_guidance]
    try:
        args = on(branch="cond")
        p = start(webui, args)
        step(webui, p, torch.randn(1, 4, *LATENT), torch.full((1,), 3.0), conds(1), conds(1, seed=9), 5.0)
        webui.script.postprocess(p, None, *args)
    finally:
        del base.model_options["sampler_post_cfg_function"]
    assert sizes == [1]


def test_the_settings_switch_and_steps_off_schedule_keep_the_webuis_calls(webui, monkeypatch):
    model = webui.shared.sd_model.forge_objects.unet.model
    for values, switch, rows in (({"start": 0.5}, True, [2]), ({}, False, [2, 1])):
        monkeypatch.setattr(webui.shared.opts, "seg_one_call", switch, raising=False)
        args = on(**values)
        p = start(webui, args)
        model.calls.clear()
        step(webui, p, torch.randn(1, 4, *LATENT), torch.full((1,), 3.0), conds(1), conds(1, seed=9), 5.0)
        webui.script.postprocess(p, None, *args)
        assert model.calls == rows


@pytest.mark.parametrize("layout", ["forge", "ldm_patched"])
def test_prefix_sharing_refuses_what_could_see_the_reduced_batch(unet, monkeypatch, layout):
    sl.install(monkeypatch)
    net = sf.forge_unet(unet) if layout == "forge" else sl.ldm_patched_unet(unet)
    prefix_of = forge_unet_prefix if layout == "forge" else ldm_patched_unet_prefix
    modules = [m for _, m in resolve_attn1(net, parse_layers("middle"))]
    sharing = prefix_of(net, modules)
    try:
        assert sharing.reason is None
        assert len(sharing.units) == 12
        assert sharing.why_not({"patches": {"output_block_patch": [print]}}) is None
        assert "attn1_patch" in sharing.why_not({"patches": {"attn1_patch": [print]}})
        assert "shared block" in sharing.why_not({"patches_replace": {"attn2": {("input", 4, 0): print}}})
        assert sharing.why_not({"patches_replace": {"attn1": {("output", 4): print}}}) is None
        assert "inside" in sharing.why_not({"block_modifiers": [print]})
        assert "inside" in sharing.why_not({"block_inner_modifiers": [print]})
        assert "wraps" in sharing.why_not({"wrappers": {"diffusion_model": {"x": [print]}}})
        assert sharing.why_not({"wrappers": {"diffusion_model": {}}}) is None
        assert "other hooks" in prefix_of(net, modules).reason  # ours are on the shared blocks now
    finally:
        sharing.remove()
    assert "not" in prefix_of(unet, modules).reason  # an ldm UNet: not this host's layout
    first = [m for _, m in resolve_attn1(net, parse_layers("input 1"))]
    (unit,) = prefix_of(net, first).units
    block = net.input_blocks[0]
    assert unit.exit is (block if layout == "forge" else block[-1])
    monkeypatch.setattr(type(net), "forward", lambda self, *a, **k: None)
    assert "not the webui's own" in prefix_of(net, modules).reason


def test_ldm_patched_sharing_needs_its_own_layer_caller(unet, monkeypatch):
    sl.install(monkeypatch)
    net = sl.ldm_patched_unet(unet)
    modules = [m for _, m in resolve_attn1(net, parse_layers("middle"))]
    openaimodel = sys.modules[sl.OPENAIMODEL]
    monkeypatch.setattr(openaimodel, "forward_timestep_embed", lambda *a, **k: None)
    assert "forward_timestep_embed is not the webui's own" in ldm_patched_unet_prefix(net, modules).reason


def test_chunk_layout_keys_follow_the_copies():
    options = {"cond_or_uncond": [0, 1], "cond_mark": torch.tensor([0.0, 0, 1, 1]), "uuids": ["a", "b"],
               "cond_indices": [0, 1], "uncond_indices": [2, 3], "other": 1}  # fmt: skip
    out = shared_batch.options_for_chunks(options, [0, 1, 1], [0, 1], 2)
    assert out["cond_or_uncond"] == [0, 1, 1] and out["uuids"] == ["a", "b", "b"]
    assert out["cond_mark"].tolist() == [0, 0, 1, 1, 1, 1]
    assert out["cond_indices"] == [0, 1] and out["uncond_indices"] == [2, 3, 4, 5]
    assert options["cond_or_uncond"] == [0, 1] and out["other"] == 1


def test_the_rows_patch_blurs_only_the_copies():
    from lib_seg import blur_queries

    patch = shared_batch.make_rows_attn1_replace(math.inf, lambda q, k, v, heads: q)
    q = torch.randn(3, 6 * 8, 16)
    original = q.clone()
    out = patch(q, q, q, {shared_batch.ROWS_KEY: 2, "original_shape": [3, 4, 6, 8], "n_heads": 2})
    assert torch.equal(out[:2], original[:2])
    torch.testing.assert_close(out[2:], blur_queries(original[2:], 6, 8, math.inf))


def test_marked_functions_survive_the_patchers_deep_copy():
    import copy

    from lib_seg.backends.model_patcher.guidance import _marked

    function = _marked(lambda: 1)
    assert copy.deepcopy({"f": function})["f"] is function and hasattr(function, MARKER)


def test_the_path_log_reaches_a_webui_whose_root_logger_says_warning(monkeypatch, capsys):
    """reForge configures the root logger (handlers, level WARNING): SEG's info lines, the path
    log included, still reach its handlers."""
    seg_log = logging.getLogger("sd_webui_seg")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(seg_log, "handlers", [])
    monkeypatch.setattr(seg_log, "level", logging.NOTSET)
    monkeypatch.setattr(seg_log, "propagate", True)
    webui = sw.install(monkeypatch)
    sw.load_script(webui)
    seg_log.info("SEG: 1 guided evaluations (one-call: 1)")
    assert "guided evaluations (one-call: 1)" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["shared-prefix", "separate"])
def test_an_sd2_unet_equals_the_a1111_path(webui, monkeypatch, caplog, path):
    """SD2's layout (linear projections, fixed head width, 1024-wide text) on each webui's UNet
    layout: the same step as the A1111 code path on the same UNet."""
    from unets import sd2_unet

    unet = sd2_unet(model_channels=32, context_dim=CTX)
    webui.shared.sd_model = webui.standin.forge_model(unet)
    use_path(webui, monkeypatch, path)
    cond, neg = conds(2, (4, 4)), conds(2, seed=9)
    out, x, sigma, _ = one_step(webui, on(), cond, neg, 6.0, 2, caplog)
    expected = reference(webui, unet, x, sigma, cond, neg, 6.0, 2.0, 3.0, "uncond")
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert paths_logged(caplog) == [f"SEG: 1 guided evaluations ({path}: 1)"]
