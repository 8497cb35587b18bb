"""A small NextDiT written for these tests in Forge Neo's ``backend/nn/lumina.py`` layout (loaded
as ``backend.nn.lumina``): Lumina 2 and Z-Image, the one class Neo builds for both.

Neo's names and order: ``NextDiT`` with ``context_refiner`` (caption only, no modulation),
``noise_refiner`` (image only) and ``layers`` of ``JointTransformerBlock`` over
``cat(caption, image)``; each block's ``attention`` (``JointAttention``: fused ``qkv``, grouped kv
heads, ``q_norm``/``k_norm``, 3-axis RoPE) calls this module's ``attention_function`` with q
(B, heads, tokens, d) and the mask (None in ``layers``; the caption mask in the context refiner).
The latent is padded circularly to the 2×2 patch; with ``pad_tokens_multiple`` (Z-Image) the
caption is padded with ``cap_pad_token`` and the image with ``x_pad_token`` up to that multiple.
Z-Image's blocks modulate through a bare ``Linear`` (``z_image_modulation``), Lumina 2's through
``SiLU`` first. The math follows Neo; the code is ours. One deviation for the tiny width: Z-Image's
time embedding is ``min(dim, 256)`` wide (Neo: 256, which equals ``min(dim, 256)`` at the real
width of 3840)."""

import math

import torch
import torch.nn.functional as F
from backend.attention import attention_function
from torch import nn

from lib_seg.transformers import CallLayout

FAMILY = "Z-Image"
CHANNELS, CAPTION_DIM, PATCH, PAD_MULTIPLE = 16, 24, 2, 32
VARIANTS = {
    # tiny versions of the real configurations (backend/huggingface/*/transformer/config.json)
    "Z-Image": dict(dim=32, n_heads=2, n_kv_heads=2, axes_dims=(4, 6, 6), rope_theta=256.0,
                    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=PAD_MULTIPLE,
                    ffn_dim_multiplier=8.0 / 3.0),
    "Lumina 2": dict(dim=32, n_heads=2, n_kv_heads=1, axes_dims=(4, 6, 6), rope_theta=10000.0,
                     ffn_dim_multiplier=4.0),
}  # fmt: skip
# the real block counts (Z-Image-Turbo: 30 layers, 3840 wide, 30 heads; Lumina 2: 26, 2304, 24)
BENCH_SHAPE = dict(n_layers=30, n_refiner_layers=2, dim=256, n_heads=4, n_kv_heads=4, axes_dims=(16, 24, 24))


def pad_to_patch_size(x, patch):
    pad_h, pad_w = (-x.shape[-2]) % patch, (-x.shape[-1]) % patch
    return F.pad(x, (0, pad_w, 0, pad_h), mode="circular")


def rope(pos, dim, theta):
    """(B, N) positions -> rotation matrices (B, N, dim/2, 2, 2), as Neo's ``flux.rope``."""
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64)
    angle = pos.double()[..., None] * (1.0 / theta**scale)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack((cos, -sin, sin, cos), dim=-1).view(*angle.shape, 2, 2).float()


class EmbedND(nn.Module):
    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids):
        axes = range(ids.shape[-1])
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in axes], dim=-3)
        return emb.unsqueeze(1)  # (B, 1, N, d/2, 2, 2)


