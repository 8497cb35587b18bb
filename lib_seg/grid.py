"""Token grid of an attention layer, from the UNet input latent size (never from √N)."""

from __future__ import annotations

from functools import lru_cache

# SD1/SD2 have 4 levels, SDXL 3; a few spare levels cost nothing and cover deeper UNets.
MAX_LEVELS = 8


def level_size(latent_height: int, latent_width: int, level: int) -> tuple[int, int]:
    """Grid of UNet level ``level``: each stride-2, padding-1 conv maps L to ceil(L / 2)."""
    height, width = latent_height, latent_width
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


@lru_cache(maxsize=256)
def token_grid(n_tokens: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """Return the (H, W) token grid of an attention layer with ``n_tokens`` tokens.

    The layer sits at some UNet level k whose grid is (ceil(h / 2^k), ceil(w / 2^k)) for the
    input latent (h, w); the level whose token count equals ``n_tokens`` is the answer.
    Raises ValueError when no level matches (the tokens are not a grid of this latent).
    """
    if latent_height < 1 or latent_width < 1:
        raise ValueError(f"latent size must be positive, got {latent_height}x{latent_width}")
    for level in range(MAX_LEVELS + 1):
        height, width = level_size(latent_height, latent_width, level)
        if height * width == n_tokens:
            return height, width
        if height * width < n_tokens or (height == 1 and width == 1):
            break
    raise ValueError(f"{n_tokens} tokens match no UNet level of a {latent_height}x{latent_width} latent")
