"""A small Krea-2 transformer written for these tests, laid out the way Forge Neo's
``backend/nn/krea.py`` is (loaded as ``backend.nn.krea``): ``SingleStreamDiT`` with its
single-stream ``blocks`` (``mod``, ``prenorm``, ``attn``, ``postnorm``, ``mlp``) and the
``txtfusion`` text transformer, every ``Attention`` calling the ``attention_function`` imported
here from ``backend.attention`` with q shaped (B, heads, tokens, d) after the QK-norm and RoPE
(keys and values repeated from fewer heads first).

The math is Krea-2's (the code is ours): the context holds ``TXT_LAYERS`` Qwen3-VL layers per
token; the text fusion attends across each token's layers, projects them to one, then refines the
text; the blocks attend over ``cat(text, image)``, the image being 2×2 patches of the latent
padded circularly to even sides. Neo hands a ``(B, C, 1, h, w)`` latent (Wan 2.1's format) and the
model folds the frames into the batch. With ``ref_latents`` their patches follow the image tokens,
modulated with the time embedding at t = 0, and the blocks' parts are called one by one."""


import torch
from backend.attention import attention_function
from backend.nn.flux import apply_rope, rope, timestep_embedding
from torch import nn

from lib_seg.transformers import CallLayout

FAMILY = "Krea-2"
CHANNELS = 4  # stands in for Wan 2.1's 16 latent channels
TXT_LAYERS, TXT_DIM = 3, 16  # stand in for Krea-2's 12 Qwen3-VL layers of 2560
# Krea-2's 28 blocks and head width (128; 4:1 query to key/value heads) at 4 heads
BENCH_SHAPE = dict(features=512, heads=4, kvheads=1, layers=28)





def pad_to_patch_size(x, patch):
    return nn.functional.pad(x, (0, -x.shape[-1] % patch, 0, -x.shape[-2] % patch), mode="circular")


def patchify(x, patch):
    """(B, C, h, w) -> (B, ceil(h/p)·ceil(w/p), C·p·p) and the token grid."""
    x = pad_to_patch_size(x, patch)
    b, c, h, w = x.shape
    hl, wl = h // patch, w // patch
    return x.view(b, c, hl, patch, wl, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, hl * wl, -1), hl, wl


def grid_positions(batch, hl, wl, index=0.0):
    ids = torch.zeros(hl, wl, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(hl, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None, :]
    return ids.reshape(1, hl * wl, 3).expand(batch, -1, -1)


class RMSNorm(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(0.1 * torch.randn(features))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 + self.scale)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qnorm, self.knorm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k):
        return self.qnorm(q), self.knorm(k)


