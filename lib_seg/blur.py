"""The smoothed-energy query blur (paper Prop. 3.1): a separable Gaussian over the token grid.

Blurring the attention logits QKᵀ along the query axis equals blurring Q itself, so SEG only has
to blur the queries of the smoothed rows, an O(N·d) operation.

Each axis of length L gets a 1-D blur with reflect padding, folded into a dense L×L operator. The
2-D blur is then two matrix products on the (H, W, C) layout the attention already holds, with no
permute copies; the operators are built once per (L, σ, dtype, device) and cached.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

# Beyond this σ the reference implementation replaces the blur by the exact mean query
# (σ = ∞). A large finite σ is a capped near-box blur instead, and that discontinuity is kept.
INFINITE_SIGMA_THRESHOLD = 9999.0
# At σ ≤ 1/6 the kernel has one tap, i.e. the blur is the identity.
IDENTITY_SIGMA_LIMIT = 1.0 / 6.0


def is_mean_sigma(sigma: float) -> bool:
    """True when σ selects the mean-query branch (σ = ∞ or σ > 9999)."""
    return sigma > INFINITE_SIGMA_THRESHOLD


def is_identity_sigma(sigma: float) -> bool:
    """True when the blur changes nothing (σ ≤ 1/6, σ = 0 included)."""
    return sigma <= IDENTITY_SIGMA_LIMIT


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if math.isnan(sigma) or sigma < 0:
        raise ValueError(f"sigma must be >= 0 or inf, got {sigma!r}")
    return sigma


def kernel_length(sigma: float, axis_length: int | None = None) -> int:
    """Number of taps of the 1-D Gaussian: the smallest odd integer ≥ 6σ, capped to the axis.

    The cap is L for an odd axis length L and L + 1 for an even one, so the reflect padding
    (half the kernel) always stays shorter than the axis. Each axis is capped by its own length.
    """
    sigma = _check_sigma(sigma)
    if math.isinf(sigma):
        raise ValueError("an infinite sigma has no kernel (it is the mean branch)")
    six_sigma = math.ceil(6.0 * sigma)
    length = max(1, six_sigma + 1 - six_sigma % 2)
    if axis_length is not None:
        if axis_length < 1:
            raise ValueError(f"axis length must be >= 1, got {axis_length}")
        cap = axis_length if axis_length % 2 else axis_length + 1
        length = min(length, cap)
    return length


def gaussian_taps(sigma: float, length: int) -> torch.Tensor:
    """Normalised float32 Gaussian weights at integer offsets −r..r (r = length // 2)."""
    if length % 2 != 1:
        raise ValueError(f"kernel length must be odd, got {length}")
    if length == 1:
        return torch.ones(1, dtype=torch.float32)
    offsets = torch.arange(-(length // 2), length // 2 + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return weights / weights.sum()


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    # Mirror without repeating the edge sample (numpy/torch "reflect"); the cap on the kernel
    # length keeps every tap within one reflection.
    index = index.abs()
    return torch.where(index > length - 1, 2 * (length - 1) - index, index)


@lru_cache(maxsize=32)
def _operator_f32(length: int, sigma: float) -> torch.Tensor:
    taps = kernel_length(sigma, length)
    weights = gaussian_taps(sigma, taps)
    radius = taps // 2
    sources = _reflect(torch.arange(length)[:, None] + torch.arange(-radius, radius + 1)[None, :], length)
    operator = torch.zeros(length, length, dtype=torch.float32)
    operator.scatter_add_(1, sources, weights.expand(length, taps).contiguous())
    return operator


@lru_cache(maxsize=64)
def blur_operator(
    length: int, sigma: float, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The L×L matrix of the reflect-padded 1-D Gaussian blur along one axis.

    Row i holds the weights that output sample i takes from each input sample; rows sum to 1.
    Built in float32 and cast to the activation dtype once (cached), never per call.
    """
    return _operator_f32(int(length), float(sigma)).to(dtype=dtype, device=device)


def _blur_grid(x: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur x shaped (M, height*width, C) over the grid; returns a new (M, height*width, C)."""
    m, n, c = x.shape
    if is_mean_sigma(sigma):
        return x.mean(dim=1, keepdim=True).expand(m, n, c).contiguous()
    out = x
    if kernel_length(sigma, height) > 1:
        op_h = blur_operator(height, sigma, x.dtype, x.device)
        out = torch.matmul(op_h, out.reshape(m, height, width * c))
    if kernel_length(sigma, width) > 1:
        op_w = blur_operator(width, sigma, x.dtype, x.device)
        out = torch.matmul(op_w, out.reshape(m * height, width, c))
    return out.reshape(m, n, c)


def blur_queries(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur queries shaped (..., height*width, C) over their row-major (height, width) token grid.

    Every channel (all heads × head dims) is blurred independently with a normalised 2-D Gaussian
    of std ``sigma`` in token units and reflect padding. σ = ∞ (or > 9999) gives every token the
    mean query of its image; σ ≤ 1/6 is the identity (``q`` itself is returned). The result has
    q's shape, dtype and device.
    """
    sigma = _check_sigma(sigma)
    if q.dim() < 2:
        raise ValueError(f"queries must be shaped (..., tokens, channels), got {tuple(q.shape)}")
    n_tokens, channels = q.shape[-2], q.shape[-1]
    if height < 1 or width < 1 or height * width != n_tokens:
        raise ValueError(f"a {height}x{width} grid does not hold {n_tokens} tokens")
    if is_identity_sigma(sigma) or n_tokens == 1 or q.numel() == 0:
        return q
    flat = q.reshape(-1, n_tokens, channels)
    return _blur_grid(flat, height, width, sigma).reshape(q.shape)
