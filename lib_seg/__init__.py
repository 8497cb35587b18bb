"""Smoothed Energy Guidance (Hong, NeurIPS 2024): pure torch, no webui imports."""

__version__ = "1.5.0"  # the one place: the start-up log shows it, CHANGELOG.md's newest entry matches

from .blur import blur_operator, blur_queries, is_identity_sigma, is_mean_sigma, kernel_length
from .grid import token_grid
from .guidance import BRANCHES, guided, seg_term, smoothed_source
from .layers import LayerSelection, parse_layers, resolve_attn1
from .params import ARG_NAMES, INFOTEXT_KEYS, SEGParamError, SEGParams
from .schedule import is_active_step

__all__ = [
    "ARG_NAMES",
    "BRANCHES",
    "INFOTEXT_KEYS",
    "LayerSelection",
    "SEGParamError",
    "SEGParams",
    "__version__",
    "blur_operator",
    "blur_queries",
    "guided",
    "is_active_step",
    "is_identity_sigma",
    "is_mean_sigma",
    "kernel_length",
    "parse_layers",
    "resolve_attn1",
    "seg_term",
    "smoothed_source",
    "token_grid",
]
