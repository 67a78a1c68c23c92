"""A small rendered ring scene for the rl3dedit tests: ~4.8k Gaussians (a textured ground disc and three blobs) with
view-independent colours seen by M ring cameras, rendered with the CPU rasterizer, so every view is consistent with
every other one through its rendered expected depth; and smooth synthetic views for the grid tests."""

from __future__ import annotations

import math
from typing import List

import torch

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.methods.rl3dedit.geometry import ViewSet


def _look_at(eye: List[float]) -> torch.Tensor:
    """OpenGL camera-to-world at ``eye`` looking at the origin, z up."""
    eye_t = torch.tensor(eye)
    forward = -eye_t / eye_t.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, torch.linalg.cross(right, forward), -forward, eye_t
    return c2w


def ring_views(M: int = 9, SIZE: int = 64) -> ViewSet:
    """Images, rendered depth and OpenCV cameras of the ring scene (M views of SIZE x SIZE)."""
    gen = torch.Generator().manual_seed(0)
    c2w = torch.stack([_look_at([math.cos(2 * math.pi * i / M), math.sin(2 * math.pi * i / M), 2.0]) for i in range(M)])
    viewmats = viewmat_from_c2w(c2w)
    focal = SIZE / 2 / math.tan(math.radians(30))
    Ks = torch.tensor([[focal, 0, SIZE / 2], [0, focal, SIZE / 2], [0, 0, 1.0]]).expand(M, 3, 3).contiguous()
    step = 0.08
    axis = torch.arange(-3.0, 3.0 + 1e-6, step)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    keep = xx**2 + yy**2 < 9.0
    ground = torch.stack([xx[keep], yy[keep], torch.zeros_like(xx[keep])], -1)
    ground[:, :2] += (torch.rand(ground[:, :2].shape, generator=gen) - 0.5) * step * 0.5
    blobs = []
    for centre, radius in (([0.3, 0.2, 0.25], 0.25), ([-0.4, -0.3, 0.2], 0.2), ([0.0, -0.6, 0.15], 0.15)):
        d = torch.randn(int(radius**2 * 3500), 3, generator=gen)
        blobs.append(torch.tensor(centre) + radius * d / d.norm(dim=1, keepdim=True))
    means = torch.cat([ground, *blobs])
    scales = torch.cat(
        [torch.tensor([[0.06, 0.06, 0.005]]).expand(len(ground), 3), torch.full((len(means) - len(ground), 3), 0.04)]
    )
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(len(means), 4)
    x, y, z = means.unbind(-1)
    colors = 0.5 + 0.4 * torch.stack(
        [torch.sin(2 * x + 0.8 * y + 6 * z), torch.sin(1.4 * y - x + 1), torch.sin(2.6 * (x + y) + 2 + 8 * z)], -1
    )
    out, _, _ = rasterize(
        means, quats, scales, torch.full((len(means),), 0.7), colors, viewmats, Ks, SIZE, SIZE,
        render_mode="RGB+ED", backend="torch",
    )  # fmt: skip
    return ViewSet(out[..., :3].permute(0, 3, 1, 2).clamp(0, 1).contiguous(), out[..., 3], viewmats, Ks)


def smooth_views(h: int, w: int) -> torch.Tensor:
    """Float[9, 3, h, w]: distinct smooth images (low frequencies survive resampling)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    views = [torch.stack([0.5 + 0.3 * torch.sin(3 * x + k), 0.5 + 0.3 * torch.cos(2 * y - k), (x + y + k / 9) / 3])
             for k in range(9)]  # fmt: skip
    return torch.stack(views)
