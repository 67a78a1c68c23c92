"""Stable, well-separated colours for integer ids (instances, super-anchors, classes)."""

from __future__ import annotations

import torch
from torch import Tensor

GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def id_colors(ids: Tensor, saturation: float = 0.65, value: float = 0.95) -> Tensor:
    """RGB in [0, 1] [..., 3] for integer ids [...]: hue steps by the golden ratio, so neighbouring ids differ and
    an id keeps its colour across views, runs and machines. Negative ids (unassigned) are grey."""
    hue = torch.remainder(ids.double() * GOLDEN_RATIO_CONJUGATE, 1.0)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64, device=ids.device) + hue[..., None] * 6, 6)
    rgb = value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)  # HSV -> RGB
    grey = torch.full_like(rgb, 0.5)
    return torch.where((ids < 0)[..., None], grey, rgb).float()
