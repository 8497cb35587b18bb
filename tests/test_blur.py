"""The query blur against the spec's rules and independent reference constructions."""

import math

import pytest
import torch
from reference import circular_blur, conv2d_reference, explicit_operator_2d, reference_kernel_1d

from lib_seg import blur_operator, blur_queries, kernel_length
from lib_seg.blur import gaussian_taps


@pytest.mark.parametrize(
    ("sigma", "expected"),
    [(0.0, 1), (0.1, 1), (1 / 6, 1), (0.17, 3), (0.5, 3), (1, 7), (2, 13), (5, 31), (10, 61),
     (100, 601), (1.01, 7), (1.2, 9)],
)  # fmt: skip
def test_kernel_length_is_smallest_odd_at_least_six_sigma(sigma, expected):
    assert kernel_length(sigma) == expected


@pytest.mark.parametrize(("axis", "cap"), [(1, 1), (2, 3), (3, 3), (8, 9), (9, 9), (20, 21)])
def test_kernel_is_capped_by_its_own_axis(axis, cap):
    assert kernel_length(100.0, axis) == cap
    assert kernel_length(0.5, axis) == min(3, cap)


def test_taps_are_normalised_symmetric_gaussian():
    for sigma in (0.3, 1.0, 2.5, 10.0):
        length = kernel_length(sigma)
        taps = gaussian_taps(sigma, length).double()
        assert taps.dtype == torch.float64
        assert taps.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.equal(taps, taps.flip(0))
        ratio = taps[length // 2 + 1] / taps[length // 2]
        assert ratio.item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-5)


def test_operator_rows_sum_to_one_and_are_cached():
    op = blur_operator(7, 1.5)
    assert torch.allclose(op.sum(dim=1), torch.ones(7))
    assert blur_operator(7, 1.5) is op  # built once, not per call


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (1, 9), (9, 1), (1, 8), (2, 2), (3, 5), (5, 3), (4, 4), (6, 10), (7, 7), (8, 3)],
)
@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.0, 10.0])
def test_blur_equals_explicit_reflect_operator(height, width, sigma):
    q = torch.randn(2, height * width, 5, dtype=torch.float64)
    expected = torch.einsum("ij,bjc->bic", explicit_operator_2d(height, width, sigma), q)
    # the kernel is built in float32 (as the reference), hence the float32-level tolerance
    torch.testing.assert_close(blur_queries(q, height, width, sigma), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (4, 12), (12, 4), (5, 9), (2, 16)])
def test_blur_equals_reference_depthwise_conv(height, width):
    q = torch.randn(3, height * width, 16, dtype=torch.float64)
    for sigma in (0.5, 1.0, 3.0, 50.0):
        torch.testing.assert_close(
            blur_queries(q, height, width, sigma),
            conv2d_reference(q, height, width, sigma),
            atol=1e-6,
            rtol=1e-6,
        )


def test_landscape_grid_with_large_sigma_does_not_crash():
    # the reference caps by the width only and crashes here (SDXL mid block at 1536x640 px)
    q = torch.randn(1, 20 * 48, 8)
    out = blur_queries(q, 20, 48, 10.0)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_identity_sigmas_return_input_and_zero_is_not_nan():
    q = torch.randn(2, 12, 4)
    for sigma in (0.0, 0.05, 1 / 6):
        out = blur_queries(q, 3, 4, sigma)
        assert torch.equal(out, q)
    assert torch.isfinite(blur_queries(q, 3, 4, 0.0)).all()


def test_mean_branch_gives_every_token_the_mean_query():
    q = torch.randn(2, 3, 24, 8)
    for sigma in (math.inf, 10000.0, 1e6):
        out = blur_queries(q, 4, 6, sigma)
        torch.testing.assert_close(out, q.mean(dim=-2, keepdim=True).expand_as(q))
        assert out.is_contiguous()


def test_large_finite_sigma_is_not_the_mean_branch():
    q = torch.randn(1, 8 * 8, 16, dtype=torch.float64)
    near_box = blur_queries(q, 8, 8, 9999.0)
    mean = blur_queries(q, 8, 8, 9999.5)
    residual = (near_box - near_box.mean(dim=1, keepdim=True)).std() / q.std()
    assert residual > 0.02  # the capped kernel + reflect padding stay a near-box blur
    assert torch.allclose(mean, q.mean(dim=1, keepdim=True).expand_as(q))
    assert not torch.allclose(near_box, mean, atol=1e-3)


