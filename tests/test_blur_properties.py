"""Property-based checks of the blur over random shapes, σ and dtypes."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import conv2d_reference

from lib_seg import blur_queries, kernel_length

sigmas = st.one_of(
    st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
    st.sampled_from([math.inf, 1e4, 1e7]),
)
sides = st.integers(min_value=1, max_value=12)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


@settings(max_examples=120, deadline=None)
@given(
    height=sides, width=sides, sigma=sigmas, batch=st.integers(1, 3), channels=st.integers(1, 6), dtype=dtypes
)
def test_shape_dtype_finite_and_matches_reference(height, width, sigma, batch, channels, dtype):
    q64 = torch.randn(batch, height * width, channels, dtype=torch.float64)
    out = blur_queries(q64.to(dtype), height, width, sigma)
    assert out.shape == q64.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    expected = conv2d_reference(q64, height, width, sigma) if sigma > 1 / 6 else q64
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@settings(max_examples=80, deadline=None)
@given(height=sides, width=sides, sigma=sigmas)
def test_constant_maps_stay_constant_and_range_is_kept(height, width, sigma):
    # row-stochastic nonnegative operator: constants are fixed points, values stay in [min, max]
    q = torch.randn(1, height * width, 3, dtype=torch.float64)
    out = blur_queries(q, height, width, sigma)
    assert (out.amax(dim=1) <= q.amax(dim=1) + 1e-6).all()
    assert (out.amin(dim=1) >= q.amin(dim=1) - 1e-6).all()
    const = torch.full((1, height * width, 2), 2.5, dtype=torch.float64)
    # float32-built operator: rows sum to 1 within float32 rounding
    torch.testing.assert_close(blur_queries(const, height, width, sigma), const, atol=1e-6, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(sigma=st.floats(min_value=0.0, max_value=1e4, allow_nan=False), axis=sides)
def test_kernel_length_rule(sigma, axis):
    length = kernel_length(sigma, axis)
    assert length % 2 == 1
    assert length <= (axis if axis % 2 else axis + 1)
    uncapped = kernel_length(sigma)
    assert uncapped >= 6 * sigma and (uncapped - 2 < 6 * sigma or uncapped == 1)
