"""A small Anima (Cosmos-Predict2 MiniTrainDIT) written for these tests in the layout of Forge
Neo's ``backend/nn/anima.py`` (loaded as ``backend.nn.anima``): ``Anima.blocks`` of ``Block`` s,
each with ``self_attn`` and ``cross_attn`` (both ``SelfCrossAttention``, calling the
``attention_function`` imported from ``backend.attention`` with q shaped (B, heads, tokens, d),
``skip_reshape=True``), a 3-axis split-half RoPE applied after the QK-norm in the
self-attention only, a (B, C, T, H, W) latent padded circularly to the 1×2×2 patch with a
padding-mask channel appended, tokens T-H-W row-major, and reference latents appended as extra
frames on the time axis (``dynamic_args.ref_latents``, module-level here, as Neo's global). The
math follows Neo's; the code is ours (no einops, torchvision or comfy_kitchen)."""

import math
import types

import torch
from backend.attention import attention_function
from torch import nn
from torch.nn import functional as F

from lib_seg.transformers import CallLayout

FAMILY = "Anima"
IN_CHANNELS, CONTEXT_DIM = 4, 16
BENCH_SHAPE = {"num_blocks": 28, "model_channels": 64, "num_heads": 2}

# Neo reads ``backend.args.dynamic_args.ref_latents`` (set by Anima's img2img "Reference"); the
# tests set this one.
dynamic_args = types.SimpleNamespace(ref_latents=[])


def apply_rope_split_half(x, rope):
    """Rotate the pairs (x[i], x[i + d/2]) of x (B, S, heads, d) by ``rope`` (1, S, 1, d/2, 2, 2)."""
    half = x.shape[-1] // 2
    pairs = torch.stack((x[..., :half], x[..., half:]), dim=-1).float()  # (..., d/2, 2)
    out = (rope * pairs.unsqueeze(-2)).sum(-1)  # row i of each 2×2 times the pair
    return torch.cat((out[..., 0], out[..., 1]), dim=-1).type_as(x)


class VideoRopePosition3DEmb(nn.Module):
    """Rotation matrices (T·H·W, d/2, 2, 2): the first angles for t, then h, then w, with the NTK
    scaled bases of Neo's Anima."""

    def __init__(
        self, head_dim, h_extrapolation_ratio=4.0, w_extrapolation_ratio=4.0, t_extrapolation_ratio=1.0
    ):
        super().__init__()
        self.dim_h = self.dim_w = head_dim // 6 * 2
        self.dim_t = head_dim - 2 * self.dim_h
        self.theta_h = 10000.0 * h_extrapolation_ratio ** (self.dim_h / (self.dim_h - 2))
        self.theta_w = 10000.0 * w_extrapolation_ratio ** (self.dim_w / (self.dim_w - 2))
        self.theta_t = 10000.0 * t_extrapolation_ratio ** (self.dim_t / (self.dim_t - 2))

    @staticmethod
    def angles(length, dim, theta):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        return torch.outer(torch.arange(length, dtype=torch.float32), freqs)

    def forward(self, t, h, w):
        at = self.angles(t, self.dim_t, self.theta_t)[:, None, None].expand(t, h, w, -1)
        ah = self.angles(h, self.dim_h, self.theta_h)[None, :, None].expand(t, h, w, -1)
        aw = self.angles(w, self.dim_w, self.theta_w)[None, None, :].expand(t, h, w, -1)
        angle = torch.cat((at, ah, aw), dim=-1).reshape(t * h * w, -1)
        cos, sin = angle.cos(), angle.sin()
        return torch.stack((cos, -sin, sin, cos), dim=-1).view(*angle.shape, 2, 2)


class GPT2FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.layer1, self.layer2 = nn.Linear(d_model, d_ff, bias=False), nn.Linear(d_ff, d_model, bias=False)
        self.activation = nn.GELU()

    def forward(self, x):
        return self.layer2(self.activation(self.layer1(x)))


class SelfCrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, n_heads=2, head_dim=16):
        super().__init__()
        self.is_SelfAttn = context_dim is None
        self.n_heads, self.head_dim = n_heads, head_dim
        context_dim = context_dim or query_dim
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_proj = nn.Linear(context_dim, inner, bias=False)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.v_proj = nn.Linear(context_dim, inner, bias=False)
        self.output_proj = nn.Linear(inner, query_dim, bias=False)
        for norm in (self.q_norm, self.k_norm):
            nn.init.normal_(norm.weight, 1.0, 0.1)

    def compute_qkv(self, x, context=None, rope_emb=None):
        source = x if context is None else context
        q, k, v = (
            proj(t).unflatten(-1, (self.n_heads, self.head_dim))
            for proj, t in ((self.q_proj, x), (self.k_proj, source), (self.v_proj, source))
        )
        q, k = self.q_norm(q), self.k_norm(k)  # (B, S, heads, d)
        if self.is_SelfAttn and rope_emb is not None:
            q, k = apply_rope_split_half(q, rope_emb), apply_rope_split_half(k, rope_emb)
        return q, k, v

    def forward(self, x, context=None, rope_emb=None, transformer_options=None):
        q, k, v = self.compute_qkv(x, context, rope_emb=rope_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, d)
        out = attention_function(
            q, k, v, self.n_heads, skip_reshape=True, transformer_options=transformer_options
        )
        return self.output_proj(out)


def modulation(dim, lora_dim, chunks=3):
    return nn.Sequential(
        nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False)
    )