class SwiGLU(nn.Module):
    def __init__(self, features, multiplier, bias=False, multiple=32):
        super().__init__()
        inner = -(-int(2 * features / 3) * multiplier // multiple) * multiple
        self.gate, self.up = nn.Linear(features, inner, bias=bias), nn.Linear(features, inner, bias=bias)
        self.down = nn.Linear(inner, features, bias=bias)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    def __init__(self, dim, heads, kvheads=None, bias=False):
        super().__init__()
        self.heads, self.kvheads = heads, kvheads or heads
        self.headdim = dim // heads
        self.wq = nn.Linear(dim, self.headdim * heads, bias=bias)
        self.wk = nn.Linear(dim, self.headdim * self.kvheads, bias=bias)
        self.wv = nn.Linear(dim, self.headdim * self.kvheads, bias=bias)
        self.gate = nn.Linear(dim, dim, bias=bias)
        self.qknorm = QKNorm(self.headdim)
        self.wo = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, freqs=None, mask=None, transformer_options=None):
        b, n, _ = x.shape

        def heads_of(t, count):
            return t.view(b, n, count, self.headdim).transpose(1, 2)

        q, k, v = (
            heads_of(self.wq(x), self.heads),
            heads_of(self.wk(x), self.kvheads),
            heads_of(self.wv(x), self.kvheads),
        )
        q, k = self.qknorm(q, k)
        if freqs is not None:
            q, k = apply_rope(q, k, freqs)
        if self.kvheads != self.heads:
            k = k.repeat_interleave(self.heads // self.kvheads, dim=1)
            v = v.repeat_interleave(self.heads // self.kvheads, dim=1)
        out = attention_function(q, k, v, self.heads, mask=mask, skip_reshape=True,
                                 transformer_options=transformer_options or {})  # fmt: skip
        return self.wo(out * torch.sigmoid(self.gate(x)))


class DoubleSharedModulation(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Parameter(0.1 * torch.randn(6 * dim))

    def forward(self, vec):
        return (vec + self.lin).chunk(6, dim=-1)


class SimpleModulation(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Parameter(0.1 * torch.randn(2, dim))

    def forward(self, vec):
        return (vec + self.lin.unsqueeze(0)).chunk(2, dim=1)


class TextFusionBlock(nn.Module):
    def __init__(self, features, heads, multiplier, bias=False, kvheads=None):
        super().__init__()
        self.prenorm, self.postnorm = RMSNorm(features), RMSNorm(features)
        self.attn = Attention(features, heads, kvheads, bias)
        self.mlp = SwiGLU(features, multiplier, bias)

    def forward(self, x, mask=None, transformer_options=None):
        x = x + self.attn(self.prenorm(x), mask=mask, transformer_options=transformer_options)
        return x + self.mlp(self.postnorm(x))


class TextFusionTransformer(nn.Module):
    """Attention across each token's encoder layers, a projection of the layers to one, then
    attention over the text: the text's own, never smoothed."""

    def __init__(self, num_txt_layers, txt_dim, heads, multiplier, bias=False, kvheads=None):
        super().__init__()
        self.layerwise_blocks = nn.ModuleList(
            TextFusionBlock(txt_dim, heads, multiplier, bias, kvheads) for _ in range(2)
        )
        self.projector = nn.Linear(num_txt_layers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList(
            TextFusionBlock(txt_dim, heads, multiplier, bias, kvheads) for _ in range(2)
        )

    def forward(self, x, mask=None, transformer_options=None):
        b, tokens, layers, dim = x.shape
        x = x.reshape(b * tokens, layers, dim)
        for block in self.layerwise_blocks:
            x = block(x, transformer_options=transformer_options)
        x = self.projector(x.view(b, tokens, layers, dim).transpose(-1, -2)).squeeze(-1)
        for block in self.refiner_blocks:
            x = block(x, mask=mask, transformer_options=transformer_options)
        return x


class SingleStreamBlock(nn.Module):
    def __init__(self, features, heads, multiplier, bias=False, kvheads=None):
        super().__init__()
        self.mod = DoubleSharedModulation(features)
        self.prenorm, self.postnorm = RMSNorm(features), RMSNorm(features)
        self.attn = Attention(features, heads, kvheads, bias)
        self.mlp = SwiGLU(features, multiplier, bias)

    def forward(self, x, vec, freqs, mask=None, transformer_options=None):
        prescale, preshift, pregate, postscale, postshift, postgate = self.mod(vec)
        x = x + pregate * self.attn(
            (1 + prescale) * self.prenorm(x) + preshift, freqs, mask, transformer_options
        )
        return x + postgate * self.mlp((1 + postscale) * self.postnorm(x) + postshift)


def block_with_references(block, x, vec, refvec, split, freqs, transformer_options):
    """A block whose tokens from ``split`` on (the references) take the t = 0 modulation: its
    parts are called one by one, the block itself never."""
    m, r = block.mod(vec), block.mod(refvec)

    def mod(h, scale, shift):
        return torch.cat(
            ((1 + m[scale]) * h[:, :split] + m[shift], (1 + r[scale]) * h[:, split:] + r[shift]), 1
        )

    def gate(h, g):
        return torch.cat((m[g] * h[:, :split], r[g] * h[:, split:]), dim=1)

    x = x + gate(
        block.attn(mod(block.prenorm(x), 0, 1), freqs, None, transformer_options=transformer_options), 2
    )
    return x + gate(block.mlp(mod(block.postnorm(x), 3, 4)), 5)


class LastLayer(nn.Module):
    def __init__(self, features, patch, channels):
        super().__init__()
        self.norm = RMSNorm(features)
        self.linear = nn.Linear(features, patch * patch * channels)
        self.modulation = SimpleModulation(features)

    def forward(self, x, tvec):
        scale, shift = self.modulation(tvec)
        return self.linear((1 + scale) * self.norm(x) + shift)


class SingleStreamDiT(nn.Module):
    def __init__(self, features=64, tdim=32, txtdim=TXT_DIM, heads=4, kvheads=2, multiplier=4, layers=6,
                 patch=2, channels=CHANNELS, bias=False, theta=1e3, txtlayers=TXT_LAYERS, txtheads=2,
                 txtkvheads=2):  # fmt: skip
        super().__init__()
        self.patch, self.channels, self.tdim, self.heads = patch, channels, tdim, heads
        self.txtdim, self.txtlayers, self.theta = txtdim, txtlayers, theta
        headdim = features // heads
        self.axes = (headdim - 12 * (headdim // 16), 6 * (headdim // 16), 6 * (headdim // 16))
        self.first = nn.Linear(channels * patch**2, features)
        self.blocks = nn.ModuleList(
            SingleStreamBlock(features, heads, multiplier, bias, kvheads) for _ in range(layers)
        )
        self.tmlp = nn.Sequential(
            nn.Linear(tdim, features), nn.GELU(approximate="tanh"), nn.Linear(features, features)
        )
        self.txtfusion = TextFusionTransformer(txtlayers, txtdim, txtheads, multiplier, bias, txtkvheads)
        self.txtmlp = nn.Sequential(RMSNorm(txtdim), nn.Linear(txtdim, features), nn.GELU(approximate="tanh"),
                                    nn.Linear(features, features))  # fmt: skip
        self.last = LastLayer(features, patch, channels)
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(features, 6 * features))

    def time(self, timesteps):
        t = self.tmlp(timestep_embedding(timesteps, self.tdim).unsqueeze(1))
        return t, self.tproj(t)

    def forward(self, x, timesteps, context, attention_mask=None, transformer_options=None, **kwargs):
        frames = x.shape[2] if x.ndim == 5 else None
        if frames is not None:  # (B, C, T, h, w): every frame its own batch row
            x = x.movedim(2, 1).reshape(-1, *x.shape[1:2], *x.shape[3:])
        bs, _, h, w = x.shape
        options = transformer_options or {}
        context = context.squeeze(1)
        context = context.reshape(*context.shape[:2], self.txtlayers, self.txtdim)
        img, hl, wl = patchify(x, self.patch)
        positions = [grid_positions(bs, hl, wl)]
        refs = kwargs.get("ref_latents")
        reflen = 0
        if refs:
            for index, ref in enumerate(refs, start=1):
                tokens, rh, rw = patchify(ref, self.patch)
                img = torch.cat((img, tokens.expand(bs, -1, -1)), dim=1)
                positions.append(grid_positions(bs, rh, rw, float(index)))
                reflen += rh * rw
        img = self.first(img)
        t, tvec = self.time(timesteps)
        txt = self.txtmlp(self.txtfusion(context, transformer_options=options))
        combined = torch.cat((txt, img), dim=1)
        txtlen = txt.shape[1]
        freqs = rope(torch.cat((torch.zeros(bs, txtlen, 3), *positions), dim=1), self.axes, self.theta)
        if refs:
            _, tvec0 = self.time(torch.zeros_like(timesteps))
            split = combined.shape[1] - reflen
            for block in self.blocks:
                combined = block_with_references(block, combined, tvec, tvec0, split, freqs, options)
        else:
            for block in self.blocks:
                combined = block(combined, tvec, freqs, None, transformer_options=options)
        out = self.last(combined, t)[:, txtlen : txtlen + hl * wl]
        p = self.patch
        out = out.view(bs, hl, wl, self.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(bs, self.channels, hl * p, wl * p)[:, :, :h, :w]
        if frames is not None:
            out = out.reshape(-1, frames, *out.shape[1:]).movedim(1, 2)
        return out


def build(seed=0, **shape):
    """A random-weight Krea-2-like model (6 blocks, 4 query heads over 2 key/value heads)."""
    torch.manual_seed(seed)
    return SingleStreamDiT(**shape).eval()


def latent(batch, height, width, generator=None):
    """Neo's Krea-2 latent: Wan 2.1's video layout with one frame."""
    return torch.randn(batch, CHANNELS, 1, height, width, generator=generator)


def conds(batch, tokens=5, seed=0):
    """Krea-2's cond entry: each token's Qwen3-VL layers side by side, nothing else."""
    g = torch.Generator().manual_seed(seed)
    return [{"cross_attn": torch.randn(batch, tokens, TXT_LAYERS * TXT_DIM, generator=g), "strength": 1.0}]


def reference_layout(latent, conds):
    """2×2 patches of the latent padded to even sides, after the text tokens."""
    height, width = (int(latent.shape[-2]) + 1) // 2, (int(latent.shape[-1]) + 1) // 2
    return CallLayout(1, height, width, before=int(conds[0]["cross_attn"].shape[1]))
