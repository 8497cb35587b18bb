"""A small SD3/SD3.5-architecture MMDiT written for these tests, laid out the way Forge's
``backend/nn/mmditx.py`` is (loaded as ``backend.nn.mmditx``): joint blocks run the module's
``block_mixing``, which calls the module-level ``attention(q, k, v, heads)`` on
``cat(context, x)`` with q shaped (B, tokens, heads·d) after the QK-norm; blocks listed in
``x_block_self_attn_layers`` add a second, image-only attention (MMDiT-X, SD3.5 Medium); register
tokens go in front of the context; the patch embedder is a stride-2 conv. The code is ours."""

import torch
from backend.nn.flux import RMSNorm, timestep_embedding
from torch import nn


def attention(q, k, v, heads, mask=None):
    b, n, c = q.shape

    def split(t):
        return t.view(b, -1, heads, c // heads).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q, self.ln_k = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def pre_attention(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, -1, self.head_dim).movedim(2, 0)
        return self.ln_q(q).reshape(b, n, -1), self.ln_k(k).reshape(b, n, -1), v.reshape(b, n, -1)


class DismantledBlock(nn.Module):
    def __init__(self, hidden, heads, pre_only=False, x_block_self_attn=False):
        super().__init__()
        self.pre_only, self.x_block_self_attn = pre_only, x_block_self_attn
        self.attn = SelfAttention(hidden, heads, pre_only)
        self.attn2 = SelfAttention(hidden, heads) if x_block_self_attn else None
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)
        self.mlp = (
            None
            if pre_only
            else nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        )

    def pre_attention(self, x, c):
        shift, scale, gate, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        normed = nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
        qkv2 = self.attn2.pre_attention(normed) if self.x_block_self_attn else None
        return self.attn.pre_attention(normed), qkv2, (x, gate, shift2, scale2, gate2)

    def post_attention(self, attn, attn2, x, gate, shift2, scale2, gate2):
        x = x + gate * self.attn.proj(attn)
        if attn2 is not None:
            x = x + gate * self.attn2.proj(attn2)
        return x + gate2 * self.mlp(nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale2) + shift2)


def block_mixing(context, x, context_block, x_block, c):
    context_qkv, _, context_rest = context_block.pre_attention(context, c)
    x_qkv, x_qkv2, x_rest = x_block.pre_attention(x, c)
    q, k, v = (torch.cat((a, b), dim=1) for a, b in zip(context_qkv, x_qkv, strict=True))
    attn = attention(q, k, v, x_block.attn.num_heads)
    n_context = context.shape[1]
    attn2 = attention(*x_qkv2, x_block.attn2.num_heads) if x_qkv2 is not None else None
    context = (
        None
        if context_block.pre_only
        else context_block.post_attention(attn[:, :n_context], None, *context_rest)
    )
    return context, x_block.post_attention(attn[:, n_context:], attn2, *x_rest)


class JointBlock(nn.Module):
    def __init__(self, hidden, heads, pre_only, x_block_self_attn):
        super().__init__()
        self.context_block = DismantledBlock(hidden, heads, pre_only=pre_only)
        self.x_block = DismantledBlock(hidden, heads, x_block_self_attn=x_block_self_attn)

    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class MMDiTX(nn.Module):
    def __init__(
        self,
        in_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=13,
        adm_in_channels=8,
        context_dim=16,
        register_length=1,
        pos_embed_max_size=16,
        x_block_self_attn_layers=(0, 7, 8),
    ):
        super().__init__()
        self.patch_size, self.register_length, self.pos_embed_max_size = (
            2,
            register_length,
            pos_embed_max_size,
        )
        self.x_embedder = PatchEmbed(2, in_channels, hidden_size)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, pos_embed_max_size**2, hidden_size))
        self.register = nn.Parameter(0.1 * torch.randn(1, register_length, hidden_size))
        self.t_embedder = nn.Linear(256, hidden_size)
        self.y_embedder = nn.Linear(adm_in_channels, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden_size,
                num_heads,
                pre_only=i == depth - 1,
                x_block_self_attn=i in x_block_self_attn_layers,
            )
            for i in range(depth)
        )
        self.final_layer = nn.Linear(hidden_size, 4 * in_channels)

    def forward(self, x, t, y=None, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        b, _, h, w = x.shape
        hp, wp = h // 2, w // 2
        grid = self.pos_embed.view(1, self.pos_embed_max_size, self.pos_embed_max_size, -1)
        top, left = (self.pos_embed_max_size - hp) // 2, (self.pos_embed_max_size - wp) // 2
        pos = grid[:, top : top + hp, left : left + wp].reshape(1, hp * wp, -1)
        tokens = self.x_embedder(x) + pos
        c = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)
        context = torch.cat((self.register.expand(b, -1, -1), self.context_embedder(context)), dim=1)
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c=c)
        out = self.final_layer(tokens).view(b, hp, wp, -1, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, -1, 2 * hp, 2 * wp)
