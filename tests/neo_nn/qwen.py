"""A small Qwen-Image transformer written for these tests, laid out the way Forge Neo's
``backend/nn/qwen.py`` is (loaded as ``backend.nn.qwen`` by ``standin_neo_transformers``):
``QwenImageTransformer2DModel.transformer_blocks`` of ``QwenImageTransformerBlock`` s, each with
one joint ``attn`` (``Attention``) that projects the image and the text stream, QK-RMS-normalises
them per head, concatenates ``cat(txt, img)``, applies the 3-axis RoPE and calls the
``attention_function`` imported from ``backend.attention`` with q, k, v as (B, tokens, heads·d)
and no mask (Neo's blocks pass none). The latent is 5-D, (B, C, 1, h, w), from a video VAE; it
is padded circularly to a multiple of (1, p, p) and cut into p × p patches, row-major. Qwen-Image-
Edit's reference latents (``ref_latents``, else the global ``dynamic_args.ref_latents`` that Neo
keeps in ``backend.args``) are patchified the same way and appended after the image tokens. The
math is Qwen-Image's; the code is ours."""

import math
import types

import torch
from backend.attention import attention_function
from torch import nn

from lib_seg.transformers import CallLayout

FAMILY = "Qwen-Image"
LATENT_CHANNELS, CONTEXT_DIM = 4, 16
BENCH_SHAPE = {"num_layers": 60, "num_attention_heads": 4, "attention_head_dim": 32,
               "axes_dims_rope": (8, 12, 12)}  # fmt: skip

# Neo: ``from backend.args import dynamic_args`` (the Edit engine puts the reference latents there)
dynamic_args = types.SimpleNamespace(ref_latents=[])


def pad_to_patch_size(x, patch):
    """Circular padding of the trailing axes up to multiples of ``patch`` (Neo's backend.utils)."""
    pad = ()
    for axis, size in enumerate(patch):
        pad = (0, (size - x.shape[axis + 2] % size) % size, *pad)
    return nn.functional.pad(x, pad, mode="circular")


class EmbedND(nn.Module):
    """Flux's 3-axis RoPE: rotation matrices (B, 1, tokens, d/2, 2, 2) for ids (B, tokens, 3)."""

    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        angles = []
        for axis, dim in enumerate(self.axes_dim):
            omega = self.theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            angles.append(ids[..., axis : axis + 1].double() * omega)
        angle = torch.cat(angles, dim=-1)
        cos, sin = angle.cos(), angle.sin()
        return torch.stack((cos, -sin, sin, cos), dim=-1).view(*angle.shape, 2, 2).unsqueeze(1).float()


def apply_rotary_emb(x, freqs_cis):
    """x (B, tokens, heads, d) rotated pairwise by freqs_cis (B, tokens, 1, d/2, 2, 2)."""
    if x.shape[1] == 0:
        return x
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(*x.shape)


