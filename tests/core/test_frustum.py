"""in_frustum is a superset of what the rasterizer projects (radii > 0), and not a loose one."""

from __future__ import annotations

import math

import torch

from gsstudio_ext.core.frustum import in_frustum
from gsstudio_ext.core.torch_rasterizer import project_gaussians, quat_scale_to_covar


def test_in_frustum_contains_every_projected_gaussian_and_little_else() -> None:
    g = torch.Generator().manual_seed(0)
    n = 4000
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([8.0, 8.0, 12.0])
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.01), math.log(0.3), generator=g))
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    angle = 0.4
    viewmat = torch.eye(4)
    viewmat[:3, :3] = torch.tensor(
        [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
    )
    viewmat[:3, 3] = torch.tensor([0.2, -0.1, 1.0])
    K = torch.tensor([[60.0, 0.0, 41.0], [0.0, 58.0, 30.0], [0.0, 0.0, 1.0]])
    width, height = 80, 64

    projected = project_gaussians(means, quat_scale_to_covar(quats, scales), viewmat[None], K[None], width, height)
    rendered = projected.radii[0] > 0
    candidates = in_frustum(means, scales, viewmat, K, width, height)

    assert int(rendered.sum()) > 300
    assert bool((candidates | ~rendered).all()), "a rendered Gaussian was culled"
    assert int(candidates.sum()) <= 1.3 * int(rendered.sum())
