"""A small Flux.2 (Klein) transformer written for these tests, laid out the way Forge Neo's
``backend/nn/flux.py`` is. In Neo, Flux.1 and Flux.2 share that module and its
``IntegratedFluxTransformer2DModel``; here the file is ``flux2_model.py`` (loaded as
``backend.nn.flux2_model``) because ``tests/forge_nn/flux.py`` already stands for Forge's
``backend.nn.flux``. Like Neo's module, this one holds ``attention(q, k, v, pe, mask,
transformer_options)``, which applies RoPE to the QK-normed queries and keys and then calls the
``attention_function`` imported here from ``backend.attention`` with q shaped (B, heads, tokens, d):
the blocks reach the kernel through ``attention`` in their own module globals (``KERNEL_PATHS``
"Flux.2").

The math is Flux.2's (the code is ours): one modulation shared by all double blocks and one by all
single blocks (``global_modulation``), SiLU-gated MLPs without biases, 4-axis RoPE with the text
positions on the last axis, ``patch_size`` 1 over a 128-channel latent (``LATENT_CHANNELS`` here),
text then image in every attention, and reference latents (``ref_latents``, Neo also reads them
from ``dynamic_args``) appended after the image tokens on RoPE index 10, 20, … The same class with
``global_modulation=False, patch_size=2`` is Neo's Flux.1 (per-block modulation, 2×2 patches,
Kontext references on index 1 at an offset)."""

from dataclasses import dataclass

import torch
from backend.attention import attention_function
from backend.nn.flux import apply_rope, rope, timestep_embedding
from torch import nn

from lib_seg.transformers import CallLayout

FAMILY = "Flux.2"
LATENT_CHANNELS = 8  # stands in for Flux.2's 128 (the VAE's 32 channels packed 2×2)
CONTEXT_DIM = 12  # stands in for Klein's stacked Qwen3 layers (7680 on 4B, 12288 on 9B)
# Klein 4B's block counts and head width (5 double, 20 single, head dim 128) at 2 heads
BENCH_SHAPE = dict(hidden_size=256, num_heads=2, axes_dim=(32, 32, 32, 32), depth=5, depth_single_blocks=20)
VAE_SCALE = 16  # Flux.2's VAE: 128 packed channels at 1/16 of the image size


def attention(q, k, v, pe, mask=None, transformer_options=None):
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True, mask=mask,
                              transformer_options=transformer_options or {})  # fmt: skip





class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim, double, bias=True):
        super().__init__()
        self.is_double, self.multiplier = double, 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec):
        out = self.lin(nn.functional.silu(vec[:, None] if vec.ndim == 2 else vec)).chunk(self.multiplier, -1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


class SiLUActivation(nn.Module):
    def forward(self, x):
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class YakActivation(nn.Module):
    def forward(self, x):
        up, gate = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class YakMLP(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inner), nn.Linear(hidden, inner)
        self.down_proj = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def build_mlp(hidden, inner, mlp_silu_act, yak_mlp):
    if yak_mlp:
        return YakMLP(hidden, inner)
    if mlp_silu_act:
        return nn.Sequential(nn.Linear(hidden, 2 * inner, bias=False), SiLUActivation(),
                             nn.Linear(inner, hidden, bias=False))  # fmt: skip
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))


def modulate(x, mod):
    return (1 + mod.scale) * x + mod.shift


