"""A small Chroma-architecture transformer written for these tests, laid out the way Forge's
``backend/nn/chroma.py`` is (loaded as ``backend.nn.chroma``): its own block classes, whose
modulation comes from one ``distilled_guidance_layer`` instead of per-block layers, calling the
``attention`` function imported from ``backend.nn.flux``. The code is ours."""

import torch
from backend.nn.flux import (
    IntegratedFluxTransformer2DModel,
    QKNorm,
    attention,
    split_heads,
    timestep_embedding,
)
from torch import nn


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_qkv", nn.Linear(hidden, 3 * hidden))
            setattr(self, f"{stream}_norm", QKNorm(hidden // heads))
            setattr(self, f"{stream}_proj", nn.Linear(hidden, hidden))
            setattr(
                self,
                f"{stream}_mlp",
                nn.Sequential(
                    nn.Linear(hidden, int(hidden * mlp_ratio)),
                    nn.GELU(),
                    nn.Linear(int(hidden * mlp_ratio), hidden),
                ),
            )

    def stream(self, name, x, mod):
        q, k, v = split_heads(
            getattr(self, f"{name}_qkv")(nn.functional.layer_norm(x, x.shape[-1:]) * (1 + mod[1]) + mod[0]),
            self.heads,
        )
        q, k = getattr(self, f"{name}_norm")(q, k)
        return q, k, v

    def forward(self, img, txt, mod, pe):
        img_mod, txt_mod = mod
        img_q, img_k, img_v = self.stream("img", img, img_mod)
        txt_q, txt_k, txt_v = self.stream("txt", txt, txt_mod)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe=pe)
        n_txt = txt.shape[1]
        img = img + img_mod[2] * self.img_proj(attn[:, n_txt:])
        txt = txt + txt_mod[2] * self.txt_proj(attn[:, :n_txt])
        return img + self.img_mlp(img), txt + self.txt_mlp(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.linear1 = nn.Linear(hidden, 3 * hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.norm = QKNorm(hidden // heads)

    def forward(self, x, mod, pe):
        q, k, v = split_heads(
            self.linear1(nn.functional.layer_norm(x, x.shape[-1:]) * (1 + mod[1]) + mod[0]), self.heads
        )
        q, k = self.norm(q, k)
        return x + mod[2] * self.linear2(attention(q, k, v, pe=pe))


class IntegratedChromaTransformer2DModel(IntegratedFluxTransformer2DModel):
    def __init__(self, hidden_size=32, num_heads=2, depth=10, depth_single_blocks=4, mlp_ratio=2.0, **kwargs):
        super().__init__(
            hidden_size=hidden_size,
            num_heads=num_heads,
            depth=0,
            depth_single_blocks=0,
            mlp_ratio=mlp_ratio,
            guidance_embed=False,
            **kwargs,
        )
        del self.time_in, self.vector_in
        self.mods = depth * 2 + depth_single_blocks
        self.distilled_guidance_layer = nn.Sequential(
            nn.Linear(64, hidden_size), nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size)
        )
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)
        )

    def forward(self, x, timestep, context, **kwargs):
        return self.run(x, context, self.modulations(timestep))

    def modulations(self, timestep):
        index = timestep_embedding(torch.arange(self.mods, dtype=torch.float32) / 1000, 32)
        time = timestep_embedding(timestep, 32)
        table = torch.cat(
            (time[:, None].expand(-1, self.mods, -1), index[None].expand(len(time), -1, -1)), -1
        )
        return self.distilled_guidance_layer(table).chunk(3, dim=-1)

    def blocks(self, img, txt, vec, pe):
        def mod(i):
            return tuple(part[:, i : i + 1] for part in vec)

        for i, block in enumerate(self.double_blocks):
            img, txt = block(img=img, txt=txt, mod=(mod(2 * i), mod(2 * i + 1)), pe=pe)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, mod=mod(2 * len(self.double_blocks) + i), pe=pe)
        return x[:, txt.shape[1] :]
