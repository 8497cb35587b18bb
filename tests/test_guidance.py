"""Guidance algebra of spec §1."""

import pytest
import torch

from lib_seg import guided, is_active_step, seg_term, smoothed_source


@pytest.fixture
def preds():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]


def test_uncond_branch_is_paper_eq_10(preds):
    c, u, smoothed = preds
    out = guided(c, u, smoothed, cfg_scale=7.0, seg_scale=3.0, branch="uncond")
    torch.testing.assert_close(out, u + 7.0 * (c - u) + 3.0 * (u - smoothed))


def test_cond_branch_is_reference_code(preds):
    c, u, smoothed = preds
    out = guided(c, u, smoothed, cfg_scale=5.0, seg_scale=3.0, branch="cond")
    torch.testing.assert_close(out, c + 4.0 * (c - u) + 3.0 * (c - smoothed))


@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_no_uncond_uses_cond_in_either_branch(preds, branch):
    c, _, smoothed = preds
    assert smoothed_source(branch, has_uncond=False) == "cond"
    torch.testing.assert_close(guided(c, None, smoothed, 1.0, 2.0, branch), c + 2.0 * (c - smoothed))


def test_sources():
    assert smoothed_source("uncond", True) == "uncond"
    assert smoothed_source("cond", True) == "cond"
    with pytest.raises(ValueError):
        smoothed_source("both", True)


def test_zero_scale_adds_nothing(preds):
    c, u, smoothed = preds
    assert torch.equal(guided(c, u, smoothed, 7.0, 0.0), u + 7.0 * (c - u))
    assert not seg_term(c, smoothed, 0.0).any()


@pytest.mark.parametrize("branch", ["uncond", "cond"])
@pytest.mark.parametrize("has_uncond", [True, False])
def test_eps_and_x0_forms_agree(preds, branch, has_uncond):
    # x0 = x - s*eps (k-diffusion); coefficients sum to 1, so guidance commutes with the map
    eps_c, eps_u, eps_smoothed = preds
    x, s = torch.randn_like(eps_c), 4.2
    to_x0 = lambda eps: x - s * eps
    eps_u_or_none = eps_u if has_uncond else None
    x0_u_or_none = to_x0(eps_u) if has_uncond else None
    eps_out = guided(eps_c, eps_u_or_none, eps_smoothed, 6.0, 3.0, branch)
    x0_out = guided(to_x0(eps_c), x0_u_or_none, to_x0(eps_smoothed), 6.0, 3.0, branch)
    torch.testing.assert_close(x0_out, to_x0(eps_out))


def test_schedule_fractions():
    assert [is_active_step(i, 10, 0.0, 1.0) for i in range(10)] == [True] * 10
    assert [is_active_step(i, 10, 0.2, 0.5) for i in range(10)] == [False] * 2 + [True] * 3 + [False] * 5
    assert is_active_step(0, 1, 0.0, 1.0)  # n = 1: no division by zero
    assert not is_active_step(0, 1, 0.5, 1.0)
    assert not is_active_step(0, 0, 0.0, 1.0)
    assert not any(is_active_step(i, 7, 0.6, 0.6) for i in range(7))