def modulate(norm, x, scale, shift):
    return norm(x) * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, x_dim, context_dim, num_heads, mlp_ratio=2.0, adaln_lora_dim=8):
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfCrossAttention(x_dim, None, num_heads, x_dim // num_heads)
        self.layer_norm_cross_attn = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = SelfCrossAttention(x_dim, context_dim, num_heads, x_dim // num_heads)
        self.layer_norm_mlp = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(x_dim, int(x_dim * mlp_ratio))
        self.adaln_modulation_self_attn = modulation(x_dim, adaln_lora_dim)
        self.adaln_modulation_cross_attn = modulation(x_dim, adaln_lora_dim)
        self.adaln_modulation_mlp = modulation(x_dim, adaln_lora_dim)

    def forward(self, x_B_T_H_W_D, emb_B_T_D, crossattn_emb, rope_emb_L_1_1_D=None, adaln_lora_B_T_3D=None,
                extra_per_block_pos_emb=None, transformer_options=None):  # fmt: skip
        b, t, h, w, d = x_B_T_H_W_D.shape

        def mods(layer):  # (B, T, D) -> (B, T, 1, 1, D) shift, scale, gate
            return [m[:, :, None, None] for m in (layer(emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, dim=-1)]

        def tokens(x):
            return x.reshape(b, t * h * w, d)

        shift, scale, gate = mods(self.adaln_modulation_self_attn)
        normed = modulate(self.layer_norm_self_attn, x_B_T_H_W_D, scale, shift)
        out = self.self_attn(
            tokens(normed), None, rope_emb=rope_emb_L_1_1_D, transformer_options=transformer_options
        )
        x_B_T_H_W_D = x_B_T_H_W_D + gate * out.view(b, t, h, w, d)
        shift, scale, gate = mods(self.adaln_modulation_cross_attn)
        normed = modulate(self.layer_norm_cross_attn, x_B_T_H_W_D, scale, shift)
        out = self.cross_attn(tokens(normed), crossattn_emb, rope_emb=rope_emb_L_1_1_D,
                              transformer_options=transformer_options)  # fmt: skip
        x_B_T_H_W_D = x_B_T_H_W_D + gate * out.view(b, t, h, w, d)
        shift, scale, gate = mods(self.adaln_modulation_mlp)
        return x_B_T_H_W_D + gate * self.mlp(modulate(self.layer_norm_mlp, x_B_T_H_W_D, scale, shift))


class Anima(nn.Module):
    def __init__(self, in_channels=IN_CHANNELS, out_channels=IN_CHANNELS, patch_spatial=2, patch_temporal=1,
                 model_channels=32, crossattn_emb_channels=CONTEXT_DIM, adaln_lora_dim=8, num_blocks=6,
                 num_heads=2, mlp_ratio=2.0):  # fmt: skip
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.patch_spatial, self.patch_temporal = patch_spatial, patch_temporal
        self.model_channels = model_channels
        self.pos_embedder = VideoRopePosition3DEmb(model_channels // num_heads)
        self.t_linear_1 = nn.Linear(model_channels, model_channels, bias=False)
        self.t_linear_2 = nn.Linear(model_channels, 3 * model_channels, bias=False)
        self.t_embedding_norm = nn.RMSNorm(model_channels, eps=1e-6)
        patch_dim = (in_channels + 1) * patch_spatial * patch_spatial * patch_temporal  # + the padding mask
        self.x_embedder = nn.Linear(patch_dim, model_channels, bias=False)
        self.blocks = nn.ModuleList(
            Block(model_channels, crossattn_emb_channels, num_heads, mlp_ratio, adaln_lora_dim)
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.final_modulation = modulation(model_channels, adaln_lora_dim, chunks=2)
        self.final_linear = nn.Linear(
            model_channels, patch_spatial**2 * patch_temporal * out_channels, bias=False
        )

    def patchify(self, x):
        """(B, C, T, H, W) -> (B, T/r, H/m, W/n, C·r·m·n), channels outermost as Neo's."""
        b, c, t, h, w = x.shape
        r, m = self.patch_temporal, self.patch_spatial
        x = x.view(b, c, t // r, r, h // m, m, w // m, m).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, t // r, h // m, w // m, c * r * m * m)

    def unpatchify(self, x):
        b, t, h, w, _ = x.shape
        r, m = self.patch_temporal, self.patch_spatial
        x = x.view(b, t, h, w, m, m, r, self.out_channels).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, self.out_channels, t * r, h * m, w * m)

    def timestep_embedding(self, timesteps_B_T):
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = timesteps_B_T.float()[..., None] * freqs
        sample = torch.cat((args.cos(), args.sin()), dim=-1)
        return sample, self.t_linear_2(F.silu(self.t_linear_1(sample)))

    def forward(self, x, timesteps, context, padding_mask=None, **kwargs):
        orig_shape = list(x.shape)
        for ref in dynamic_args.ref_latents:  # reference frames follow the image on the time axis
            if x.shape[0] == 2:
                ref = torch.cat((ref, ref), dim=0)
            x = torch.cat((x, ref.to(x)), dim=2)
        r, m = self.patch_temporal, self.patch_spatial
        pad = (0, -x.shape[4] % m, 0, -x.shape[3] % m, 0, -x.shape[2] % r)
        x = F.pad(x, pad, mode="circular")
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[0], 1, x.shape[3], x.shape[4], dtype=x.dtype)
        else:
            padding_mask = F.interpolate(padding_mask, size=x.shape[-2:], mode="nearest")
        x = torch.cat((x, padding_mask.unsqueeze(1).expand(-1, -1, x.shape[2], -1, -1)), dim=1)
        x_B_T_H_W_D = self.x_embedder(self.patchify(x))
        _, t, h, w, _ = x_B_T_H_W_D.shape
        rope = self.pos_embedder(t, h, w)[None, :, None]  # (1, L, 1, d/2, 2, 2)
        timesteps_B_T = timesteps[:, None] if timesteps.ndim == 1 else timesteps
        sample, adaln_lora_B_T_3D = self.timestep_embedding(timesteps_B_T)
        emb_B_T_D = self.t_embedding_norm(sample)
        options = kwargs.get("transformer_options", {})
        for block in self.blocks:
            x_B_T_H_W_D = block(x_B_T_H_W_D, emb_B_T_D, context, rope_emb_L_1_1_D=rope,
                                adaln_lora_B_T_3D=adaln_lora_B_T_3D, transformer_options=options)  # fmt: skip
        shift, scale = (
            self.final_modulation(emb_B_T_D) + adaln_lora_B_T_3D[..., : 2 * self.model_channels]
        ).chunk(2, dim=-1)
        out = modulate(self.final_norm, x_B_T_H_W_D, scale[:, :, None, None], shift[:, :, None, None])
        out = self.unpatchify(self.final_linear(out))
        return out[:, :, : orig_shape[-3], : orig_shape[-2], : orig_shape[-1]]


def build(seed=0, **shape):
    torch.manual_seed(seed)
    return Anima(**shape).eval()


def latent(batch, height, width, generator):
    """Neo's Anima latent: (B, C, 1, h, w), one frame (Neo's Anima makes images only)."""
    return torch.randn(batch, IN_CHANNELS, 1, height, width, generator=generator)


def conds(batch, tokens=5, seed=0):
    """One cond entry: the LLM adapter's output (Neo runs the adapter in the text encoder)."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, CONTEXT_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds):
    """1×2×2 patches of the latent padded to even sides: ceil(h/2) × ceil(w/2) per frame; the
    self-attention holds only image tokens (then the reference frames)."""
    frames, height, width = latent.shape[-3:]
    return CallLayout(frames, (height + 1) // 2, (width + 1) // 2, before=0)
