"""What SEG smooths in a loaded diffusion model, from the user's block selection: a UNet's
``attn1`` layers or a transformer's blocks. Host-free (webuis and ComfyUI hand in the model);
every refusal is a message for the user, never an exception."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import transformers
from .layers import resolve_attn1
from .params import SEGParams

UNET_BLOCK_LISTS = ("input_blocks", "middle_block", "output_blocks")


@dataclass
class Target:
    """What SEG smooths in the loaded model: UNet attn1 layers, or transformer blocks."""

    names: list[str]
    unet: nn.Module | None = None
    attn1_modules: list[nn.Module] = field(default_factory=list)
    family: transformers.Family | None = None
    transformer: nn.Module | None = None
    blocks: list[nn.Module] = field(default_factory=list)

    def describe(self) -> str:
        what = "attn1 layers" if self.unet is not None else f"{self.family.name} blocks"
        return f"{len(self.names)} {what}: {', '.join(self.names)}"


def is_unet(model: object) -> bool:
    """An SD1/SD2/SDXL-layout UNet (ldm, sgm, Forge, ldm_patched, ComfyUI)."""
    return isinstance(model, nn.Module) and all(hasattr(model, name) for name in UNET_BLOCK_LISTS)


def unet_target(unet: nn.Module, params: SEGParams) -> Target | str:
    """The UNet's chosen ``attn1`` layers, or why there are none."""
    matched = resolve_attn1(unet, params.selection)
    if not matched:
        names_dit = params.selection.names_transformer_blocks()
        hint = " (double/single/joint name transformer blocks)" if names_dit else ""
        return (f"SEG layers '{params.layers}' match no self-attention in this UNet{hint}; generated "
                "without SEG")  # fmt: skip
    return Target([name for name, _ in matched], unet=unet, attn1_modules=[module for _, module in matched])


def transformer_target(
    model: nn.Module, family: transformers.Family, params: SEGParams
) -> tuple[Target | None, list[str]]:
    """The transformer's chosen blocks (None when none), and the messages for the user: why none,
    or which named blocks this model lacks."""
    try:
        chosen, missing = transformers.resolve_blocks(model, family, params.selection)
        has = transformers.describe_blocks(model, family)
    except Exception as error:  # a release that moved the block lists: fail soft
        return None, [f"SEG: this {family.name} model's blocks are not laid out as SEG knows ({error}); "
                      "generated without SEG"]  # fmt: skip
    if not chosen:
        return None, [f"SEG blocks '{params.layers}' match no block of this {family.name} model ({has}); "
                      "generated without SEG"]  # fmt: skip
    notes = [f"SEG: this {family.name} model has no {', '.join(missing)} ({has}); smoothing the other "
             "blocks"] if missing else []  # fmt: skip
    target = Target([name for name, _ in chosen], family=family, transformer=model,
                    blocks=[block for _, block in chosen])  # fmt: skip
    return target, notes


def unknown_model_message(where: str) -> str:
    known = ", ".join(family.name for family in transformers.FAMILIES)
    return (f"SEG: this model has no SD1/SD2/SDXL UNet self-attention nor a transformer SEG knows ({known}; "
            f"{where}) to smooth; generated without SEG")  # fmt: skip