def apply_rope(xq, xk, freqs_cis):
    """q, k (B, N, heads, d) rotated by ``freqs_cis`` (B, N, 1, d/2, 2, 2)."""

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        rotated = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
        return rotated.reshape(x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def modulate(x, scale):
    return x * (1 + scale.unsqueeze(1))


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat((args.cos(), args.sin()), dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256, output_size=None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, output_size or hidden_size))  # fmt: skip
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class JointAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_local_heads, self.n_local_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * self.n_local_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, elementwise_affine=True)
        self.k_norm = nn.RMSNorm(self.head_dim, elementwise_affine=True)

    def forward(self, x, x_mask, freqs_cis, transformer_options=None):
        bsz, seqlen, _ = x.shape
        sizes = [self.n_local_heads * self.head_dim] + [self.n_local_kv_heads * self.head_dim] * 2
        xq, xk, xv = torch.split(self.qkv(x), sizes, dim=-1)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rope(self.q_norm(xq), self.k_norm(xk), freqs_cis)
        n_rep = self.n_local_heads // self.n_local_kv_heads
        xk = xk.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        xv = xv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        output = attention_function(
            xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), self.n_local_heads, x_mask,
            skip_reshape=True, transformer_options=transformer_options or {},
        )  # fmt: skip
        return self.out(output)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, multiple_of, ffn_dim_multiplier):
        super().__init__()
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    def __init__(self, layer_id, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps,
                 modulation=True, z_image_modulation=False, adaln_dim=None):  # fmt: skip
        super().__init__()
        self.layer_id = layer_id
        self.attention = JointAttention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, dim, multiple_of, ffn_dim_multiplier)
        self.attention_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            if z_image_modulation:
                self.adaLN_modulation = nn.Sequential(nn.Linear(adaln_dim, 4 * dim))
            else:
                self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, 4 * dim))

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options=None):
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            attn = self.attention(modulate(self.attention_norm1(x), scale_msa), x_mask, freqs_cis,
                                  transformer_options=transformer_options)  # fmt: skip
            x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(attn)
            ff = self.feed_forward(modulate(self.ffn_norm1(x), scale_mlp))
            return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(ff)
        attn = self.attention(self.attention_norm1(x), x_mask, freqs_cis, transformer_options)
        x = x + self.attention_norm2(attn)
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, adaln_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, hidden_size))

    def forward(self, x, c):
        return self.linear(modulate(self.norm_final(x), self.adaLN_modulation(c)))


