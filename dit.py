"""
DiT: Diffusion Transformers (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023).

Written from scratch in plain PyTorch, with the parameter names, shapes and initialisation of the
official facebookresearch/DiT `models.py`, so an official checkpoint such as DiT-XL-2-256x256.pt
loads with `strict=True` and gives the same outputs. Differences from the official file:
- attention runs through `F.scaled_dot_product_attention` (flash / memory-efficient kernels);
- `forward_with_cfg` guides every epsilon channel by default; `guided_channels=3` reproduces the
  official behaviour, which guides only the first three channels (a leftover from pixel-space GLIDE);
- with class_dropout_prob >= 1 (every training label dropped) evaluation also uses the null row, since
  the class rows never trained; the official embedder would look up those untrained rows;
- an optional `router` (see "The routing seam" below) lets a paper module change how each block is
  applied, given the timestep. DTR (dtr.py) uses it; with `router=None` the forward is the official one.

Sections: embedding layers, the core block, the model, positional-embedding helpers, the configs.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift, with (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
#                                   Embedding layers
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Image to patch tokens: a stride-p convolution, flattened to (N, L, D). Key: x_embedder.proj."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)
        self.num_patches = (input_size // patch_size) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, L, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors: 256-d sinusoidal features ordered [cos, sin], then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding of (N,) possibly fractional timesteps -> (N, dim), as in GLIDE/DiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels to vectors. With dropout_prob > 0 the table has one extra row, index
    `num_classes`, the null class used by classifier-free guidance; training drops labels to it
    with probability dropout_prob."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class: at random in training, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        elif self.dropout_prob >= 1:  # trained on the null class only (unconditional): the class rows never train,
            labels = torch.full_like(labels, self.num_classes)  # so sampling conditions on the null row too
        return self.embedding_table(labels)  # (N, D)


# ----------------------------------------------------------------------------------------------
#                                   Core DiT block
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (timm layout: attn.qkv, attn.proj)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, H, L, Dh)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))  # (N, L, D)


class Mlp(nn.Module):
    """Transformer MLP: fc1, GELU (tanh approximation), fc2 (timm layout: mlp.fc1, mlp.fc2)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (DiT paper, Sec. 3.2, Fig. 3)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, L, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, L, p*p*C_out)


# ----------------------------------------------------------------------------------------------
#                                   The model
# ----------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    The routing seam. `router` is an optional nn.Module with no parameters that a paper module
    supplies (DTR's `dtr.TaskRouter`), built for `router.num_blocks` = depth blocks. Once per
    forward it is called on the timesteps, and then it decides how each block is applied:

        routes = router(t)                             # one route per block, e.g. per-sample channel masks
        x = router.route(block, x, c, routes[i])       # instead of x = block(x, c), for block i

    `t` is always the ORIGINAL timestep in 0..T-1, also when sampling with respaced steps
    (diffusion.py maps respaced indices back before calling the model). The final layer is never
    routed. A router holds no persistent state, so the state dict is the plain DiT's.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        router=None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"image size {input_size} is not divisible by the patch size {patch_size}; "
                             f"pick an image size that is a multiple of {patch_size}")
        if hidden_size % 4:  # the 2-D sin-cos embedding gives a quarter of the channels to each of sin/cos x row/column
            unit = math.lcm(4, max(num_heads, 1))
            raise ValueError(f"hidden size {hidden_size} is not a multiple of 4, which the 2-D sin-cos position embedding "
                             f"needs; pick a multiple of 4 and of num_heads {num_heads}, e.g. "
                             f"{unit * max(1, round(hidden_size / unit))}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, stored as a frozen parameter like the official code (it is in the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        if router is not None and router.state_dict():  # parameters or persistent buffers
            raise ValueError("a router must hold no parameters or persistent buffers; the DiT state dict must "
                             "stay the official one")
        if router is not None and getattr(router, "num_blocks", None) != depth:  # router(t) gives one route per block
            raise ValueError(f"the router must route this DiT's {depth} blocks (router.num_blocks), but routes "
                             f"{getattr(router, 'num_blocks', None)}; build it with num_blocks={depth}")
        self.router = router

    def initialize_weights(self):
        """The official initialisation; adaLN-Zero makes the network output exactly 0 at init."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, grid)).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # the patch conv initialised like a Linear
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, L, p*p*C) tokens -> (N, C, H, W) image."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x, t, y):
        """x: (N, C, H, W) noisy input, t: (N,) original timesteps, y: (N,) class labels."""
        want = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:  # a 16x64 input into a 32x32 model has as many patches: no error
            raise ValueError(f"x must be (N, {', '.join(map(str, want))}) for this DiT, got {tuple(x.shape)}")
        routes = None if self.router is None else self.router(t)  # one route per block
        x = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for i, block in enumerate(self.blocks):
            x = block(x, c) if routes is None else self.router.route(block, x, c, routes[i])  # (N, L, D)
        x = self.final_layer(x, c)  # (N, L, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        """Classifier-free guidance on a batch whose second half holds the null labels.

        The first half of x is run twice (conditional, then unconditional), and
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond) replaces both halves. By default every
        epsilon channel (the first in_channels) is guided; guided_channels=3 reproduces the official
        DiT code, which guides only the first three. Learned-variance channels are never guided.
        """
        k = self.in_channels if guided_channels is None else guided_channels
        if not 1 <= k <= self.in_channels:
            raise ValueError(f"guided_channels must be in 1..{self.in_channels} (the epsilon channels), got {k}")
        half = x[: len(x) // 2]  # (N/2, C, H, W)
        # self(...), not self.forward: a model compiled in place (sample.compile_for_sampling) compiles __call__
        out = self(torch.cat([half, half], dim=0), t, y)  # (N, C_out, H, W)
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # fp32 under autocast; a float64 model's stays
        eps, rest = out[:, :k], out[:, k:]  # (N, k, H, W), (N, C_out - k, H, W)
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # 2 x (N/2, k, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, k, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (N, k, H, W)
        return torch.cat([eps, rest], dim=1)  # (N, C_out, H, W)


# ----------------------------------------------------------------------------------------------
#                                   Positional embedding helpers
# ----------------------------------------------------------------------------------------------
# 2-D sin-cos embedding as in MAE (github.com/facebookresearch/mae/blob/main/util/pos_embed.py),
# computed in float64: the first half of the channels encodes the column, the second half the row.

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) float64 array over row-major positions: [column features, row
    features] per position. This is MAE's layout; MAE's variable names (emb_h first) suggest the
    reverse, but its first half is computed from the column index."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)  # (2, G*G): column index, row index
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])  # (G*G, D/2)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])  # (G*G, D/2)
    return np.concatenate([emb_col, emb_row], axis=1)  # (G*G, D)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M,) positions -> (M, embed_dim) float64 array of [sin, cos] features."""
    if embed_dim % 2:
        raise ValueError(f"positional embedding width {embed_dim} must be even")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


# ----------------------------------------------------------------------------------------------
#                                   DiT configs
# ----------------------------------------------------------------------------------------------

def _config(depth, hidden_size, num_heads, patch_size):
    def build(**kwargs):
        return DiT(**{"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, "patch_size": patch_size, **kwargs})
    build.__doc__ = (f"DiT with depth {depth}, width {hidden_size}, {num_heads} heads, patch {patch_size}; "
                     "keyword arguments override any of them or set the other DiT arguments.")
    build.hidden_size, build.depth = hidden_size, depth  # for what must be built before the model (a router)
    return build


DiT_models = {
    f"DiT-{name}/{p}": _config(depth, width, heads, p)
    for name, (depth, width, heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}.items()
    for p in (2, 4, 8)
}
