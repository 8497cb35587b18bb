"""Smoothed self-attention inside a real UNet: a forward hook on ``attn1.to_q``.

Every attention implementation a webui swaps in (sdp, xformers, sub-quadratic, split, the
original) starts with ``self.to_q(x)``, so blurring the ``to_q`` output changes the queries and
nothing else, whatever runs after it. Only the batch rows in ``rows`` are blurred; the others are
left bit-identical. The hooks live exactly as long as the patch: use it as a context manager (or
call ``remove``), which also holds when sampling raises or is interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .blur import blur_queries
from .grid import token_grid

log = logging.getLogger("sd_webui_seg")

Rows = slice | Sequence[int] | torch.Tensor | None


class QueryBlurPatch:
    """Blur the queries of ``rows`` in the given ``attn1`` modules while installed.

    ``rows`` indexes the batch of each UNet call: ``None`` blurs nothing (the patch is idle),
    ``slice(None)`` blurs every row. The token grid comes from the latent size of the UNet call,
    captured by a pre-hook on ``unet`` (or set ``latent_hw`` by hand).
    """

    def __init__(
        self,
        attn1_modules: Iterable[nn.Module],
        sigma: float,
        unet: nn.Module | None = None,
        latent_hw: tuple[int, int] | None = None,
    ):
        self.sigma = float(sigma)
        self.latent_hw = latent_hw
        self.blurred_calls = 0
        self.failure: str | None = None
        self._rows: slice | torch.Tensor | None = None
        self._handles = [m.to_q.register_forward_hook(self._blur_hook) for m in attn1_modules]
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

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> QueryBlurPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _capture_latent(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            self.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))

    def _fail(self, message: str) -> None:
        # Raising inside the UNet would abort the user's generation; an unblurred row only makes
        # the SEG term zero, so warn once and let sampling go on.
        if self.failure is None:
            log.warning("SEG: %s; smoothed attention skipped", message)
        self.failure = message

    def _blur_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        rows = self._rows
        if rows is None:
            return None
        if self.latent_hw is None:
            self._fail("the latent size of the UNet call is unknown")
            return None
        try:
            height, width = token_grid(output.shape[-2], *self.latent_hw)
        except ValueError as error:
            self._fail(str(error))
            return None
        if isinstance(rows, slice) and rows == slice(None):
            self.blurred_calls += 1
            return blur_queries(output, height, width, self.sigma)
        if isinstance(rows, torch.Tensor):
            if int(rows.max()) >= output.shape[0]:
                self._fail(f"row {int(rows.max())} is outside a batch of {output.shape[0]}")
                return None
            if rows.device != output.device:
                rows = self._rows = rows.to(output.device)
        selected = output[rows]
        blurred = blur_queries(selected, height, width, self.sigma)
        if blurred is selected:
            return None
        if output.requires_grad:
            output = output.clone()
        output[rows] = blurred
        self.blurred_calls += 1
        return output
