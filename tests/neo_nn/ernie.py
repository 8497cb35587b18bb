"""A small Ernie-Image written for these tests in the layout of Forge Neo's ``backend/nn/ernie.py``
(loaded as ``backend.nn.ernie``): ``ErnieImageModel.layers`` of ``ErnieImageSharedAdaLNBlock`` s
over ``cat(image, text)`` (image FIRST), each calling its ``self_attention``
(``ErnieImageAttention``), which applies the QK-norm and Neo's 3-axis split-half RoPE and hands
the ``attention_function`` imported from ``backend.attention`` q, k, v flattened to
(B, tokens, heads·d) with ``mask=None`` (Neo's layers get no mask). A stride-p convolution
patchifies the latent (p = 1 as released); one adaLN modulation is shared by all layers. The
math follows Neo's; the code is ours (no comfy_kitchen)."""

import math

import torch
from backend.attention import attention_function
from torch import nn
from torch.nn import functional as F

from lib_seg.transformers import CallLayout

FAMILY = "Ernie-Image"
IN_CHANNELS, TEXT_DIM = 8, 24
BENCH_SHAPE = {"num_layers": 36, "hidden_size": 48, "num_attention_heads": 2, "ffn_hidden_size": 96}
VAE_SCALE = 16  # Flux.2's VAE: 128 packed channels at 1/16 of the image size


