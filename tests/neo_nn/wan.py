"""A small Wan 2.1 / 2.2 video transformer written for these tests in the layout of Forge Neo's
``backend/nn/wan.py`` (loaded as ``backend.nn.wan``): ``WanModel.blocks`` of ``WanAttentionBlock`` s,
each with ``self_attn`` (``WanSelfAttention``: QK-norm, then a 3-axis RoPE over (t, h, w), then
this module's ``attention``, the name Neo's Radial Attention replaces, which calls the
``attention_function`` imported from ``backend.attention`` with q shaped (B, tokens, heads·d)) and
``cross_attn`` (``WanT2VCrossAttention`` or ``WanI2VCrossAttention``, calling
``attention_function`` directly with the text as keys). The latent is (B, C, T, H, W), padded
circularly to the (1, 2, 2) patch and cut by a stride-patch ``Conv3d``: tokens T-H-W row-major.
I2V's conditioning is concatenated on the channels (Neo's ``dynamic_args.concat_latent``, here
module-level); ``time_dim_concat`` frames are appended after the video on the time axis and cut
from the output. The math follows Neo's; the code is ours (no einops)."""

import math
import types

import torch
from backend.attention import attention_function
from torch import nn
from torch.nn import functional as F

from lib_seg.transformers import CallLayout

FAMILY = "Wan"
IN_CHANNELS, TEXT_DIM, FRAMES = 4, 16, 3
BENCH_SHAPE = {"num_layers": 40, "dim": 128, "ffn_dim": 256, "num_heads": 2}  # Wan 2.1 14B's depth

# Neo reads ``backend.args.dynamic_args.concat_latent`` (set by its I2V / first-last-frame code
# when the model has more input channels than the latent); the tests set this one.
dynamic_args = types.SimpleNamespace(concat_latent=None)


def attention(*args, **kwargs):  # the name Radial Attention replaces
    return attention_function(*args, **kwargs)


def sinusoidal_embedding_1d(dim, position):
    half = dim // 2
    position = position.float()
    angles = position[:, None] * torch.pow(10000, -torch.arange(half, dtype=torch.float32) / half)[None]
    return torch.cat((angles.cos(), angles.sin()), dim=1)


def rope(pos, dim, theta):
    """Rotation matrices (..., tokens, dim/2, 2, 2) for positions ``pos`` (..., tokens)."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = pos.double()[..., None] * omega
    cos, sin = angle.cos(), angle.sin()
    return torch.stack((cos, -sin, sin, cos), dim=-1).view(*angle.shape, 2, 2).float()


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        parts = [rope(ids[..., axis], self.axes_dim[axis], self.theta) for axis in range(ids.shape[-1])]
        return torch.cat(parts, dim=-3).unsqueeze(1)


def apply_rope1(x, freqs):
    """``x`` (B, tokens, heads, d) rotated pairwise by ``freqs`` (B, tokens, 1, d/2, 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)


def pad_to_patch_size(x, patch_size):
    pad = ()
    for axis in range(x.ndim - 2):
        pad = (0, (patch_size[axis] - x.shape[axis + 2] % patch_size[axis]) % patch_size[axis], *pad)
    return F.pad(x, pad, mode="circular")


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x, freqs, transformer_options={}):  # noqa: B006 (Neo's signature)
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = apply_rope1(self.norm_q(self.q(x)).view(b, s, n, d), freqs)
        k = apply_rope1(self.norm_k(self.k(x)).view(b, s, n, d), freqs)
        out = attention(q.view(b, s, n * d), k.view(b, s, n * d), self.v(x).view(b, s, n * d),
                        heads=self.num_heads, transformer_options=transformer_options)  # fmt: skip
        return self.o(out)


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x, context, **kwargs):
        q, k, v = self.norm_q(self.q(x)), self.norm_k(self.k(context)), self.v(context)
        return self.o(attention_function(q, k, v, heads=self.num_heads))


class WanI2VCrossAttention(WanSelfAttention):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        super().__init__(dim, num_heads, window_size, qk_norm, eps)
        self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_k_img = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x, context, context_img_len):
        context_img, context = context[:, :context_img_len], context[:, context_img_len:]
        q = self.norm_q(self.q(x))
        k, v = self.norm_k(self.k(context)), self.v(context)
        k_img, v_img = self.norm_k_img(self.k_img(context_img)), self.v_img(context_img)
        img_x = attention_function(q, k_img, v_img, heads=self.num_heads)
        return self.o(attention_function(q, k, v, heads=self.num_heads) + img_x)


WAN_CROSSATTENTION_CLASSES = {"t2v_cross_attn": WanT2VCrossAttention, "i2v_cross_attn": WanI2VCrossAttention}


def repeat_e(e, x):
    repeats = x.shape[1] // e.shape[1] if e.shape[1] > 1 else 1
    return e if repeats == 1 else torch.repeat_interleave(e, repeats, dim=1)


class WanAttentionBlock(nn.Module):
    def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True,
                 cross_attn_norm=False, eps=1e-6):  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WAN_CROSSATTENTION_CLASSES[cross_attn_type](dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))  # fmt: skip
        self.modulation = nn.Parameter(0.1 * torch.randn(1, 6, dim))

    def forward(self, x, e, freqs, context, context_img_len=257, transformer_options={}):  # noqa: B006
        e = (self.modulation.unsqueeze(0) + e).unbind(2)
        y = self.self_attn(self.norm1(x) * (1 + repeat_e(e[1], x)) + repeat_e(e[0], x), freqs,
                           transformer_options=transformer_options)  # fmt: skip
        x = x + y * repeat_e(e[2], x)
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len)
        y = self.ffn(self.norm2(x) * (1 + repeat_e(e[4], x)) + repeat_e(e[3], x))
        return x + y * repeat_e(e[5], x)


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(0.1 * torch.randn(1, 2, dim))

    def forward(self, x, e):
        e = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + repeat_e(e[1], x)) + repeat_e(e[0], x))


