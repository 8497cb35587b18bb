"""Forge Neo's diffusion-transformer modules for the tests: ``tests/neo_nn/<name>.py`` (small
models written for these tests in Neo's module layout) loaded under Neo's module names
``backend.nn.<name>``, each importing ``attention_function`` from the stand-in
``backend.attention`` into its own globals, so SEG finds their kernels the way it does in Neo.

Each ``tests/neo_nn`` module offers the same test surface:

Neo's own ``backend/nn/flux.py`` is there too (the Forge test Flux, ``tests/forge_nn/flux.py``):
Neo's Krea-2 and Flux.2 code import its RoPE and embeddings, and the test models do the same.

- ``FAMILY``: the ``lib_seg.transformers`` family name it is detected as;
- ``build(seed=0, **shape)``: a small random-weight model in eval mode (``BENCH_SHAPE``: the real
  model's block count at a reduced width, for ``bench/transformer_step.py``, with ``VAE_SCALE``,
  the image pixels per latent cell, where it is not 8);
- ``latent(batch, height, width, generator)``: the latent Neo hands the model for an image of that
  latent size (a video model: a few frames);
- ``conds(batch, tokens=5, seed=0)``: one Forge cond entry list (``cross_attn`` plus the extra
  conditioning Neo's KModel hands the model as keyword arguments);
- ``reference_layout(latent, conds)``: the ``CallLayout`` written out for the tests from the
  model's own patchification, independent of ``lib_seg``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import standin_forge as sf

HERE = Path(__file__).parent / "neo_nn"
FORGE_NN = Path(__file__).parent / "forge_nn"
NAMES = tuple(sorted(path.stem for path in HERE.glob("*.py") if not path.stem.startswith("_")))


def install(monkeypatch, names=NAMES):
    """Forge's backend stand-in plus ``backend.nn.<name>`` for each name; returns them by name."""
    sf.install(monkeypatch)
    package = sys.modules.get("backend.nn")
    if package is None:
        package = types.ModuleType("backend.nn")
        package.__path__ = []
        monkeypatch.setitem(sys.modules, "backend.nn", package)
    if "backend.nn.flux" not in sys.modules:  # Neo's families import Flux's RoPE and embeddings
        _load(monkeypatch, package, "flux", FORGE_NN / "flux.py")
    return {name: _load(monkeypatch, package, name, HERE / f"{name}.py") for name in names}


def _load(monkeypatch, package, name, path):
    spec = importlib.util.spec_from_file_location(f"backend.nn.{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(package, name, module, raising=False)
    return module
