"""Mix Transformer (MiT, SegFormer) encoder of RT-GS2's feature branch, callable one stage at a time.

Each stage: overlapping patch embedding (strided conv + LayerNorm), ``depth`` blocks of efficient self-attention
(keys/values spatially reduced by a strided conv) and Mix-FFN (MLP with a depthwise 3x3 conv), then a LayerNorm.
The fusion network calls :meth:`MiT.forward_stage` per stage because the fused map replaces the stream between
stages. RT-GS2 trains it from scratch (the official MiT-B0 load call is commented out), so there are no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MiTConfig:
    """MiT encoder; defaults are MiT-B0 as RT-GS2 uses it on 32-channel feature maps."""

    in_channels: int = 32
    """Channels of the input map (RT-GS2: the 32-d rendered Gaussian features; FusionNet overrides it)."""
    embed_dims: Tuple[int, int, int, int] = (32, 64, 160, 256)
    """Widths of the 4 stages."""
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)
    """Attention heads per stage."""
    depths: Tuple[int, int, int, int] = (2, 2, 2, 2)
    """Transformer blocks per stage."""
    sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
    """Spatial-reduction ratio of keys/values per stage."""
    patch_sizes: Tuple[int, int, int, int] = (7, 3, 3, 3)
    """Kernel of each overlapping patch embedding."""
    strides: Tuple[int, int, int, int] = (4, 2, 2, 2)
    """Stride of each patch embedding (total strides 4, 8, 16, 32)."""
    mlp_ratio: float = 4.0
    """Mix-FFN hidden width / stage width."""
    drop_path_rate: float = 0.1
    """Stochastic depth, rising linearly from 0 to this over all blocks."""
    attn_drop: float = 0.0
    """Dropout on attention weights."""
    drop: float = 0.0
    """Dropout after projections."""

    @classmethod
    def tiny(cls, in_channels: int = 32) -> "MiTConfig":
        """A small MiT for tests (widths 16/24/32/48, one block per stage)."""
        return cls(
            in_channels=in_channels,
            embed_dims=(16, 24, 32, 48),
            num_heads=(1, 1, 2, 2),
            depths=(1, 1, 1, 1),
            sr_ratios=(4, 2, 1, 1),
            drop_path_rate=0.0,
        )


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability ``p`` and rescale the rest."""
    if p <= 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) >= p
    return x * keep / (1.0 - p)


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (padding k // 2), then LayerNorm over channels."""

    def __init__(self, cin: int, cout: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, patch, stride, patch // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        """Float[B, Cin, H, W] -> (tokens Float[B, h*w, Cout], h, w)."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map downsampled ``sr`` times by a strided conv."""

    def __init__(self, dim: int, heads: int, sr: int, attn_drop: float, drop: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(drop)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            src = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(src).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv (positional information) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(F.gelu(x))))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MixFFN(LN(x)), each with drop-path."""

    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: float, dpr: float, attn_drop: float, drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, heads, sr, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(dpr)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MiTStage(nn.Module):
    def __init__(self, cin: int, dim: int, patch: int, stride: int, blocks: List[MiTBlock]) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(cin, dim, patch, stride)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Float[B, Cin, H, W] -> Float[B, dim, H / stride, W / stride] (ceil)."""
        tokens, h, w = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return self.norm(tokens).transpose(1, 2).reshape(x.shape[0], -1, h, w)


class MiT(nn.Module):
    """Four MiT stages; ``forward`` runs all of them, ``forward_stage`` one (for fusion between stages)."""

    def __init__(self, config: MiTConfig) -> None:
        super().__init__()
        self.config = config
        self.widths: Tuple[int, int, int, int] = tuple(config.embed_dims)  # type: ignore[assignment]
        total = sum(config.depths)
        rates = torch.linspace(0, config.drop_path_rate, total).tolist() if total else []
        stages, cin, at = [], config.in_channels, 0
        for i in range(4):
            dim = config.embed_dims[i]
            blocks = [
                MiTBlock(
                    dim,
                    config.num_heads[i],
                    config.sr_ratios[i],
                    config.mlp_ratio,
                    rates[at + j],
                    config.attn_drop,
                    config.drop,
                )
                for j in range(config.depths[i])
            ]
            at += config.depths[i]
            stages.append(MiTStage(cin, dim, config.patch_sizes[i], config.strides[i], blocks))
            cin = dim
        self.stages = nn.ModuleList(stages)
        self.apply(_init_weights)

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        """Stage ``index`` (0-based): Float[B, C_in, H, W] -> Float[B, widths[index], H/s, W/s]."""
        return self.stages[index](x)

    def forward(self, x: Tensor) -> List[Tensor]:
        """Float[B, in_channels, H, W] -> 4 maps at strides 4, 8, 16, 32 (no fusion)."""
        outs = []
        for i in range(4):
            x = self.forward_stage(i, x)
            outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    """SegFormer-style init: truncated-normal linears, fan-out normal convs, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