def split_heads(qkv, heads):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False, modulation=True, mlp_silu_act=False,
                 proj_bias=True, yak_mlp=False):  # fmt: skip
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.num_heads, self.modulation = num_heads, modulation
        for stream in ("img", "txt"):
            if modulation:
                setattr(self, f"{stream}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden_size, num_heads, qkv_bias, proj_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", build_mlp(hidden_size, inner, mlp_silu_act, yak_mlp))

    def qkv_of(self, x, norm, attn, mod):
        q, k, v = split_heads(attn.qkv(modulate(norm(x), mod)), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        if self.modulation:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = self.img_mod(vec), self.txt_mod(vec)
        else:  # Flux.2: the model's shared modulation
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        img_q, img_k, img_v = self.qkv_of(img, self.img_norm1, self.img_attn, img_mod1)
        txt_q, txt_k, txt_v = self.qkv_of(txt, self.txt_norm1, self.txt_attn, txt_mod1)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(modulate(self.img_norm2(img), img_mod2))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod2))
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, modulation=True, mlp_silu_act=False, bias=True,
                 yak_mlp=False):  # fmt: skip
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp_hidden_dim_first = self.mlp_hidden_dim * (2 if mlp_silu_act or yak_mlp else 1)
        self.mlp_act = YakActivation() if yak_mlp else SiLUActivation() if mlp_silu_act else nn.GELU("tanh")
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim_first, bias=bias)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=bias)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden_size, double=False) if modulation else None

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        mod = self.modulation(vec)[0] if self.modulation is not None else vec
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), mod)).split(
            [3 * self.hidden_size, self.mlp_hidden_dim_first], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size, out_channels, bias=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None]).chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


