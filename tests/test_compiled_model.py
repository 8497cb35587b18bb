"""A compiled model call (Forge Neo's built-in *Compile* wraps ``KModel.apply_model`` so that each
call runs ``torch.compile`` of the diffusion model): SEG's rows stay out of the compiled call and
its smoothed evaluation runs eagerly, so the image equals SEG's image without compile, and the
compiled graph never meets a SEG hook, patch or extra row."""

import logging

import pytest
import standin_forge as sf
import standin_forge_transformers as st
import standin_webui as sw
import torch
from unets import sd1_unet

from lib_seg import SEGParams
from lib_seg.backends.model_patcher.compiled import eager, is_compiled


def compile_like_neo(kmodel, rows):
    """What Neo's ``sd_forge_compile`` does to the KModel (our own code, same attributes)."""
    kmodel._orig_apply_model = kmodel.apply_model

    def apply_model_with_compile(x, *args, **kwargs):
        eager_model = kmodel.diffusion_model
        kmodel.diffusion_model = torch.compile(eager_model, backend="eager", dynamic=False)
        rows.append(int(x.shape[0]))
        try:
            return kmodel._orig_apply_model(x, *args, **kwargs)
        finally:
            kmodel.diffusion_model = eager_model

    kmodel.apply_model = apply_model_with_compile


@pytest.fixture
def webui(monkeypatch):
    ui = sw.install(monkeypatch)
    ui.nn = st.install(monkeypatch)
    sw.attach_script(ui)
    yield ui
    assert not ui.callbacks.errors, ui.callbacks.errors


def run(webui, args, x, cond, neg, cfg):
    p = sw.Processing()
    webui.script.process(p, *args)
    sf.reset_forge_objects(webui.shared.sd_model)
    webui.script.process_before_every_sampling(p, *args)
    out = sf.sample(webui, p, x, sw.sigmas(2), cond, neg, cfg)
    webui.script.postprocess(p, None, *args)
    return out, p


def unet_case():
    torch.manual_seed(0)
    model = sd1_unet(model_channels=32, context_dim=32)
    g = torch.Generator().manual_seed(1)
    cond = [{"cross_attn": torch.randn(1, 4, 32, generator=g), "strength": 1.0}]
    neg = [{"cross_attn": torch.randn(1, 4, 32, generator=g), "strength": 1.0}]
    return model, torch.randn(1, 4, 16, 16, generator=g), cond, neg, 5.0, "middle"


def flux_case(webui):
    model = st.build(webui.nn, "flux")
    x = torch.randn(1, 4, 7, 10, generator=torch.Generator().manual_seed(1))
    return model, x, st.conds(1, "flux"), st.conds(1, "flux", seed=9), 1.0, "double 1-2"


@pytest.mark.parametrize("case", ["unet", "flux"])
def test_a_compiled_call_gives_the_eager_image_and_never_meets_seg(webui, monkeypatch, caplog, case):
    model, x, cond, neg, cfg, layers = unet_case() if case == "unet" else flux_case(webui)
    args = SEGParams.from_values({"enabled": True, "layers": layers, "sigma": 2.0}).to_args()
    webui.shared.sd_model = sf.forge_model(model)
    webui.shared.sd_model.is_sd1 = case == "unet"
    eager_off, _ = run(webui, [False], x, cond, neg, cfg)
    monkeypatch.setattr(webui.shared.opts, "seg_one_call", False, raising=False)  # the same path, eager
    eager_on, _ = run(webui, args, x, cond, neg, cfg)
    monkeypatch.setattr(webui.shared.opts, "seg_one_call", True, raising=False)
    rows = []
    compile_like_neo(webui.shared.sd_model.forge_objects.unet.model, rows)
    with caplog.at_level(logging.INFO, logger="sd_webui_seg"):
        compiled_on, p = run(webui, args, x, cond, neg, cfg)
    assert "SEG warning" not in p.extra_generation_params
    torch.testing.assert_close(compiled_on, eager_on, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compiled_on, eager_off)
    webui_rows = 1 if cfg == 1 else 2
    assert rows and all(count <= webui_rows for count in rows)  # no SEG row in a compiled call
    if case == "unet":
        assert "compiled (torch.compile)" in caplog.text


def test_eager_puts_every_attribute_back():
    kmodel = sf.KModel(torch.nn.Linear(2, 2))
    assert not is_compiled(kmodel)
    rows = []
    compile_like_neo(kmodel, rows)
    wrapper = kmodel.apply_model
    assert is_compiled(kmodel)
    with eager(kmodel):
        assert kmodel.apply_model == kmodel._orig_apply_model
    assert kmodel.apply_model is wrapper
    compiled = torch.compile(kmodel.diffusion_model, backend="eager")
    net = kmodel.diffusion_model
    kmodel.diffusion_model = compiled
    with pytest.raises(KeyboardInterrupt), eager(kmodel):
        assert kmodel.diffusion_model is net
        raise KeyboardInterrupt
    assert kmodel.diffusion_model is compiled and kmodel.apply_model is wrapper