class QwenTimestepProjEmbeddings(nn.Module):
    def __init__(self, embedding_dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(256, embedding_dim), nn.Linear(embedding_dim, embedding_dim)

    def forward(self, timestep, hidden_states):
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = 1000.0 * timestep[:, None].float() * freqs[None]
        proj = torch.cat((args.cos(), args.sin()), dim=-1).to(hidden_states.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(proj)))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=2):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """The joint attention of a block: image stream (to_q/k/v) and text stream (add_*_proj)."""

    def __init__(self, query_dim, dim_head, heads, eps=1e-6):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_q, self.norm_k = nn.RMSNorm(dim_head, eps=eps), nn.RMSNorm(dim_head, eps=eps)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(dim_head, eps=eps), nn.RMSNorm(dim_head, eps=eps)
        for norm in (self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k):
            nn.init.normal_(norm.weight, 1.0, 0.1)
        self.to_q, self.to_k, self.to_v = (nn.Linear(query_dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(query_dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, query_dim)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                attention_mask=None, image_rotary_emb=None):  # fmt: skip
        seq_txt = encoder_hidden_states.shape[1]

        def heads(linear, x):
            return linear(x).unflatten(-1, (self.heads, -1))

        img_q, img_k, img_v = (heads(p, hidden_states) for p in (self.to_q, self.to_k, self.to_v))
        txt_q, txt_k, txt_v = (
            heads(p, encoder_hidden_states) for p in (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        )
        img_q, img_k = self.norm_q(img_q), self.norm_k(img_k)
        txt_q, txt_k = self.norm_added_q(txt_q), self.norm_added_k(txt_k)
        q = apply_rotary_emb(torch.cat((txt_q, img_q), dim=1), image_rotary_emb)
        k = apply_rotary_emb(torch.cat((txt_k, img_k), dim=1), image_rotary_emb)
        v = torch.cat((txt_v, img_v), dim=1)
        out = attention_function(q.flatten(start_dim=2), k.flatten(start_dim=2), v.flatten(start_dim=2),
                                 self.heads, attention_mask)  # fmt: skip
        img_out = self.to_out[1](self.to_out[0](out[:, seq_txt:]))
        return img_out, self.to_add_out(out[:, :seq_txt])


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim, num_attention_heads, attention_head_dim, eps=1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1, self.img_norm2, self.txt_norm1, self.txt_norm2 = (
            nn.LayerNorm(dim, elementwise_affine=False, eps=eps) for _ in range(4)
        )
        self.img_mlp, self.txt_mlp = FeedForward(dim), FeedForward(dim)
        self.attn = Attention(dim, attention_head_dim, num_attention_heads, eps)

    @staticmethod
    def _modulate(x, params):
        shift, scale, gate = params.chunk(3, dim=-1)
        return shift[:, None] + x * (1 + scale[:, None]), gate[:, None]

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                image_rotary_emb=None):  # fmt: skip
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate1 = self._modulate(self.img_norm1(hidden_states), img_mod1)
        txt_in, txt_gate1 = self._modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)
        img_attn, txt_attn = self.attn(hidden_states=img_in, encoder_hidden_states=txt_in,
                                       encoder_hidden_states_mask=encoder_hidden_states_mask,
                                       image_rotary_emb=image_rotary_emb)  # fmt: skip
        hidden_states = hidden_states + img_gate1 * img_attn
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn
        img_in2, img_gate2 = self._modulate(self.img_norm2(hidden_states), img_mod2)
        hidden_states = hidden_states + img_gate2 * self.img_mlp(img_in2)
        txt_in2, txt_gate2 = self._modulate(self.txt_norm2(encoder_hidden_states), txt_mod2)
        encoder_hidden_states = encoder_hidden_states + txt_gate2 * self.txt_mlp(txt_in2)
        return encoder_hidden_states, hidden_states


class LastLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, temb):
        scale, shift = self.linear(nn.functional.silu(temb)).chunk(2, dim=1)
        return shift[:, None] + self.norm(x) * (1 + scale[:, None])