def pad_to_patch_size(x, patch):
    return nn.functional.pad(x, (0, -x.shape[-1] % patch, 0, -x.shape[-2] % patch), mode="circular")


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(self, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, vec_in_dim=None,
                 context_in_dim=CONTEXT_DIM, hidden_size=32, mlp_ratio=3.0, num_heads=2, depth=5,
                 depth_single_blocks=2, axes_dim=(4, 4, 4, 4), theta=2000, patch_size=1, qkv_bias=False,
                 guidance_embed=False, txt_ids_dims=(3,), global_modulation=True, mlp_silu_act=True,
                 ops_bias=False, default_ref_method="index", ref_index_scale=10.0, yak_mlp=False,
                 txt_norm=False):  # fmt: skip
        super().__init__()
        self.guidance_embed, self.patch_size, self.axes_dim, self.theta = (
            guidance_embed,
            patch_size,
            axes_dim,
            theta,
        )
        self.in_channels = in_channels * patch_size**2
        self.out_channels = out_channels * patch_size**2
        self.img_in = nn.Linear(self.in_channels, hidden_size, bias=ops_bias)
        self.time_in = nn.Linear(256, hidden_size, bias=ops_bias)
        if vec_in_dim is not None:
            self.vec_in_dim = vec_in_dim
            self.vector_in = nn.Linear(vec_in_dim, hidden_size)
        self.guidance_in = nn.Linear(256, hidden_size, bias=ops_bias) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size, bias=ops_bias)
        self.txt_norm = RMSNorm(context_in_dim) if txt_norm else None
        per_block = global_modulation is False
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                hidden_size, num_heads, mlp_ratio, qkv_bias, per_block, mlp_silu_act, ops_bias, yak_mlp
            )
            for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio, per_block, mlp_silu_act, ops_bias, yak_mlp)
            for _ in range(depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden_size, self.out_channels, bias=ops_bias)
        if global_modulation:
            self.double_stream_modulation_img = Modulation(hidden_size, double=True, bias=False)
            self.double_stream_modulation_txt = Modulation(hidden_size, double=True, bias=False)
            self.single_stream_modulation = Modulation(hidden_size, double=False, bias=False)
        self.txt_ids_dims, self.global_modulation = tuple(txt_ids_dims), global_modulation
        self.default_ref_method, self.ref_index_scale = default_ref_method, ref_index_scale

    def process_img(self, x, index=0.0, h_offset=0, w_offset=0):
        """(B, C, h, w) -> tokens (B, ceil(h/p)·ceil(w/p), C·p·p) and their positions."""
        b, c = x.shape[:2]
        p = self.patch_size
        x = pad_to_patch_size(x, p)
        hl, wl = x.shape[-2] // p, x.shape[-1] // p
        img = x.view(b, c, hl, p, wl, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hl * wl, c * p * p)
        ids = torch.zeros(hl, wl, len(self.axes_dim))
        ids[..., 0] = index
        ids[..., 1] = torch.arange(hl, dtype=torch.float32)[:, None] + (h_offset + p // 2) // p
        ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None, :] + (w_offset + p // 2) // p
        return img, ids.reshape(1, hl * wl, -1).expand(b, -1, -1)

    def with_references(self, img, img_ids, ref_latents):
        """Each reference's tokens after the image: Flux.2 on RoPE index 10, 20, …; Kontext on
        index 1, placed beside or below the previous references."""
        index, h, w = 0.0, 0, 0
        for ref in ref_latents:
            h_offset = w_offset = 0
            if self.default_ref_method == "index":
                index += self.ref_index_scale
            else:
                index = 1.0
                if ref.shape[-2] + h > ref.shape[-1] + w:
                    w_offset = w
                else:
                    h_offset = h
                h, w = max(h, ref.shape[-2] + h_offset), max(w, ref.shape[-1] + w_offset)
            tokens, ids = self.process_img(ref.to(img), index, h_offset, w_offset)
            img = torch.cat((img, tokens.expand(img.shape[0], -1, -1)), dim=1)
            img_ids = torch.cat((img_ids, ids.expand(img.shape[0], -1, -1)), dim=1)
        return img, img_ids

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):  # fmt: skip
        b, _, h, w = x.shape
        p = self.patch_size
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        if ref_latents:
            img, img_ids = self.with_references(img, img_ids, ref_latents)
        txt_ids = torch.zeros(b, context.shape[1], len(self.axes_dim))
        for axis in self.txt_ids_dims:
            txt_ids[..., axis] = torch.arange(context.shape[1], dtype=torch.float32)
        pe = rope(torch.cat((txt_ids, img_ids), dim=1), self.axes_dim, self.theta)
        vec = self.time_in(timestep_embedding(timestep, 256))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        if hasattr(self, "vec_in_dim"):
            vec = vec + self.vector_in(y if y is not None else torch.zeros(b, self.vec_in_dim))
        txt = self.txt_in(self.txt_norm(context) if self.txt_norm is not None else context)
        out = self.blocks(
            self.img_in(img), txt, vec, pe, kwargs.get("attention_mask"), transformer_options or {}
        )
        out = out[:, :img_tokens].view(b, (h + p - 1) // p, (w + p - 1) // p, -1, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, out.shape[3], -1, out.shape[2] * p)[:, :, :h, :w]

    def blocks(self, img, txt, vec, pe, mask, options):
        double_vec = vec
        if self.global_modulation:
            double_vec = (self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec))
        for block in self.double_blocks:
            img, txt = block(
                img=img, txt=txt, vec=double_vec, pe=pe, attn_mask=mask, transformer_options=options
            )
        x = torch.cat((txt, img), dim=1)
        single_vec = self.single_stream_modulation(vec)[0] if self.global_modulation else vec
        for block in self.single_blocks:
            x = block(x, vec=single_vec, pe=pe, attn_mask=mask, transformer_options=options)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def build(seed=0, **shape):
    """A random-weight Flux.2 Klein-like model (5 double blocks, 2 single) in eval mode."""
    torch.manual_seed(seed)
    return IntegratedFluxTransformer2DModel(**shape).eval()


def latent(batch, height, width, generator=None):
    return torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator)


def conds(batch, tokens=5, seed=0):
    """Klein's cond entry: the text only (no pooled vector, no distilled guidance value)."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, CONTEXT_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds):
    """Patch 1: one image token per latent pixel, row-major, after the text tokens."""
    return CallLayout(
        1, int(latent.shape[-2]), int(latent.shape[-1]), before=int(conds[0]["cross_attn"].shape[1])
    )
