"""Which Gaussians a pinhole view can see: a cheap superset of the rasterizer's ``radii > 0`` test, computed before
rasterizing (so per-view work such as ReferSplat's attention can be restricted to them)."""

from __future__ import annotations

from torch import Tensor


def in_frustum(
    means: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int, near: float = 0.01
) -> Tensor:
    """Bool [N]: Gaussians in front of the near plane whose 3-sigma footprint may overlap the image.

    Args:
        means: [N, 3] world positions.
        scales: [N, 3] standard deviations (not log).
        viewmat: [4, 4] world-to-camera matrix.
        K: [3, 3] intrinsics.
        width, height: image size in pixels.
        near: near plane (the rasterizer's).
    """
    cam = means @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[:, 2]
    front = z > near
    z = z.clamp_min(near)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    # 3 sigma of the largest axis, with slack for the projection's off-axis stretch and gsplat's 0.3 px blur
    radius = 4.5 * scales.amax(dim=-1) * fx.clamp_min(fy) / z + 2.0
    u = fx * cam[:, 0] / z + cx
    v = fy * cam[:, 1] / z + cy
    return front & (u + radius > 0) & (u - radius < width) & (v + radius > 0) & (v - radius < height)