def rope(pos, dim, theta):
    """(2, ..., tokens, dim/2): cos and sin of the positions ``pos`` times dim/2 frequencies."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = pos.double()[..., None] * omega
    return torch.stack((angle.cos(), angle.sin())).float()


class ErnieImageEmbedND3(nn.Module):
    """(B, tokens, 1, d/2, 2, 2): Neo's rotation, whose top row takes the first half of the angles
    (each twice) and whose bottom row takes the second half."""

    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)

    def forward(self, ids):
        cos, sin = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(3)], dim=-1)
        half = cos.shape[-1] // 2
        top_cos, top_sin = (t[..., :half].repeat_interleave(2, dim=-1) for t in (cos, sin))
        bottom_cos, bottom_sin = (t[..., half:].repeat_interleave(2, dim=-1) for t in (cos, sin))
        rot = torch.stack((top_cos, -top_sin, bottom_sin, bottom_cos), dim=-1)
        return rot.view(*rot.shape[:-1], 2, 2).unsqueeze(2)


def apply_rope_split_half(x, rot):
    """Rotate the pairs (x[i], x[i + d/2]) of x (B, S, heads, d) by ``rot`` (B, S, 1, d/2, 2, 2)."""
    half = x.shape[-1] // 2
    pairs = torch.stack((x[..., :half], x[..., half:]), dim=-1).float()
    out = (rot * pairs.unsqueeze(-2)).sum(-1)
    return torch.cat((out[..., 0], out[..., 1]), dim=-1).type_as(x)


class ErnieImagePatchEmbedDynamic(nn.Module):
    def __init__(self, in_channels, embed_dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h·w, D), row-major


class ErnieImageAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head, eps=1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.norm_q = nn.RMSNorm(dim_head, eps=eps)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=False)])
        for norm in (self.norm_q, self.norm_k):
            nn.init.normal_(norm.weight, 1.0, 0.1)

    def forward(self, x, attention_mask=None, image_rotary_emb=None):
        b, s, _ = x.shape
        query = self.norm_q(self.to_q(x).view(b, s, self.heads, self.head_dim))
        key = self.norm_k(self.to_k(x).view(b, s, self.heads, self.head_dim))
        if image_rotary_emb is not None:
            query, key = (
                apply_rope_split_half(query, image_rotary_emb),
                apply_rope_split_half(key, image_rotary_emb),
            )
        q_flat, k_flat = query.reshape(b, s, -1), key.reshape(b, s, -1)
        hidden = attention_function(q_flat, k_flat, self.to_v(x), self.heads, mask=attention_mask)
        return self.to_out[0](hidden)


class ErnieImageFeedForward(nn.Module):
    def __init__(self, hidden_size, ffn_hidden_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x):
        return self.linear_fc2(self.up_proj(x) * F.gelu(self.gate_proj(x)))


class ErnieImageSharedAdaLNBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, ffn_hidden_size, eps=1e-6):
        super().__init__()
        self.adaLN_sa_ln = nn.RMSNorm(hidden_size, eps=eps)
        self.self_attention = ErnieImageAttention(hidden_size, num_heads, hidden_size // num_heads, eps)
        self.adaLN_mlp_ln = nn.RMSNorm(hidden_size, eps=eps)
        self.mlp = ErnieImageFeedForward(hidden_size, ffn_hidden_size)

    def forward(self, x, rotary_pos_emb, temb, attention_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = temb
        normed = self.adaLN_sa_ln(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attention(
            normed, attention_mask=attention_mask, image_rotary_emb=rotary_pos_emb
        )
        normed = self.adaLN_mlp_ln(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(normed)


class ErnieImageModel(nn.Module):
    def __init__(self, hidden_size=48, num_attention_heads=2, num_layers=5, ffn_hidden_size=96,
                 in_channels=IN_CHANNELS, out_channels=IN_CHANNELS, patch_size=1, text_in_dim=TEXT_DIM,
                 rope_theta=256, rope_axes_dim=(8, 8, 8), eps=1e-6):  # fmt: skip
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.patch_size, self.out_channels = patch_size, out_channels
        self.x_embedder = ErnieImagePatchEmbedDynamic(in_channels, hidden_size, patch_size)
        self.text_proj = (
            nn.Linear(text_in_dim, hidden_size, bias=False) if text_in_dim != hidden_size else None
        )
        self.time_linear_1 = nn.Linear(hidden_size, hidden_size)
        self.time_linear_2 = nn.Linear(hidden_size, hidden_size)
        self.pos_embed = ErnieImageEmbedND3(self.head_dim, rope_theta, rope_axes_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.layers = nn.ModuleList(
            ErnieImageSharedAdaLNBlock(hidden_size, num_attention_heads, ffn_hidden_size, eps)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.final_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def time_embedding(self, timesteps):
        half = self.hidden_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = timesteps[:, None].float() * freqs
        sample = torch.cat((args.sin(), args.cos()), dim=-1)  # flip_sin_to_cos=False
        return self.time_linear_2(F.silu(self.time_linear_1(sample)))

    def forward(self, x, timesteps, context, **kwargs):
        b, _, h, w = x.shape
        p = self.patch_size
        hp, wp = h // p, w // p
        text = self.text_proj(context) if self.text_proj is not None and context.numel() else context
        n_text = text.shape[1]
        hidden = torch.cat((self.x_embedder(x), text), dim=1)  # the image first, then the text
        text_ids = torch.zeros(b, n_text, 3)
        text_ids[..., 0] = torch.arange(n_text, dtype=torch.float32)
        image_ids = torch.zeros(hp, wp, 3)
        image_ids[..., 0] = float(n_text)
        image_ids[..., 1] = torch.arange(hp, dtype=torch.float32)[:, None]
        image_ids[..., 2] = torch.arange(wp, dtype=torch.float32)[None, :]
        image_ids = image_ids.view(1, hp * wp, 3).expand(b, -1, -1)
        rotary = self.pos_embed(torch.cat((image_ids, text_ids), dim=1))
        c = self.time_embedding(timesteps)
        temb = [t.unsqueeze(1) for t in self.adaLN_modulation(c).chunk(6, dim=-1)]
        for layer in self.layers:
            hidden = layer(hidden, rotary, temb)
        scale, shift = self.final_modulation(c).chunk(2, dim=-1)
        hidden = self.final_norm(hidden) * (1 + scale[:, None]) + shift[:, None]
        patches = self.final_linear(hidden)[:, : hp * wp]
        out = patches.view(b, hp, wp, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_channels, h, w)


def build(seed=0, **shape):
    torch.manual_seed(seed)
    return ErnieImageModel(**shape).eval()


def latent(batch, height, width, generator):
    """Neo's Ernie-Image latent: (B, C, h, w) (Flux.2's latent, patch 1)."""
    return torch.randn(batch, IN_CHANNELS, height, width, generator=generator)


def conds(batch, tokens=5, seed=0):
    """One cond entry: the text encoder's hidden states (Neo passes no mask or other extra)."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, TEXT_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds):
    """The patch-1 grid h × w, row-major, starting at token 0; the text follows it."""
    return CallLayout(1, latent.shape[-2], latent.shape[-1], before=0)
