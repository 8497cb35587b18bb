"""How the smoothed prediction enters the guided prediction (spec §1).

With ``c`` the positive prediction, ``u`` the negative one, ``w`` the CFG scale and ``γ`` the SEG
scale:

- branch ``uncond`` (paper Eq. 10, default): ``u + w·(c − u) + γ·(u − ũ)``
- branch ``cond`` (reference code):          ``u + w·(c − u) + γ·(c − c̃)``
- no negative prediction this step:           ``c + γ·(c − c̃)`` whatever the branch

The coefficients of every formula sum to 1, so they mean the same in noise (ε) space and in
denoised (x0) space. SEG only ever adds one term to whatever the webui's CFG produced.
"""

from __future__ import annotations

import torch

BRANCH_UNCOND = "uncond"
BRANCH_COND = "cond"
BRANCHES = (BRANCH_UNCOND, BRANCH_COND)


def smoothed_source(branch: str, has_uncond: bool) -> str:
    """Which prediction the smoothed rows copy this step: ``"uncond"`` or ``"cond"``."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    return BRANCH_UNCOND if branch == BRANCH_UNCOND and has_uncond else BRANCH_COND


def seg_term(source: torch.Tensor, smoothed: torch.Tensor, scale: float) -> torch.Tensor:
    """γ·(source − smoothed): the term SEG adds to the CFG result."""
    return (source - smoothed) * scale


def guided(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    smoothed: torch.Tensor,
    cfg_scale: float,
    seg_scale: float,
    branch: str = BRANCH_UNCOND,
) -> torch.Tensor:
    """The full guided prediction of spec §1; ``smoothed`` was made from ``smoothed_source``."""
    if uncond is None:
        return cond + seg_term(cond, smoothed, seg_scale)
    cfg = uncond + (cond - uncond) * cfg_scale
    source = uncond if smoothed_source(branch, True) == BRANCH_UNCOND else cond
    return cfg + seg_term(source, smoothed, seg_scale)
