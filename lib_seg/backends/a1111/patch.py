"""Smoothed self-attention inside a real UNet: a forward hook on ``attn1.to_q``.

Every attention implementation a webui swaps in (sdp, xformers, sub-quadratic, split, the
original) starts with ``self.to_q(x)``, so blurring the ``to_q`` output changes the queries and
nothing else, whatever runs after it. Only the batch rows in ``rows`` are blurred; the others are
left bit-identical. The hooks live exactly as long as the patch: use it as a context manager (or
call ``remove``), which also holds when sampling raises or is interrupted.

A wrapper around ``attn1`` may hand ``to_q`` other tokens than the layer's image grid. A1111's
Hypertile splits each image into tiles before ``to_q`` (``batch × tiles`` rows of ``tokens /
tiles``): the patch then reassembles each smoothed image from its tiles, blurs the queries over the
whole image grid and splits them again, so SEG smooths exactly what it smooths without Hypertile
and only the attention stays tile-local. The tile layout is not guessed: it is verified against
the tokens ``attn1`` received. Token merging hands attn1 fewer tokens than the grid has; those
layers cannot be blurred exactly and are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch
from torch import nn

from ...blur import blur_queries
from ...grid import level_size, token_grid
from ...layers import attn1_levels

log = logging.getLogger("sd_webui_seg")

Rows = slice | Sequence[int] | torch.Tensor | None


@lru_cache(maxsize=64)
def _tile_order(grid_h: int, grid_w: int, tiles_h: int, tiles_w: int, device: torch.device) -> torch.Tensor:
    """Token positions, in the row-major grid, of the tokens of ``tiles_h × tiles_w`` tiles laid
    out tile after tile (Hypertile's ``b (nh h nw w) c -> (b nh nw) (h w) c``); cached per device
    so a step copies nothing to the GPU."""
    order = torch.arange(grid_h * grid_w).view(tiles_h, grid_h // tiles_h, tiles_w, grid_w // tiles_w)
    return order.permute(0, 2, 1, 3).reshape(-1).to(device)


def _tile_orders(height: int, width: int, tiles: int):
    """Every tile order of ``tiles`` tiles over the (height, width) grid, and over its transpose
    (a wrapper that reads the row-major sequence as width × height tiles it that way)."""
    grids = [(height, width)] if height == width else [(height, width), (width, height)]
    for grid_h, grid_w in grids:
        for tiles_h in range(1, tiles + 1):
            if tiles % tiles_h or grid_h % tiles_h or grid_w % (tiles // tiles_h):
                continue
            yield (grid_h, grid_w, tiles_h, tiles // tiles_h)


class QueryBlurPatch:
    """Blur the queries of ``rows`` in the given ``attn1`` modules while installed.

    ``rows`` indexes the batch of each UNet call: ``None`` blurs nothing (the patch is idle),
    ``slice(None)`` blurs every row. The token grid comes from the latent size of the UNet call,
    captured by a pre-hook on ``unet`` (or set ``latent_hw`` by hand), and from each layer's level
    in ``unet`` when it is given.
    """

    def __init__(
        self,
        attn1_modules: Iterable[nn.Module],
        sigma: float,
        unet: nn.Module | None = None,
        latent_hw: tuple[int, int] | None = None,
    ):
        modules = list(attn1_modules)
        self.sigma = float(sigma)
        self.latent_hw = latent_hw
        self.blurred_calls = 0
        self.tiled_calls = 0
        self.failure: str | None = None
        self._rows: slice | torch.Tensor | None = None
        levels = attn1_levels(unet) if unet is not None else {}
        self._unet = unet
        self._level = {id(m.to_q): levels.get(id(m)) for m in modules}
        self._owner = {id(m.to_q): id(m) for m in modules}
        self._attn1_input: dict[int, torch.Tensor] = {}
        self._last_tiling: tuple[int, int, int, int] | None = None
        self._handles = [m.register_forward_pre_hook(self._remember_input) for m in modules]
        self._handles += [m.to_q.register_forward_hook(self._blur_hook) for m in modules]
        if unet is not None:
            self._handles.append(unet.register_forward_pre_hook(self._capture_latent, with_kwargs=True))

    @property
    def rows(self) -> slice | torch.Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: Rows) -> None:
        if rows is None or isinstance(rows, slice):
            self._rows = rows
        else:
            index = torch.as_tensor(rows)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            self._rows = index.to(torch.long) if index.numel() else None
        if self._rows is None:
            self._attn1_input.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attn1_input.clear()

    def __enter__(self) -> QueryBlurPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _capture_latent(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            self.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))

    def _remember_input(self, module: nn.Module, args: tuple) -> None:
        # attn1's own input, before a wrapper on its forward (Hypertile) retiles it
        if self._rows is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            self._attn1_input[id(module)] = args[0]

    def _fail(self, message: str) -> None:
        # Raising inside the UNet would abort the user's generation; an unblurred row only makes
        # the SEG term zero, so warn once and let sampling go on.
        if self.failure is None:
            log.warning("SEG: %s; smoothed attention skipped", message)
        self.failure = message

    def _grid(self, to_q: nn.Module, n_tokens: int) -> tuple[int, int] | None:
        level = self._level.get(id(to_q))
        if level is None:
            return token_grid(n_tokens, *self.latent_hw)
        height, width = level_size(*self.latent_hw, level)
        if height * width == n_tokens:
            return height, width
        reason = (
            "token merging (Settings → Optimizations → Token merging ratio) merges the tokens of a "
            "smoothed layer, so they no longer form the image grid; set the ratio to 0 or smooth "
            "blocks it leaves alone (e.g. middle)"
            if self._token_merging_on()
            else "another extension changed the tokens of a smoothed layer"
        )
        self._fail(f"{reason} ({n_tokens} tokens where the {height}x{width} grid has {height * width})")
        return None

    def _token_merging_on(self) -> bool:
        return self._unet is not None and any(type(m).__name__ == "ToMeBlock" for m in self._unet.modules())

    def _blur_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        rows = self._rows
        if rows is None:
            return None
        untiled = self._attn1_input.pop(self._owner.get(id(module)), None)
        if self.latent_hw is None:
            self._fail("the latent size of the UNet call is unknown")
            return None
        batch, n_tokens = (untiled.shape[0], untiled.shape[1]) if untiled is not None else output.shape[:2]
        try:
            grid = self._grid(module, n_tokens)
        except ValueError as error:
            self._fail(str(error))
            return None
        if grid is None:
            return None
        tiles, remainder = divmod(output.shape[0], batch)
        if remainder or output.shape[1] * tiles != n_tokens:
            self._fail(f"attn1 queries shaped {tuple(output.shape)} do not fit {batch} images of "
                       f"{n_tokens} tokens")  # fmt: skip
            return None
        if isinstance(rows, slice):
            rows = torch.arange(batch)[rows]
        elif int(rows.max()) >= batch:
            self._fail(f"row {int(rows.max())} is outside a batch of {batch}")
            return None
        if tiles == 1:
            return self._blur_rows(output, rows, grid)
        return self._blur_tiled_rows(output, inputs[0], untiled, rows, grid, tiles)

    def _blur_rows(self, output: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int]):
        if rows.numel() == output.shape[0]:
            blurred = blur_queries(output, *grid, self.sigma)
            self.blurred_calls += blurred is not output
            return blurred
        if rows.device != output.device:
            cached = rows is self._rows
            rows = rows.to(output.device)
            if cached:  # the same rows serve every call of a step: move them once
                self._rows = rows
        selected = output[rows]
        blurred = blur_queries(selected, *grid, self.sigma)
        if blurred is selected:
            return None
        if output.requires_grad:
            output = output.clone()
        output[rows] = blurred
        self.blurred_calls += 1
        return output

    def _blur_tiled_rows(self, output, tiled_input, untiled, rows, grid, tiles: int):
        if untiled is None or not isinstance(tiled_input, torch.Tensor):
            self._fail("attn1's tokens are split into tiles by a wrapper SEG cannot see through")
            return None
        order = self._verified_tile_order(tiled_input, untiled, rows, grid, tiles)
        if order is None:
            self._fail(f"attn1's tokens are split into {tiles} tiles in a layout SEG does not recognise")
            return None
        n_tokens, channels = untiled.shape[1], output.shape[-1]
        device = output.device
        tiled_rows = (rows.to(device)[:, None] * tiles + torch.arange(tiles, device=device)).flatten()
        queries = output[tiled_rows].reshape(len(rows), n_tokens, channels)
        on_grid = torch.empty_like(queries)
        on_grid[:, order] = queries
        blurred = blur_queries(on_grid, *grid, self.sigma)
        if blurred is on_grid:
            return None
        if output.requires_grad:
            output = output.clone()
        output[tiled_rows] = blurred[:, order].reshape(len(rows) * tiles, -1, channels)
        self.blurred_calls += 1
        self.tiled_calls += 1
        return output

    def _verified_tile_order(self, tiled_input, untiled, rows, grid, tiles: int) -> torch.Tensor | None:
        """The tile order under which ``attn1``'s input became ``to_q``'s input, checked on the
        smoothed rows' tokens (the last layout found is tried first: a pass rarely changes it)."""
        batch, n_tokens, channels = untiled.shape
        if tiled_input.shape[0] != batch * tiles or tiled_input.shape[-1] != channels:
            return None
        rows = rows.to(untiled.device)
        seen = tiled_input.reshape(batch, n_tokens, channels)[rows]
        original = untiled[rows]
        candidates = list(_tile_orders(*grid, tiles))
        if self._last_tiling in candidates:
            candidates.remove(self._last_tiling)
            candidates.insert(0, self._last_tiling)
        for candidate in candidates:
            order = _tile_order(*candidate, untiled.device)
            if torch.equal(seen, original[:, order]):
                self._last_tiling = candidate
                return order
        return None
