"""Forge's diffusion-transformer modules for the tests: ``tests/forge_nn/{flux,chroma,mmditx}.py``
(small models written for these tests) loaded under Forge's module names ``backend.nn.flux``,
``backend.nn.chroma`` and ``backend.nn.mmditx``, importing ``attention_function`` from the
stand-in ``backend.attention``, so SEG finds their kernels the way it does in Forge."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import standin_forge as sf
import torch

HERE = Path(__file__).parent / "forge_nn"
CONTEXT_DIM, VEC_DIM = 16, 8


def install(monkeypatch):
    """Forge's backend stand-in plus ``backend.nn.*``; returns the three modules by short name."""
    sf.install(monkeypatch)
    nn_package = types.ModuleType("backend.nn")
    nn_package.__path__ = []
    monkeypatch.setitem(sys.modules, "backend.nn", nn_package)
    loaded = {}
    for name in ("flux", "chroma", "mmditx"):
        spec = importlib.util.spec_from_file_location(f"backend.nn.{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        setattr(nn_package, name, module)
        loaded[name] = module
    return loaded


def build(modules, family, seed=0, **kwargs):
    """A random-weight model of ``family`` ("flux", "flux-schnell", "chroma", "sd3") in eval mode."""
    torch.manual_seed(seed)
    if family == "flux":
        model = modules["flux"].IntegratedFluxTransformer2DModel(**kwargs)
    elif family == "flux-schnell":
        model = modules["flux"].IntegratedFluxTransformer2DModel(guidance_embed=False, **kwargs)
    elif family == "chroma":
        model = modules["chroma"].IntegratedChromaTransformer2DModel(**kwargs)
    else:
        model = modules["mmditx"].MMDiTX(**kwargs)
    return model.eval()


def conds(batch, family, tokens=5, seed=0, guidance=3.5, strength=1.0):
    """One Forge cond entry: text, pooled vector, and Flux-dev's distilled guidance value."""
    g = torch.Generator().manual_seed(seed)
    entry = {"cross_attn": torch.randn(batch, tokens, CONTEXT_DIM, generator=g), "strength": strength}
    if family != "chroma":
        entry["y"] = torch.randn(batch, VEC_DIM, generator=g)
    if family == "flux":
        entry["guidance"] = torch.full((batch,), guidance)
    return [entry]


def model_inputs(family, batch, tokens=5, latent=(8, 8), seed=0):
    """Positional/keyword inputs for a direct call of the model (what KModel hands it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *latent, generator=g)
    t = torch.rand(batch, generator=g)
    kwargs = {"context": torch.randn(batch, tokens, CONTEXT_DIM, generator=g)}
    if family != "chroma":
        kwargs["y"] = torch.randn(batch, VEC_DIM, generator=g)
    if family == "flux":
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return x, t, kwargs