class NextDiT(nn.Module):
    def __init__(self, patch_size=PATCH, in_channels=CHANNELS, dim=32, n_layers=6, n_refiner_layers=2,
                 n_heads=2, n_kv_heads=None, multiple_of=16, ffn_dim_multiplier=4.0, norm_eps=1e-5,
                 cap_feat_dim=CAPTION_DIM, axes_dims=(4, 6, 6), rope_theta=10000.0, z_image_modulation=False,
                 time_scale=1.0, pad_tokens_multiple=None):  # fmt: skip
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.time_scale = patch_size, time_scale
        self.pad_tokens_multiple = pad_tokens_multiple
        adaln_dim = min(dim, 256) if z_image_modulation else min(dim, 1024)
        block = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, multiple_of=multiple_of,
                     ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=norm_eps)  # fmt: skip
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.noise_refiner = nn.ModuleList(
            JointTransformerBlock(i, **block, z_image_modulation=z_image_modulation, adaln_dim=adaln_dim)
            for i in range(n_refiner_layers)
        )
        self.context_refiner = nn.ModuleList(
            JointTransformerBlock(i, **block, modulation=False) for i in range(n_refiner_layers)
        )
        time_width = adaln_dim if z_image_modulation else None
        self.t_embedder = TimestepEmbedder(min(dim, 1024), output_size=time_width)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(cap_feat_dim, eps=norm_eps),
                                          nn.Linear(cap_feat_dim, dim))  # fmt: skip
        self.layers = nn.ModuleList(
            JointTransformerBlock(i, **block, z_image_modulation=z_image_modulation, adaln_dim=adaln_dim)
            for i in range(n_layers)
        )
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, adaln_dim)
        if pad_tokens_multiple is not None:
            self.x_pad_token = nn.Parameter(torch.randn(1, dim))
            self.cap_pad_token = nn.Parameter(torch.randn(1, dim))
        assert dim // n_heads == sum(axes_dims)
        self.rope_embedder = EmbedND(rope_theta, axes_dims)
        self.dim, self.n_heads = dim, n_heads

    def patchify_and_embed(self, x, cap_feats, cap_mask, t, num_tokens, transformer_options=None):
        bsz, p = x.shape[0], self.patch_size
        if self.pad_tokens_multiple is not None:
            pad = (-cap_feats.shape[1]) % self.pad_tokens_multiple
            cap_pad = self.cap_pad_token.to(cap_feats).unsqueeze(0).repeat(bsz, pad, 1)
            cap_feats = torch.cat((cap_feats, cap_pad), dim=1)
        cap_pos_ids = torch.zeros(bsz, cap_feats.shape[1], 3)
        cap_pos_ids[:, :, 0] = torch.arange(cap_feats.shape[1], dtype=torch.float32) + 1.0
        _, c, height, width = x.shape
        h_tokens, w_tokens = height // p, width // p
        x = x.view(bsz, c, h_tokens, p, w_tokens, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        x = self.x_embedder(x)
        x_pos_ids = torch.zeros(bsz, x.shape[1], 3)
        x_pos_ids[:, :, 0] = cap_feats.shape[1] + 1
        rows, columns = torch.arange(h_tokens).float(), torch.arange(w_tokens).float()
        x_pos_ids[:, :, 1] = rows.view(-1, 1).repeat(1, w_tokens).flatten()
        x_pos_ids[:, :, 2] = columns.view(1, -1).repeat(h_tokens, 1).flatten()
        if self.pad_tokens_multiple is not None:
            pad = (-x.shape[1]) % self.pad_tokens_multiple
            x = torch.cat((x, self.x_pad_token.to(x).unsqueeze(0).repeat(bsz, pad, 1)), dim=1)
            x_pos_ids = F.pad(x_pos_ids, (0, 0, 0, pad))
        freqs_cis = self.rope_embedder(torch.cat((cap_pos_ids, x_pos_ids), dim=1)).movedim(1, 2).to(x.dtype)
        n_cap = cap_pos_ids.shape[1]
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, freqs_cis[:, :n_cap], None, transformer_options)
        for layer in self.noise_refiner:
            x = layer(x, None, freqs_cis[:, n_cap:], t, transformer_options)
        return torch.cat((cap_feats, x), dim=1), None, (height, width), n_cap, freqs_cis

    def unpatchify(self, x, img_size, cap_size):
        (height, width), p = img_size, self.patch_size
        image = x[:, cap_size : cap_size + (height // p) * (width // p)]
        image = image.reshape(x.shape[0], height // p, width // p, p, p, self.out_channels)
        return image.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], self.out_channels, height, width)

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options=None,
                **kwargs):  # fmt: skip
        t = 1.0 - timesteps
        _, _, h, w = x.shape
        x = pad_to_patch_size(x, self.patch_size)
        t = self.t_embedder(t * self.time_scale, dtype=x.dtype)
        cap_feats = self.cap_embedder(context)
        x, mask, img_size, cap_size, freqs_cis = self.patchify_and_embed(
            x, cap_feats, attention_mask, t, num_tokens, transformer_options=transformer_options
        )
        for layer in self.layers:
            x = layer(x, mask, freqs_cis, t, transformer_options=transformer_options)
        x = self.final_layer(x, t)
        return -self.unpatchify(x, img_size, cap_size)[:, :, :h, :w]


def build(seed=0, variant=FAMILY, **shape):
    """A random-weight ``variant`` ("Z-Image" or "Lumina 2") NextDiT in eval mode."""
    torch.manual_seed(seed)
    model = NextDiT(**{**VARIANTS[variant], **shape})
    with torch.no_grad():  # RMSNorm scales away from 1, so every weight matters
        for module in model.modules():
            if isinstance(module, nn.RMSNorm) and module.weight is not None:
                module.weight.mul_(1 + 0.1 * torch.randn_like(module.weight))
    return model.eval()


def latent(batch, height, width, generator):
    return torch.randn(batch, CHANNELS, height, width, generator=generator)


def conds(batch, tokens=5, seed=0):
    """One Forge cond entry: Neo's Gemma-2 / Qwen3 conditioning is the caption alone (no extras)."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, CAPTION_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds, variant=FAMILY):
    """The caption padded to the multiple (Z-Image) first, then the 2×2 patches of the latent padded
    to even sides, row-major; the image pad tokens after them."""
    caption = conds[0]["cross_attn"].shape[1]
    multiple = VARIANTS[variant].get("pad_tokens_multiple")
    before = math.ceil(caption / multiple) * multiple if multiple else caption
    height, width = math.ceil(latent.shape[-2] / PATCH), math.ceil(latent.shape[-1] / PATCH)
    return CallLayout(1, height, width, before=before)