class QwenImageTransformer2DModel(nn.Module):
    def __init__(self, patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                 num_layers=6, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=CONTEXT_DIM,
                 axes_dims_rope=(4, 6, 6)):  # fmt: skip
        super().__init__()
        self.patch_size, self.in_channels, self.out_channels = patch_size, in_channels, out_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.pe_embedder = EmbedND(attention_head_dim, 10000, list(axes_dims_rope))
        self.time_text_embed = QwenTimestepProjEmbeddings(self.inner_dim)
        self.txt_norm = nn.RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
            for _ in range(num_layers)
        )
        self.norm_out = LastLayer(self.inner_dim)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * out_channels)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        """(B, C, 1, h, w) -> tokens (B, ceil(h/p)·ceil(w/p), C·p²), their 3-axis ids, padded shape."""
        bs = x.shape[0]
        p = self.patch_size
        padded = pad_to_patch_size(x, (1, p, p))
        shape = padded.shape
        hl, wl = shape[-2] // p, shape[-1] // p
        tokens = padded.view(bs, shape[1], hl, p, wl, p).permute(0, 2, 4, 1, 3, 5).reshape(bs, hl * wl, -1)
        h_offset, w_offset = (h_offset + p // 2) // p, (w_offset + p // 2) // p
        ids = torch.zeros(hl, wl, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(hl, dtype=torch.float32)[:, None] + h_offset - hl // 2
        ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None, :] + w_offset - wl // 2
        return tokens, ids.reshape(1, hl * wl, 3).expand(bs, -1, -1), shape

    def forward(self, x, timesteps, context, attention_mask=None, guidance=None, ref_latents=None,
                transformer_options=None, control=None, **kwargs):  # fmt: skip
        hidden_states, img_ids, orig_shape = self.process_img(x)
        num_embeds = hidden_states.shape[1]
        ref_latents = ref_latents or dynamic_args.ref_latents
        for index, ref in enumerate(ref_latents or [], start=1):  # the "index" reference method
            # Neo concatenates a reference of the call's batch; a single one serves every row here
            ref = ref.to(x).expand(x.shape[0], *ref.shape[1:])
            kontext, kontext_ids, _ = self.process_img(ref, index=index)
            hidden_states = torch.cat((hidden_states, kontext), dim=1)
            img_ids = torch.cat((img_ids, kontext_ids), dim=1)
        p = self.patch_size
        txt_start = max(((x.shape[-1] + p // 2) // p) // 2, ((x.shape[-2] + p // 2) // p) // 2)
        txt_ids = torch.arange(txt_start, txt_start + context.shape[1], dtype=torch.float32)
        txt_ids = txt_ids.reshape(1, -1, 1).repeat(x.shape[0], 1, 3)
        rotary = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).squeeze(1).unsqueeze(2).to(x.dtype)

        hidden_states = self.img_in(hidden_states)
        encoder_hidden_states = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timesteps, hidden_states)
        blocks_replace = (transformer_options or {}).get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.transformer_blocks):
            if ("double_block", i) in blocks_replace:

                def block_wrap(args, block=block):
                    txt, img = block(hidden_states=args["img"], encoder_hidden_states=args["txt"],
                                     encoder_hidden_states_mask=attention_mask, temb=args["vec"],
                                     image_rotary_emb=args["pe"])  # fmt: skip
                    return {"txt": txt, "img": img}

                out = blocks_replace[("double_block", i)](
                    {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": rotary},
                    {"original_block": block_wrap},
                )
                hidden_states, encoder_hidden_states = out["img"], out["txt"]
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    encoder_hidden_states_mask=attention_mask, temb=temb, image_rotary_emb=rotary,
                )  # fmt: skip

        out = self.proj_out(self.norm_out(hidden_states, temb))
        b, c, _, hp, wp = orig_shape
        out = out[:, :num_embeds].view(b, hp // p, wp // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(orig_shape)[:, :, :, : x.shape[-2], : x.shape[-1]]


# -- the test surface (tests/standin_neo_transformers.py) ------------------------------------------


def build(seed=0, **shape):
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**shape).eval()


def latent(batch, height, width, generator=None):
    """Neo's Qwen latent: one frame of the video VAE's (B, C, T, h, w)."""
    return torch.randn(batch, LATENT_CHANNELS, 1, height, width, generator=generator)


def reference_latent(height, width, seed=1):
    """A Qwen-Image-Edit reference image's latent (batch 1, as Neo encodes it)."""
    return latent(1, height, width, torch.Generator().manual_seed(seed))


def conds(batch, tokens=5, seed=0):
    """Neo's Qwen cond entry: the text (and, for Edit, vision) embeddings only."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, CONTEXT_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds):
    """Text first, then ceil(h/2) × ceil(w/2) image tokens of the circularly padded latent."""
    height, width = latent.shape[-2], latent.shape[-1]
    return CallLayout(frames=1, height=(height + 1) // 2, width=(width + 1) // 2,
                      before=conds[0]["cross_attn"].shape[1])  # fmt: skip