class MLPProj(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))  # fmt: skip

    def forward(self, image_embeds):
        return self.proj(image_embeds)


class WanModel(nn.Module):
    def __init__(self, model_type="t2v", patch_size=(1, 2, 2), in_dim=IN_CHANNELS, dim=32, ffn_dim=64,
                 freq_dim=32, text_dim=TEXT_DIM, out_dim=IN_CHANNELS, num_heads=2, num_layers=4,
                 qk_norm=True, cross_attn_norm=True, eps=1e-6, clip_dim=8):  # fmt: skip
        super().__init__()
        self.model_type, self.patch_size = model_type, patch_size
        self.in_dim, self.dim, self.freq_dim, self.out_dim = in_dim, dim, freq_dim, out_dim
        self.num_heads, self.num_layers = num_heads, num_layers
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))  # fmt: skip
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        cross_attn_type = "t2v_cross_attn" if model_type == "t2v" else "i2v_cross_attn"
        block_args = (cross_attn_type, dim, ffn_dim, num_heads, (-1, -1), qk_norm, cross_attn_norm, eps)
        self.blocks = nn.ModuleList(WanAttentionBlock(*block_args) for _ in range(num_layers))
        self.head = Head(dim, out_dim, patch_size, eps)
        d = dim // num_heads
        self.rope_embedder = EmbedND(d, 10000.0, [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])
        self.img_emb = MLPProj(clip_dim, dim) if model_type == "i2v" else None

    def forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):  # noqa: B006
        x = self.patch_embedding(x).to(x.dtype)
        grid_sizes = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).to(x.dtype))
        e = e.reshape(t.shape[0], -1, e.shape[-1])
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.cat((self.img_emb(clip_fea), context), dim=1)
            context_img_len = clip_fea.shape[-2]
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        transformer_options["total_blocks"] = len(self.blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:

                def block_wrap(args, block=block):
                    img = block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                context_img_len=context_img_len,
                                transformer_options=args["transformer_options"])  # fmt: skip
                    return {"img": img}

                args = {"img": x, "txt": context, "vec": e0, "pe": freqs,
                        "transformer_options": transformer_options}  # fmt: skip
                x = blocks_replace[("double_block", i)](args, {"original_block": block_wrap})["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len,
                          transformer_options=transformer_options)  # fmt: skip
        return self.unpatchify(self.head(x, e), grid_sizes)

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={},  # noqa: B006
                **kwargs):  # fmt: skip
        bs, c, t, h, w = x.shape
        if c < self.in_dim:  # I2V: the mask and the first/last-frame latents on the channels
            r = dynamic_args.concat_latent.to(x)
            if x.shape[0] == 2:  # Neo's batch_cond_uncond
                r = torch.cat((r, r), dim=0)
            x = torch.cat((x, r), dim=1)
        x = pad_to_patch_size(x, self.patch_size)
        pt, ph, pw = self.patch_size
        t_len, h_len, w_len = (t + pt // 2) // pt, (h + ph // 2) // ph, (w + pw // 2) // pw
        if time_dim_concat is not None:
            x = torch.cat((x, pad_to_patch_size(time_dim_concat, self.patch_size)), dim=2)
            t_len = (x.shape[2] + pt // 2) // pt
        ids = torch.zeros(t_len, h_len, w_len, 3)
        ids[..., 0] = torch.arange(t_len, dtype=torch.float32).view(-1, 1, 1)
        ids[..., 1] = torch.arange(h_len, dtype=torch.float32).view(1, -1, 1)
        ids[..., 2] = torch.arange(w_len, dtype=torch.float32).view(1, 1, -1)
        ids = ids.reshape(1, -1, 3).expand(bs, -1, -1)
        freqs = self.rope_embedder(ids).movedim(1, 2)
        out = self.forward_orig(x, timestep, context, clip_fea=clip_fea, freqs=freqs,
                                transformer_options=transformer_options, **kwargs)  # fmt: skip
        return out[:, :, :t, :h, :w]

    def unpatchify(self, x, grid_sizes):
        b, c = x.shape[0], self.out_dim
        u = x[:, : math.prod(grid_sizes)].view(b, *grid_sizes, *self.patch_size, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, c, *[i * j for i, j in zip(grid_sizes, self.patch_size, strict=True)])


def build(seed=0, **shape):
    torch.manual_seed(seed)
    return WanModel(**shape).eval()


def latent(batch, height, width, generator):
    """Neo's Wan latent: (B, C, T, h, w), here T = 3 latent frames (9 video frames)."""
    return torch.randn(batch, IN_CHANNELS, FRAMES, height, width, generator=generator)


def conds(batch, tokens=5, seed=0):
    """One cond entry: the UMT5 text (Neo's Wan has no other conditioning entry)."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, TEXT_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds):
    """1×2×2 patches of the latent padded to even sides: T frames of ceil(h/2) × ceil(w/2) tokens;
    the self-attention holds only video tokens (then any time_dim_concat frames)."""
    frames, height, width = latent.shape[-3:]
    return CallLayout(frames, (height + 1) // 2, (width + 1) // 2, before=0)
