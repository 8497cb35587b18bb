"""What ComfyUI's diffusion transformers add to the families' facts (found by running ComfyUI's own
classes, ``docs/comfyui.md``): models with Flux's block lists but another token order are not Flux,
SD3's padded patch embedder gives a rounded-up grid, Wan Fun's reference image comes before the
video, ComfyUI's NextDiT places the image after each row's effective caption."""

from __future__ import annotations

import pytest
import standin_forge_transformers as st
import standin_neo_transformers as neo
import torch
from torch import nn

from lib_seg import transformers


@pytest.fixture
def forge_modules(monkeypatch):
    return st.install(monkeypatch)


@pytest.fixture
def neo_modules(monkeypatch):
    return neo.install(monkeypatch, names=("wan", "lumina"))


@pytest.mark.parametrize("change", ["flipped_img_txt", "list_patch_size", "no_img_in"])
def test_hunyuan_models_with_flux_block_lists_are_not_flux(forge_modules, change):
    model = st.build(forge_modules, "flux")
    assert transformers.family_of(model) is transformers.FLUX
    if change == "flipped_img_txt":  # HunyuanVideo / HunyuanImage 2.1: image tokens before the text
        model.double_blocks[0].flipped_img_txt = True
    elif change == "list_patch_size":  # HunyuanVideo's [1, 2, 2]
        model.patch_size = [1, 2, 2]
    else:  # Hunyuan3D 2.0: shape latents through latent_in
        model.latent_in = model.img_in
        del model.img_in
    assert transformers.family_of(model) is None


def test_sd3_with_a_padding_patch_embedder_rounds_the_grid_up(forge_modules):
    model = st.build(forge_modules, "sd3")
    context = torch.randn(1, 5, st.CONTEXT_DIM)
    x = torch.randn(1, 4, 7, 9)
    registers = int(getattr(model, "register_length", 0) or 0)
    assert transformers.SD3.layout(model, (x,), {"context": context}) == transformers.CallLayout(
        1, 3, 4, before=registers + 5
    )
    model.x_embedder.dynamic_img_pad = True  # ComfyUI's PatchEmbed pads to the patch
    assert transformers.SD3.layout(model, (x,), {"context": context}) == transformers.CallLayout(
        1, 4, 5, before=registers + 5
    )


def test_wan_fun_reference_tokens_come_before_the_video(neo_modules):
    module = neo_modules["wan"]
    model = module.build()
    x = module.latent(1, 8, 10, torch.Generator().manual_seed(0))
    context = torch.randn(1, 5, module.TEXT_DIM)
    call = (x, torch.zeros(1), context)
    plain = transformers.WAN.layout(model, call, {})
    reference = {"reference_latent": torch.randn(1, 4, 8, 10)}
    assert transformers.WAN.layout(model, call, reference) == plain
    model.ref_conv = nn.Conv2d(4, 8, kernel_size=2, stride=2)  # Wan Fun's in_dim_ref_conv
    with_reference = transformers.WAN.layout(model, call, reference)
    assert with_reference == transformers.CallLayout(plain.frames, plain.height, plain.width, before=4 * 5)
    tokens = 4 * 5 + plain.image_tokens
    assert transformers.WAN.image_start(with_reference, tokens) == 4 * 5


def test_comfyuis_nextdit_places_the_image_after_each_rows_effective_caption(neo_modules):
    module = neo_modules["lumina"]
    model = module.build(variant="Lumina 2")
    comfy_class = type("NextDiT", (type(model),), {"__module__": "comfy.ldm.lumina.model"})
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 6, 8)
    family = transformers.family_of(model)
    assert family is transformers.LUMINA2
    assert family.layout(model, (x, torch.zeros(2), context), {"num_tokens": 4}).before == 6  # Neo
    model.__class__ = comfy_class
    assert family.layout(model, (x, torch.zeros(2), context, 4), {}).before == 4
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert family.layout(model, (x, torch.zeros(2), context, 6), {"attention_mask": mask}).before == 3
    with pytest.raises(ValueError, match="different lengths"):
        uneven = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
        family.layout(model, (x, torch.zeros(2), context, 6), {"attention_mask": uneven})
