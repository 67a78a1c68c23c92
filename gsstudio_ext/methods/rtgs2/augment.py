"""Stage-B training augmentation of (rgb, splatted features, labels) batches, per sample (spec §4.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AugmentConfig:
    """Probabilities and strengths of each augmentation (official cross-scene values)."""

    color_jitter: float = 0.5
    """Probability of colour jitter (brightness, contrast, saturation +-0.5, hue +-``hue``) on the RGB input."""
    hue: float = 0.05
    """Largest hue shift of the colour jitter, in turns (0.5 = any hue: for data where colour does not tell the
    classes apart, such as gs-synth's randomly painted objects)."""
    flip: float = 0.3
    """Probability of a horizontal flip."""
    cutout: float = 0.3
    """Probability of zeroing a random rectangle (up to half the side) of both inputs."""
    zoom: float = 0.3
    """Probability of a random zoom-in (crop of 50-100 % of the side, resized back)."""

    @classmethod
    def finetune(cls) -> "AugmentConfig":
        """Per-scene fine-tuning: zoom-in only."""
        return cls(color_jitter=0.0, flip=0.0, cutout=0.0, zoom=0.3)


def _gray(rgb: Tensor) -> Tensor:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]


def _jitter(rgb: Tensor, g: torch.Generator, hue: float) -> Tensor:
    b, c, s = (1.0 + (torch.rand(3, generator=g) - 0.5)).tolist()
    h = float((torch.rand(1, generator=g) * 2 - 1) * hue) * 2 * torch.pi
    rgb = rgb * b
    rgb = (rgb - rgb.mean()) * c + rgb.mean()
    rgb = (rgb - _gray(rgb)) * s + _gray(rgb)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=rgb.device)
    cos, sin = torch.cos(torch.tensor(h)), torch.sin(torch.tensor(h))
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], device=rgb.device)
    mix = torch.linalg.inv(yiq) @ rot @ yiq
    return torch.einsum("ij,jhw->ihw", mix, rgb).clamp(0.0, 1.0)


def _zoom(x: Tensor, labels: Tensor, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    _, h, w = x.shape
    frac = 0.5 + 0.5 * float(torch.rand(1, generator=g))
    ch, cw = max(1, int(h * frac)), max(1, int(w * frac))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    crop = x[:, top : top + ch, left : left + cw]
    x = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    lab = labels[top : top + ch, left : left + cw][None, None].float()
    labels = F.interpolate(lab, size=(h, w), mode="nearest")[0, 0].long()
    return x, labels


def augment_batch(
    rgb: Tensor, features: Tensor, labels: Tensor, config: AugmentConfig, generator: torch.Generator
) -> Tuple[Tensor, Tensor, Tensor]:
    """rgb [B, 3, H, W], features [B, F, H, W], labels Long[B, H, W] -> augmented copies (same shapes)."""
    out_rgb, out_feat, out_lab = [], [], []
    for i in range(rgb.shape[0]):
        r, f, lab = rgb[i], features[i], labels[i]
        draw = torch.rand(4, generator=generator).tolist()
        if draw[0] < config.color_jitter:
            r = _jitter(r, generator, config.hue)
        if draw[1] < config.flip:
            r, f, lab = r.flip(-1), f.flip(-1), lab.flip(-1)
        if draw[2] < config.zoom:
            both, lab = _zoom(torch.cat([r, f]), lab, generator)
            r, f = both[:3], both[3:]
        if draw[3] < config.cutout:
            h, w = lab.shape
            ch = int(torch.randint(1, max(2, h // 2), (1,), generator=generator))
            cw = int(torch.randint(1, max(2, w // 2), (1,), generator=generator))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            r, f = r.clone(), f.clone()
            r[:, top : top + ch, left : left + cw] = 0.0
            f[:, top : top + ch, left : left + cw] = 0.0
        out_rgb.append(r)
        out_feat.append(f)
        out_lab.append(lab)
    return torch.stack(out_rgb), torch.stack(out_feat), torch.stack(out_lab)