def test_layouts_and_channels_are_independent():
    # (B, N, C) with C = heads*dim and (B, heads, N, dim) give the same per-channel blur
    b, heads, dim, height, width = 2, 4, 3, 5, 6
    q = torch.randn(b, height * width, heads * dim, dtype=torch.float64)
    flat = blur_queries(q, height, width, 1.3)
    split = q.view(b, height * width, heads, dim).permute(0, 2, 1, 3)
    per_head = blur_queries(split, height, width, 1.3).permute(0, 2, 1, 3).reshape_as(q)
    torch.testing.assert_close(flat, per_head)
    # a non-contiguous input is accepted
    torch.testing.assert_close(
        blur_queries(split.contiguous(), height, width, 1.3), blur_queries(split, height, width, 1.3)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_keep_dtype_and_match_float64(dtype):
    q = torch.randn(2, 6 * 7, 8, dtype=torch.float64)
    exact = blur_queries(q, 6, 7, 1.5)
    out = blur_queries(q.to(dtype), 6, 7, 1.5)
    assert out.dtype == dtype and out.shape == q.shape
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(out.double(), exact, atol=tolerance, rtol=tolerance)


def test_bad_grids_and_sigmas_raise():
    q = torch.randn(1, 12, 4)
    with pytest.raises(ValueError, match="does not hold"):
        blur_queries(q, 5, 3, 1.0)
    with pytest.raises(ValueError):
        blur_queries(q, 3, 4, float("nan"))
    with pytest.raises(ValueError):
        blur_queries(q, 3, 4, -1.0)


def test_prop_3_1_blurring_logits_along_queries_equals_blurring_queries():
    height, width, heads, dim, keys = 6, 5, 3, 4, 7
    q = torch.randn(heads, height * width, dim, dtype=torch.float64)
    k = torch.randn(heads, keys, dim, dtype=torch.float64)
    for sigma in (0.7, 2.0, 30.0, math.inf):
        logits = q @ k.transpose(-1, -2) / math.sqrt(dim)
        blurred_logits = blur_queries(logits, height, width, sigma)
        from_queries = blur_queries(q, height, width, sigma) @ k.transpose(-1, -2) / math.sqrt(dim)
        torch.testing.assert_close(blurred_logits, from_queries, atol=1e-12, rtol=1e-12)


def test_mean_branch_makes_logit_rows_equal_the_column_means():
    q = torch.randn(16, 4, dtype=torch.float64)
    k = torch.randn(5, 4, dtype=torch.float64)
    rows = blur_queries(q, 4, 4, math.inf) @ k.T
    torch.testing.assert_close(rows, (q @ k.T).mean(dim=0, keepdim=True).expand(16, 5))
    attention = rows.softmax(dim=-1)
    assert torch.allclose(attention, attention[:1].expand_as(attention))


def test_lemmas_hold_exactly_under_circular_padding():
    torch.manual_seed(0)
    for height, width, sigma in [(8, 8, 1.0), (6, 10, 2.0), (5, 7, 0.8)]:
        x = torch.randn(height * width, dtype=torch.float64) * 3
        y = circular_blur(x, height, width, sigma)
        assert y.mean().item() == pytest.approx(x.mean().item(), abs=1e-12)  # Lemma 3.1: mean
        assert y.var() <= x.var() + 1e-12  # Lemma 3.1: variance
        lse_x, lse_y = torch.logsumexp(x, 0), torch.logsumexp(y, 0)
        assert lse_y <= lse_x + 1e-12  # Lemma 3.2 (proven direction: lse decreases)
        assert lse_y >= x.mean() + math.log(x.numel()) - 1e-12  # floor reached by the mean


def test_lemmas_hold_only_approximately_under_reflect_padding():
    torch.manual_seed(1)
    x = torch.randn(1, 32 * 32, 1, dtype=torch.float64)
    y = blur_queries(x, 32, 32, 1.0)
    assert abs(y.mean() - x.mean()) < 0.05  # close, not exact
    # documented counterexample: with reflect padding lse can increase
    spike = torch.tensor([[-2.0, -1, -2], [-1, 0, -1], [-2, -1, -2]], dtype=torch.float64)
    blurred = blur_queries(spike.reshape(1, 9, 1), 3, 3, 1.0).flatten()
    assert torch.logsumexp(blurred, 0) > torch.logsumexp(spike.flatten(), 0) + 0.05
    # and circular padding would not have increased it
    assert torch.logsumexp(circular_blur(spike.flatten(), 3, 3, 1.0), 0) <= torch.logsumexp(
        spike.flatten(), 0
    )


def test_reference_kernel_helper_agrees_with_library():
    for sigma in (0.3, 1.0, 4.0):
        for axis in (3, 8, 64):
            assert len(reference_kernel_1d(sigma, axis)) == kernel_length(sigma, axis)
