"""Attention forwards in the styles the webuis swap into ldm/sgm CrossAttention (test-only).

A1111 replaces ``CrossAttention.forward`` with its optimisation of choice (sdp, sub-quadratic,
split, xformers); each one begins with ``self.to_q(x)``. These stand-ins follow that pattern so
the to_q patch is exercised under several attention implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def sdp_forward(self, x, context=None, mask=None, **kwargs):
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    out = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return self.to_out(out)


def chunked_forward(self, x, context=None, mask=None, **kwargs):
    """Query-chunked softmax attention, as the sub-quadratic and split optimisations do."""
    context = x if context is None else context
    q = _heads(self.to_q(x), self.heads)
    k, v = _heads(self.to_k(context), self.heads), _heads(self.to_v(context), self.heads)
    scale = q.shape[-1] ** -0.5
    chunks = [
        torch.softmax(q[:, :, i : i + 5] @ k.transpose(-1, -2) * scale, dim=-1) @ v
        for i in range(0, q.shape[2], 5)
    ]
    out = torch.cat(chunks, dim=2).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return self.to_out(out)


def reference_attention(module, x, q_override):
    """Plain attention of ``module`` with given queries and keys/values from ``x``."""
    q = _heads(q_override, module.heads)
    k, v = _heads(module.to_k(x), module.heads), _heads(module.to_v(x), module.heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return module.to_out((weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


BACKENDS = {"ldm-default": None, "sdp": sdp_forward, "chunked": chunked_forward}
