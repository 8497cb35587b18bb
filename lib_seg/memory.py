"""Recognising the webui's out-of-memory error, so SEG can give way instead of failing a step."""

from __future__ import annotations

import torch


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError`` (what A1111 and Forge raise), or another backend's
    "out of memory" ``RuntimeError`` (MPS, DirectML)."""
    out_of_memory = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, out_of_memory) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
