"""What the transformer tests share: SEG's smoothing for a model and a block selection, built the
way the script builds it (kernels looked up from the chosen blocks' self-attention modules)."""

from __future__ import annotations

from lib_seg import parse_layers, transformers
from lib_seg.backends.model_patcher import forge


def smoothing_for(model, layers: str, sigma: float):
    """``(TransformerSmoothing, qualified names of the chosen blocks)``."""
    family = transformers.family_of(model)
    chosen, _ = transformers.resolve_blocks(model, family, parse_layers(layers))
    blocks = [block for _, block in chosen]
    scopes = [scope for block in blocks for scope in family.attention_scopes(block)]
    slots = forge.transformer_kernels(family.name, scopes)
    smoothing = transformers.TransformerSmoothing(model, family, blocks, slots, sigma)
    return smoothing, [name for name, _ in chosen]
