"""A small Flux-architecture transformer written for these tests, laid out the way Forge's
``backend/nn/flux.py`` is (loaded as ``backend.nn.flux`` by ``standin_forge_transformers``): the
blocks call this module's ``attention(q, k, v, pe)``, which applies RoPE to the QK-normed
queries and keys and then calls the ``attention_function`` imported from ``backend.attention``
with q shaped (B, heads, tokens, d). The math is Flux's (double-stream blocks over
``cat(txt, img)``, single-stream blocks, 3-axis RoPE, 2×2 patches with circular padding to even
sizes); the code is ours. ``ref_latents`` appends reference-image tokens after the image tokens,
as Flux Kontext does."""

import math

import torch
from backend.attention import attention_function
from torch import nn


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)


def rope(ids, axes_dim, theta):
    """Rotation matrices (B, 1, tokens, d/2, 2, 2) for 3-axis positions ``ids`` (B, tokens, 3)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., axis : axis + 1].double() * omega)
    angle = torch.cat(angles, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack((cos, -sin, sin, cos), dim=-1).view(*angle.shape, 2, 2).unsqueeze(1).float()


def apply_rope(q, k, pe):
    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)

    return rotate(q), rotate(k)


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat((args.cos(), args.sin()), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k):
        return self.query_norm(q), self.key_norm(k)


def split_heads(qkv, heads):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class Stream(nn.Module):
    """One stream's (img or txt) modulated qkv, projection and MLP of a double block."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.mod = nn.Linear(hidden, 6 * hidden)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.qk_norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, int(hidden * mlp_ratio)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(hidden * mlp_ratio), hidden),
        )
        self.heads = heads

    def qkv_of(self, x, vec):
        mods = self.mod(nn.functional.silu(vec))[:, None].chunk(6, dim=-1)
        q, k, v = split_heads(self.qkv((1 + mods[1]) * self.norm(x) + mods[0]), self.heads)
        q, k = self.qk_norm(q, k)
        return (q, k, v), mods

    def finish(self, x, attn, mods):
        x = x + mods[2] * self.proj(attn)
        return x + mods[5] * self.mlp((1 + mods[4]) * self.norm(x) + mods[3])


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.img, self.txt = Stream(hidden, heads, mlp_ratio), Stream(hidden, heads, mlp_ratio)

    def forward(self, img, txt, vec, pe):
        (img_q, img_k, img_v), img_mods = self.img.qkv_of(img, vec)
        (txt_q, txt_k, txt_v), txt_mods = self.txt.qkv_of(txt, vec)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe=pe)
        n_txt = txt.shape[1]
        return self.img.finish(img, attn[:, n_txt:], img_mods), self.txt.finish(
            txt, attn[:, :n_txt], txt_mods
        )


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.hidden, self.heads, self.mlp_hidden = hidden, heads, int(hidden * mlp_ratio)
        self.modulation = nn.Linear(hidden, 3 * hidden)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(nn.functional.silu(vec))[:, None].chunk(3, dim=-1)
        qkv, mlp = self.linear1((1 + scale) * self.pre_norm(x) + shift).split(
            [3 * self.hidden, self.mlp_hidden], -1
        )
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k)
        attn = attention(q, k, v, pe=pe)
        return x + gate * self.linear2(torch.cat((attn, nn.functional.gelu(mlp, approximate="tanh")), dim=2))


def patchify(x):
    """(B, C, h, w) -> (B, ceil(h/2)·ceil(w/2), 4C), padding odd sizes circularly to even."""
    b, c, h, w = x.shape
    x = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")
    hl, wl = (h + 1) // 2, (w + 1) // 2
    return x.view(b, c, hl, 2, wl, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hl * wl, 4 * c), hl, wl


def positions(batch, hl, wl, index=0):
    ids = torch.zeros(hl, wl, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(hl, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None, :]
    return ids.reshape(1, hl * wl, 3).expand(batch, -1, -1)


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(
        self,
        in_channels=4,
        vec_in_dim=8,
        context_in_dim=16,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=10,
        depth_single_blocks=4,
        axes_dim=(4, 6, 6),
        theta=10000,
        guidance_embed=True,
    ):
        super().__init__()
        self.guidance_embed, self.axes_dim, self.theta = guidance_embed, axes_dim, theta
        self.in_channels = in_channels
        self.img_in = nn.Linear(4 * in_channels, hidden_size)
        self.time_in = nn.Linear(256, hidden_size)
        self.vector_in = nn.Linear(vec_in_dim, hidden_size)
        self.guidance_in = nn.Linear(256, hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)
        )
        self.final_layer = nn.Linear(hidden_size, 4 * in_channels)

    def vector(self, timestep, y, guidance):
        vec = self.time_in(timestep_embedding(timestep, 256)) + self.vector_in(y)
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("a guidance-distilled model needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        return vec

    def blocks(self, img, txt, vec, pe):
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        return x[:, txt.shape[1] :]

    def forward(self, x, timestep, context, y, guidance=None, ref_latents=None, **kwargs):
        return self.run(x, context, self.vector(timestep, y, guidance), ref_latents)

    def run(self, x, context, vec, ref_latents=None):
        b, _, h, w = x.shape
        img, hl, wl = patchify(x)
        ids = [positions(b, hl, wl)]
        for index, ref in enumerate(ref_latents or [], start=1):
            ref_img, rh, rw = patchify(ref)
            img = torch.cat((img, ref_img), dim=1)
            ids.append(positions(b, rh, rw, index))
        txt_ids = torch.zeros(b, context.shape[1], 3)
        pe = rope(torch.cat((txt_ids, *ids), dim=1), self.axes_dim, self.theta)
        out = self.blocks(self.img_in(img), self.txt_in(context), vec, pe)
        out = self.final_layer(out[:, : hl * wl])
        out = out.view(b, hl, wl, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, 2 * hl, 2 * wl)
        return out[:, :, :h, :w]
