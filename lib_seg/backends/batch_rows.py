"""Row selection over the nested conditioning structures webuis pass to their models.

A model call takes ``x``, ``sigma`` and a conditioning that may be a tensor, a list of tensors or a
dict of either (SD1 ``{"c_crossattn": [t], "c_concat": [t]}``, SDXL ``{"crossattn": t, "vector":
t, ...}``). Every tensor whose first dimension is the call's batch is indexed by row; anything
else (scalars, broadcast tensors) is passed through unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


def select_rows(value, rows: torch.Tensor, batch: int):
    """``value`` with every batch-sized tensor inside it indexed by ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(select_rows(item, rows, batch) for item in value)
    return value


def concat_rows(parts: Sequence):
    """Concatenate structures of the same shape along their batch tensors."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts)) if first.dim() else first
    if isinstance(first, dict):
        return dict_like(first, {key: concat_rows([part[key] for part in parts]) for key in first})
    if isinstance(first, list | tuple):
        return type(first)(concat_rows([part[i] for part in parts]) for i in range(len(first)))
    return first


def insert_rows(value, rows: torch.Tensor, at: int):
    """``value`` with its own rows ``rows`` inserted again at row ``at`` (tensors and dicts)."""
    if isinstance(value, dict):
        return dict_like(value, {key: insert_rows(item, rows, at) for key, item in value.items()})
    if isinstance(value, torch.Tensor) and value.dim():
        return torch.cat([value[:at], value.index_select(0, rows.to(value.device)), value[at:]])
    return value


def dict_like(template: dict, items: dict) -> dict:
    """``items`` in a dict of ``template``'s class (A1111's SDXL ``DictWithShape``, whose
    ``shape`` is a property of its ``crossattn`` entry); ``template`` itself is left as it was."""
    out = copy.copy(template)
    out.update(items)
    return out


class CallRecord:
    """The positional and keyword arguments of one model call, and its batch size."""

    __slots__ = ("args", "kwargs", "rows")

    def __init__(self, args: tuple, kwargs: dict):
        self.args = args
        self.kwargs = kwargs
        self.rows = int(args[0].shape[0])


def gather_call(records: Sequence[CallRecord], rows: Sequence[int]) -> tuple[tuple, dict]:
    """Arguments for one call over ``rows`` of the batch the recorded calls cover in order."""
    pieces = []
    offset = 0
    for record in records:
        local = [row - offset for row in rows if offset <= row < offset + record.rows]
        if local:
            index = torch.tensor(local, dtype=torch.long)
            pieces.append(
                (select_rows(record.args, index, record.rows), select_rows(record.kwargs, index, record.rows))
            )
        offset += record.rows
    if sum(len(p[0][0]) for p in pieces) != len(rows):
        raise ValueError(f"rows {list(rows)} are not all inside the {offset} recorded rows")
    return concat_rows([p[0] for p in pieces]), concat_rows([p[1] for p in pieces])
