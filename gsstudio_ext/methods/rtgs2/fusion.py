"""RT-GS2's VDVI fusion network (AsymFormer B0-T style): an RGB encoder and a MiT feature encoder fused by SCC
modules at stages 2-4, decoded by a SegFormer MLP head.

Stream: the MiT branch runs stage by stage on the rendered Gaussian features; after each fused stage the SCC output
(RGB + feature evidence) replaces the feature stream for the next stage. The decoder reads the 4 feature-branch maps
(stage 1 unfused) and returns per-pixel logits and its 256-d pre-classifier map (used by the CeCo loss).

Details the spec leaves open, chosen here: the spatial map of the attention gate is a per-pixel MLP (1x1 convs) of the
channel-gated map; the lite cross-attention averages keys/values over ``sr`` x ``sr`` windows (the MiT stage's
spatial-reduction ratio) to stay cheap at 480 x 640; inputs are zero padded (bottom/right) to a multiple of 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.methods.rtgs2.mit import MiT, MiTConfig
from gsstudio_ext.models.image_backbones import ConvNextEncoderConfig, RGBEncoderConfig, TinyConvEncoderConfig


class ChannelSpatialGate(nn.Module):
    """x * sigmoid(MLP(avg-pool(x))) (channel gate), then * sigmoid(per-pixel MLP) (spatial map)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.channel = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(True), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.sigmoid(self.channel(x.mean(dim=(2, 3), keepdim=True)))
        return x * torch.sigmoid(self.spatial(x))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal blocks: [a0 a1 | b0 b1] -> [a0 b0 a1 b1]."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class LiteSplitCrossAttention(nn.Module):
    """Cross-attention with queries/keys from both branches (half width each, channel-shuffled so every head sees
    both), 2 heads of half width, values from the fused map; output = BN(fused + proj(attention))."""

    def __init__(self, dim: int, rgb_dim: int, sr: int = 1, attn_drop: float = 0.2, heads: int = 2) -> None:
        super().__init__()
        if dim % (2 * heads):
            raise ValueError(f"fusion width {dim} must be divisible by {2 * heads}")
        half = dim // 2
        self.heads, self.sr = heads, max(int(sr), 1)
        self.scale = (dim // heads) ** -0.5
        self.q_rgb, self.q_feat = nn.Conv2d(rgb_dim, half, 1), nn.Conv2d(dim, half, 1)
        self.k_rgb, self.k_feat = nn.Conv2d(rgb_dim, half, 1), nn.Conv2d(dim, half, 1)
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, fused: Tensor, rgb: Tensor, feat: Tensor) -> Tensor:
        """fused, feat: Float[B, C, h, w]; rgb: Float[B, C_rgb, h, w] -> Float[B, C, h, w]."""
        b, c, h, w = fused.shape
        q = channel_shuffle(torch.cat([self.q_rgb(rgb), self.q_feat(feat)], 1), 2)
        k = channel_shuffle(torch.cat([self.k_rgb(rgb), self.k_feat(feat)], 1), 2)
        v = self.v(fused)
        if self.sr > 1:  # lite: keys/values averaged over sr x sr windows
            k = F.avg_pool2d(k, self.sr, self.sr, ceil_mode=True)
            v = F.avg_pool2d(v, self.sr, self.sr, ceil_mode=True)
        d = c // self.heads
        q = q.view(b, self.heads, d, h * w).transpose(-2, -1)  # [B, heads, N, d]
        k = k.reshape(b, self.heads, d, -1)  # [B, heads, d, M]
        v = v.reshape(b, self.heads, d, -1).transpose(-2, -1)  # [B, heads, M, d]
        attn = self.attn_drop((q @ k * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(-2, -1).reshape(b, c, h, w)
        return self.norm(fused + self.proj(out))


class SCCFusion(nn.Module):
    """Fuse an RGB map into the feature stream: gate(concat) -> 1x1 conv + BN to feature width -> cross-attention."""

    def __init__(self, rgb_dim: int, feat_dim: int, sr: int = 1, attn_drop: float = 0.2, reduction: int = 4) -> None:
        super().__init__()
        self.gate = ChannelSpatialGate(rgb_dim + feat_dim, reduction)
        self.reduce = nn.Sequential(nn.Conv2d(rgb_dim + feat_dim, feat_dim, 1, bias=False), nn.BatchNorm2d(feat_dim))
        self.attn = LiteSplitCrossAttention(feat_dim, rgb_dim, sr, attn_drop)

    def forward(self, rgb: Tensor, feat: Tensor) -> Tensor:
        """rgb Float[B, C_rgb, h', w'] (resized to feat's size), feat Float[B, C, h, w] -> Float[B, C, h, w]."""
        if rgb.shape[-2:] != feat.shape[-2:]:
            rgb = F.interpolate(rgb, size=feat.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.reduce(self.gate(torch.cat([rgb, feat], dim=1)))
        return self.attn(fused, rgb, feat)


class SegFormerHead(nn.Module):
    """Per-scale linear embed to ``dim``, upsample to stride 4, concat, 1x1 conv + BN + ReLU (the embedding),
    dropout, 1x1 classifier."""

    def __init__(self, widths: Sequence[int], dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in widths)
        self.fuse = nn.Sequential(nn.Conv2d(dim * len(widths), dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """4 maps (strides 4..32) -> (logits Float[B, C, h4, w4], embedding Float[B, dim, h4, w4])."""
        size = feats[0].shape[-2:]
        ups = []
        for proj, f in zip(self.embed, feats):
            x = proj(f)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            ups.append(x)
        embedding = self.fuse(torch.cat(ups, dim=1))
        return self.classifier(self.dropout(embedding)), embedding


@dataclass
class FusionNetConfig:
    """RT-GS2's VDVI fusion network (defaults: ConvNeXt-Tiny RGB branch, MiT-B0 feature branch, 46 Replica classes)."""

    num_classes: int = 46
    """Semantic classes C (Replica: 46)."""
    feature_channels: int = 32
    """Channels F of the rendered Gaussian feature map (overrides feature_encoder.in_channels)."""
    rgb_encoder: RGBEncoderConfig = field(default_factory=ConvNextEncoderConfig)
    """RGB branch; ConvNeXt-Tiny should be given ImageNet weights (ConvNextEncoderConfig.weights)."""
    feature_encoder: MiTConfig = field(default_factory=MiTConfig)
    """Feature branch (MiT-B0, trained from scratch)."""
    decoder_dim: int = 256
    """SegFormer head embedding width (also the CeCo embedding size)."""
    decoder_dropout: float = 0.1
    """Dropout before the classifier."""
    fuse_stages: Tuple[int, ...] = (2, 3, 4)
    """1-based stages whose output goes through an SCC fusion (stage 1 is not fused)."""
    attention_dropout: float = 0.2
    """Dropout on the fusion cross-attention weights."""
    gate_reduction: int = 4
    """Hidden-width reduction of the fusion gate MLPs."""
    pad_multiple: int = 32
    """Inputs are zero padded (bottom/right) to a multiple of this, outputs cropped back."""

    @classmethod
    def tiny(cls, num_classes: int, feature_channels: int = 32) -> "FusionNetConfig":
        """A small network for tests: tiny conv RGB encoder, tiny MiT, 32-d decoder."""
        return cls(
            num_classes=num_classes,
            feature_channels=feature_channels,
            rgb_encoder=TinyConvEncoderConfig(),
            feature_encoder=MiTConfig.tiny(feature_channels),
            decoder_dim=32,
        )


class FusionOutput(NamedTuple):
    logits: Tensor
    """Float[B, C, H, W], upsampled to the input size."""
    embedding: Tensor
    """Float[B, decoder_dim, ceil(H/4), ceil(W/4)]: the decoder's pre-classifier map."""


class FusionNet(nn.Module):
    """RGB + rendered-feature semantic segmentation network."""

    def __init__(self, config: FusionNetConfig, device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        bad = [s for s in config.fuse_stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"fuse_stages must be 1-based stage numbers in 1..4, got {bad}")
        self.config = config
        self.rgb_encoder = config.rgb_encoder.setup("cpu")
        mit_config = replace(config.feature_encoder, in_channels=config.feature_channels)
        self.feature_encoder = MiT(mit_config)
        rgb_w, feat_w = self.rgb_encoder.widths, self.feature_encoder.widths
        drop, red = config.attention_dropout, config.gate_reduction
        self.fusions = nn.ModuleDict(
            {
                str(s): SCCFusion(rgb_w[s - 1], feat_w[s - 1], mit_config.sr_ratios[s - 1], drop, red)
                for s in sorted(set(config.fuse_stages))
            }
        )
        self.decoder = SegFormerHead(feat_w, config.decoder_dim, config.num_classes, config.decoder_dropout)
        if device is not None:
            self.to(device)

    def encode(self, rgb: Tensor, features: Tensor) -> List[Tensor]:
        """The 4 feature-branch maps (fused at ``fuse_stages``) of padded inputs."""
        rgb_feats = self.rgb_encoder(rgb)
        x, outs = features, []
        for i in range(4):
            x = self.feature_encoder.forward_stage(i, x)
            fusion = self.fusions[str(i + 1)] if str(i + 1) in self.fusions else None
            if fusion is not None:
                x = fusion(rgb_feats[i], x)
            outs.append(x)
        return outs

    def forward(self, rgb: Tensor, features: Tensor) -> FusionOutput:
        """rgb Float[B, 3, H, W] in 0..1; features Float[B, F, H', W'] (bilinearly resized to H x W if different)."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"rgb must have shape [B, 3, H, W], got {tuple(rgb.shape)}")
        if features.ndim != 4 or features.shape[1] != self.config.feature_channels or features.shape[0] != rgb.shape[0]:
            raise ValueError(
                f"features must have shape [{rgb.shape[0]}, {self.config.feature_channels}, H, W], "
                f"got {tuple(features.shape)}"
            )
        h, w = rgb.shape[-2:]
        features = features.to(rgb.dtype)
        if features.shape[-2:] != (h, w):
            features = F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False)
        m = max(int(self.config.pad_multiple), 1)
        ph, pw = math.ceil(h / m) * m, math.ceil(w / m) * m
        if (ph, pw) != (h, w):
            rgb = F.pad(rgb, (0, pw - w, 0, ph - h))
            features = F.pad(features, (0, pw - w, 0, ph - h))
        logits, embedding = self.decoder(self.encode(rgb, features))
        logits = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)[..., :h, :w]
        ratio_h, ratio_w = ph / embedding.shape[-2], pw / embedding.shape[-1]
        embedding = embedding[..., : math.ceil(h / ratio_h), : math.ceil(w / ratio_w)]
        return FusionOutput(logits, embedding)
