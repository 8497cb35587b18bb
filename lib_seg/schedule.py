"""When SEG is active during sampling."""

from __future__ import annotations


def is_active_step(step: int, total_steps: int, start: float, end: float) -> bool:
    """SEG runs on 0-based step ``step`` of ``total_steps`` when start ≤ step/total < end."""
    if total_steps < 1:
        return False
    fraction = step / total_steps
    return start <= fraction < end
