"""Anchors and their child Gaussians (Scaffold-GS style, AG2aussian's free-scale variant; spec §2.3, §2.6).

All tensors live in the model's ``gauss_params`` so checkpoints and the viewer see them:

- anchor level [A]: ``anchor_xyz`` [A, 3] (fixed), ``anchor_radius`` [A] (fixed), ``anchor_feat`` [A, D] (trained);
- child level [N = A * k at start]: ``offsets`` [N, 3] in anchor-radius units, ``scales`` (log), ``quats``,
  ``features_dc``, ``features_rest``, ``opacities`` (logit) and ``point2anchor`` [N] (fixed, int64).

A child sits at ``anchor_xyz[p2a] + anchor_radius[p2a] * offsets``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from gsstudio_ext.core.init import knn_mean_distance
from gsstudio_ext.core.sh import RGB2SH, num_sh_bases


def scene_radius(points: Tensor) -> float:
    """Scene extent R from a point cloud: 1.1 x the 99th-percentile distance to the centroid (robust to outliers)."""
    if points.shape[0] == 0:
        return 1.0
    dist = (points - points.mean(dim=0)).norm(dim=-1)
    return 1.1 * float(torch.quantile(dist, 0.99)) if points.shape[0] > 1 else 1.0


def voxel_keys(points: Tensor, cell: float) -> Tensor:
    """Integer voxel coordinates [N, 3] of points on a grid of side ``cell``."""
    return torch.floor(points / cell).long()


def voxelize(points: Tensor, colors: Optional[Tensor], cell: float) -> tuple[Tensor, Optional[Tensor]]:
    """One point per occupied voxel (the mean of its points) and its mean colour."""
    keys, inverse = torch.unique(voxel_keys(points, cell), dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=keys.shape[0]).clamp_min(1)[:, None].to(points.dtype)
    centers = torch.zeros(keys.shape[0], 3, dtype=points.dtype).index_add_(0, inverse, points) / counts
    if colors is None:
        return centers, None
    mean_colors = torch.zeros(keys.shape[0], 3).index_add_(0, inverse, colors.float()) / counts
    return centers, mean_colors


def children_params(
    anchor_xyz: Tensor,
    anchor_radius: Tensor,
    rgb: Tensor,
    children: int,
    sh_degree: int,
    scale: Tensor,
    opacity: float,
    offset_std: float,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """Child-level parameters for new anchors: ``children`` per anchor, colour ``rgb`` [A, 3] in 0..1, log-scale from
    ``scale`` [A] (activated), small random offsets (zero offsets would keep the k children identical forever)."""
    A = anchor_xyz.shape[0]
    n = A * children
    p2a = torch.arange(A).repeat_interleave(children)
    rest = num_sh_bases(sh_degree) - 1
    dc = RGB2SH(rgb) if sh_degree > 0 else torch.logit(rgb.clamp(1e-4, 1 - 1e-4))
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return {
        "offsets": torch.randn(n, 3, generator=generator) * offset_std,
        "scales": torch.log(scale[p2a])[:, None].repeat(1, 3),
        "quats": quats,
        "features_dc": dc[p2a].float(),
        "features_rest": torch.zeros(n, rest, 3),
        "opacities": torch.full((n, 1), float(torch.logit(torch.tensor(opacity)))),
        "point2anchor": p2a,
    }


def init_anchor_params(
    points: Tensor,
    colors: Optional[Tensor],
    voxel_size: float,
    children: int,
    feature_dim: int,
    sh_degree: int,
    offset_std: float,
    opacity: float,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """Anchors = the voxel-deduplicated seed points; radius = nearest-neighbour distance clamped to <= 16 voxels and
    floored to a whole voxel; children start small and transparent. Features start random on the unit sphere: the
    paper's all-ones start gives every mask the same mean, where the contrast term has no gradient."""
    xyz, rgb255 = voxelize(points.float(), colors, voxel_size)
    rgb = rgb255 / 255.0 if rgb255 is not None else torch.rand(xyz.shape[0], 3, generator=generator)
    nn = knn_mean_distance(xyz, k=1)
    radius = torch.floor(nn.clamp(max=16 * voxel_size) / voxel_size).clamp_min(1.0) * voxel_size
    params = {
        "anchor_xyz": xyz,
        "anchor_radius": radius,
        "anchor_feat": torch.nn.functional.normalize(
            torch.randn(xyz.shape[0], feature_dim, generator=generator), dim=-1
        ),
    }
    child_scale = 0.5 * nn.clamp_min(1e-3 * scene_radius(xyz))
    params.update(children_params(xyz, radius, rgb, children, sh_degree, child_scale, opacity, offset_std, generator))
    return params
