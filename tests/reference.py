"""Independent reference constructions the tests compare lib_seg against (test-only code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_kernel_1d(sigma: float, axis_length: int) -> torch.Tensor:
    """Taps written out from the spec's rule, float64."""
    size = 1
    while size < 6 * sigma:  # smallest odd integer >= 6σ
        size += 2
    cap = axis_length if axis_length % 2 else axis_length + 1
    size = min(size, cap)
    radius = size // 2
    if size == 1:
        return torch.ones(1, dtype=torch.float64)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def reflect_index(i: int, length: int) -> int:
    while i < 0 or i >= length:
        i = -i if i < 0 else 2 * (length - 1) - i
    return i


def explicit_operator_2d(height: int, width: int, sigma: float, mode: str = "reflect") -> torch.Tensor:
    """The (HW × HW) matrix of the 2-D blur, built entry by entry with Python loops."""
    kh = reference_kernel_1d(sigma, height)
    kw = reference_kernel_1d(sigma, width)
    rh, rw = len(kh) // 2, len(kw) // 2
    op = torch.zeros(height * width, height * width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            for dy in range(-rh, rh + 1):
                for dx in range(-rw, rw + 1):
                    if mode == "reflect":
                        sy, sx = reflect_index(y + dy, height), reflect_index(x + dx, width)
                    else:  # circular
                        sy, sx = (y + dy) % height, (x + dx) % width
                    op[y * width + x, sy * width + sx] += kh[dy + rh] * kw[dx + rw]
    return op


def conv2d_reference(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """The reference code's construction: one 2-D depthwise conv of the outer-product kernel after
    reflect padding (with the per-axis cap), on (B, N, C) queries."""
    b, n, c = q.shape
    if sigma > 9999:
        return q.mean(dim=1, keepdim=True).expand_as(q)
    kh = reference_kernel_1d(sigma, height).to(q.dtype)
    kw = reference_kernel_1d(sigma, width).to(q.dtype)
    kernel = torch.outer(kh, kw).expand(c, 1, len(kh), len(kw))
    img = q.transpose(1, 2).reshape(b, c, height, width)
    img = F.pad(img, (len(kw) // 2, len(kw) // 2, len(kh) // 2, len(kh) // 2), mode="reflect")
    out = F.conv2d(img, kernel, groups=c)
    return out.reshape(b, c, n).transpose(1, 2)


def logsumexp_over_queries(logits: torch.Tensor) -> torch.Tensor:
    """The paper's energy uses lse along the query axis of each key column."""
    return torch.logsumexp(logits, dim=0)


def mean_lse_floor(column: torch.Tensor) -> float:
    return float(column.mean() + math.log(column.numel()))


def circular_blur(x: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur of a flat (H·W) map with circular padding, the setting of the paper's lemmas."""
    return explicit_operator_2d(height, width, sigma, mode="circular") @ x
