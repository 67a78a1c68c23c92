"""Initial Gaussians from a coloured point cloud (the 3DGS recipe: isotropic scale = mean 3-NN distance)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH, num_sh_bases


def knn_mean_distance(points: Tensor, k: int = 3) -> Tensor:
    """Mean distance of each point to its k nearest other points [N] (KD-tree on CPU)."""
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy()
    if len(pts) <= 1:
        return torch.full((len(pts),), 0.01, dtype=points.dtype)
    k = min(k, len(pts) - 1)
    dist, _ = cKDTree(pts).query(pts, k=k + 1)
    mean = np.maximum(dist[:, 1:].mean(axis=1), 1e-7)
    return torch.from_numpy(mean).to(points.dtype)


def random_quats(num: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniformly distributed random unit quaternions wxyz [N, 4] (Shoemake's method)."""
    u, v, w = torch.rand(3, num, generator=generator)
    return torch.stack(
        [
            torch.sqrt(1 - u) * torch.sin(2 * torch.pi * v),
            torch.sqrt(1 - u) * torch.cos(2 * torch.pi * v),
            torch.sqrt(u) * torch.sin(2 * torch.pi * w),
            torch.sqrt(u) * torch.cos(2 * torch.pi * w),
        ],
        dim=-1,
    )


def scene_from_points(
    points: Tensor,
    colors: Optional[Tensor],
    sh_degree: int,
    init_opacity: float = 0.1,
    sigmoid_colors: bool = False,
    generator: Optional[torch.Generator] = None,
) -> GaussianScene:
    """Gaussians centred on ``points`` [N, 3] with ``colors`` [N, 3] in 0..255 (or None: random colours).

    ``sigmoid_colors`` stores logit(colour) in the DC term (splatfacto's convention for sh_degree 0) instead of SH.
    """
    points = points.float()
    n = points.shape[0]
    rgb = colors.float() / 255.0 if colors is not None and len(colors) == n else torch.rand(n, 3, generator=generator)
    dc = torch.logit(rgb, eps=1e-6) if sigmoid_colors else RGB2SH(rgb)
    return GaussianScene(
        means=points.clone(),
        quats=random_quats(n, generator),
        log_scales=torch.log(knn_mean_distance(points))[:, None].repeat(1, 3),
        opacity_logits=torch.full((n,), float(torch.logit(torch.tensor(init_opacity)))),
        sh_dc=dc,
        sh_rest=torch.zeros(n, num_sh_bases(sh_degree) - 1, 3),
    )
