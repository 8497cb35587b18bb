"""Smoothed Energy Guidance: ComfyUI glue. All behaviour lives in ``lib_seg`` (``lib_seg.comfyui``)."""

from .lib_seg import __version__
from .lib_seg.comfyui import NODE_DESCRIPTION, NODE_TITLE, apply_seg, log, node_inputs


class SmoothedEnergyGuidance:
    DESCRIPTION = NODE_DESCRIPTION
    CATEGORY = "model_patches"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):  # ComfyUI's name
        return node_inputs()

    def patch(self, model, **values):
        return (apply_seg(model, **values),)


NODE_CLASS_MAPPINGS = {"SmoothedEnergyGuidance": SmoothedEnergyGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"SmoothedEnergyGuidance": NODE_TITLE}
log.info("Smoothed Energy Guidance %s: ComfyUI node %s", __version__, NODE_TITLE)
