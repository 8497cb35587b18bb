"""Where SEG meets each webui: one home per backend, above the pure core (blur, grid, guidance,
schedule, layers, params).

- ``a1111/``: AUTOMATIC1111 (ldm/sgm UNets). Module hooks on ``attn1.to_q`` and the CFG-denoiser
  callbacks; the smoothed rows ride in the webui's own UNet call.
- ``model_patcher``: what every Forge-family webui shares. A cloned UNet patcher with SEG's
  functions: the smoothed rows ride in the webui's own batched model calls (``shared_batch``,
  with the blocks before the first smoothed one shared by ``prefix_sharing``, on UNets and
  transformers alike), or the post-CFG function evaluates the smoothed branch separately through
  the webui's batch evaluator.
- ``forge``: lllyasviel's Forge (``backend/``) entry points for ``model_patcher``.
- ``ldm_patched``: reForge and Forge Classic (``ldm_patched``, a port of ComfyUI's patcher and
  samplers) entry points for ``model_patcher``.

The backend is chosen from the loaded model (``backend_of``), never from a version string or a
folder name, so one install serves every webui and a model switch mid-session is followed.
"""

from __future__ import annotations

from .model_patcher import forge, ldm_patched

A1111 = "a1111"
PATCHER_BACKENDS = (forge, ldm_patched)


def unet_patcher_of(sd_model):
    """The Forge-family UNet patcher the webui samples with, or None on A1111."""
    objects = getattr(sd_model, "forge_objects", None)
    return getattr(objects, "unet", None) if objects is not None else None


def patcher_backend_of(patcher):
    """The module (``forge`` or ``ldm_patched``) whose package defines ``patcher``'s class or one
    of its bases (reForge's ``modules_forge`` ``UnetPatcher`` subclasses ldm_patched's), or None."""
    packages = {cls.__module__.split(".")[0] for cls in type(patcher).__mro__}
    return next((backend for backend in PATCHER_BACKENDS if backend.PACKAGE in packages), None)


def backend_of(sd_model) -> str | None:
    """``"a1111"``, ``"forge"``, ``"ldm_patched"``, or None for a Forge-family model whose patcher
    SEG does not know."""
    patcher = unet_patcher_of(sd_model)
    if patcher is None:
        return A1111
    backend = patcher_backend_of(patcher)
    return backend.NAME if backend is not None else None
