"""When SEG is active during sampling."""

from __future__ import annotations

from collections.abc import Sequence


def is_active_step(step: int, total_steps: int, start: float, end: float) -> bool:
    """SEG runs on 0-based step ``step`` of ``total_steps`` when start ≤ step/total < end."""
    if total_steps < 1:
        return False
    fraction = step / total_steps
    return start <= fraction < end


def step_of_sigma(sigma: float, schedule: Sequence[float]) -> tuple[int, int]:
    """(step, total steps) of a model evaluation at noise level ``sigma`` in a sampler's decreasing
    ``schedule`` of ``total + 1`` sigmas (the last one the end): the step is the last one whose
    sigma is at or above ``sigma``, so a sampler's second evaluation inside a step (Heun's, at the
    next sigma) counts as the next step, as webui samplers count it."""
    total = len(schedule) - 1
    if total < 1:
        return 0, 1
    tolerance = 1e-5 * max(abs(sigma), 1e-12)
    at_or_above = sum(1 for level in schedule[:-1] if level >= sigma - tolerance)
    return max(at_or_above - 1, 0), total
