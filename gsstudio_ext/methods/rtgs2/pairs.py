"""RT-GS2 Stage A pair mining: per-view Gaussian visibility and the overlapping view pairs it yields (spec §4.3).

The official code marks a Gaussian visible in a view when its centre is in front of the camera with NDC |x|, |y|
<= 1.3, with no occlusion test, so "positive" correspondences include Gaussians hidden behind walls (spec §4.8).
Here the default is occlusion-aware (spec §4.9.3): a Gaussian is visible when the sum of its alpha-blend weights
alpha_i(p) T_i(p) over the view's pixels exceeds ``blend_eps``; the official rule stays available as "frustum".

Pairs: for every ``anchor_every``-th view v1, scan the later views v2 in order and keep (v1, v2) when the Jaccard
overlap of the visible sets lies in the open ``jaccard_range`` and v2 is at least ``min_gap`` views after the last
kept partner of v1 (v1 itself before the first one). Correspondences are identity matches: the Gaussians visible
in both views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gsstudio_ext.core.contributions import footprint
from gsstudio_ext.core.frustum import in_frustum
from gsstudio_ext.core.scene import GaussianScene

Visibility = Literal["blend", "frustum"]

NEAR = 0.01
"""Depth below which a centre does not count as in front of the camera (the rasterizer's near plane)."""


class ViewCamera(NamedTuple):
    """One pinhole view."""

    viewmat: Tensor  # [4, 4] OpenCV world-to-camera
    K: Tensor  # [3, 3] intrinsics
    width: int
    height: int


class ViewPair(NamedTuple):
    """Two overlapping views of one scene and their identity correspondences."""

    first: int  # view index of the anchor view
    second: int  # view index of the partner view (second > first)
    jaccard: float  # |V1 & V2| / |V1 | V2|
    correspondences: Tensor  # Long[K]: ids of the Gaussians visible in both views (sorted)
    visible_first: Tensor  # Bool[N]: visibility in the first view (shared between pairs of the same view)
    visible_second: Tensor  # Bool[N]: visibility in the second view


@dataclass
class PairMiningConfig:
    """How views are paired for contrastive training (official values as defaults, except ``visibility``)."""

    anchor_every: int = 25
    """Every anchor_every-th view (0, 25, 50, ...) is an anchor v1."""
    min_gap: int = 25
    """A partner v2 must be at least this many views after v1's last kept partner (or v1 itself)."""
    jaccard_range: Tuple[float, float] = (0.3, 0.8)
    """Open interval the Jaccard overlap of the two visible sets must fall in."""
    visibility: Visibility = "blend"
    """"blend": occlusion-aware, blend-weight sum > blend_eps (spec §4.9.3); "frustum": official NDC test."""
    blend_eps: float = 0.01
    """Minimum sum of a Gaussian's blend weights over a view's pixels (in pixels) to count as visible."""
    ndc_margin: float = 1.3
    """"frustum" mode: centres with NDC |x|, |y| <= ndc_margin (and z > 0) are visible."""


def _frustum_visibility(means: Tensor, camera: ViewCamera, ndc_margin: float) -> Tensor:
    """Bool [N]: centre in front of the camera with |x_ndc|, |y_ndc| <= ndc_margin (the official rule)."""
    viewmat = camera.viewmat.to(means)
    K = camera.K.to(means)
    cam = means @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[:, 2]
    zs = z.clamp_min(NEAR)
    u = K[0, 0] * cam[:, 0] / zs + K[0, 2]
    v = K[1, 1] * cam[:, 1] / zs + K[1, 2]
    x_ndc = 2.0 * u / camera.width - 1.0
    y_ndc = 2.0 * v / camera.height - 1.0
    return (z > NEAR) & (x_ndc.abs() <= ndc_margin) & (y_ndc.abs() <= ndc_margin)


def _blend_visibility(scene: GaussianScene, camera: ViewCamera, blend_eps: float) -> Tensor:
    """Bool [N]: the Gaussian's blend weights alpha_i(p) T_i(p), summed over the image, exceed blend_eps."""
    means = scene.means.detach()
    viewmat = camera.viewmat.to(means)
    K = camera.K.to(means)
    scales = scene.scales().detach()
    # rasterize only the Gaussians whose footprint can touch the image (the others have zero weight)
    candidates = in_frustum(means, scales, viewmat, K, camera.width, camera.height, near=NEAR).nonzero()[:, 0]
    visible = torch.zeros(scene.num_gaussians, dtype=torch.bool, device=means.device)
    if candidates.numel() == 0:
        return visible
    weights = footprint(
        means[candidates],
        scene.quats.detach()[candidates],
        scales[candidates],
        scene.opacities().detach()[candidates],
        viewmat[None],
        K[None],
        camera.width,
        camera.height,
        near_plane=NEAR,
    )
    visible[candidates] = weights > blend_eps
    return visible


def gaussian_visibility(
    scene: GaussianScene,
    camera: ViewCamera,
    mode: Visibility = "blend",
    blend_eps: float = 0.01,
    ndc_margin: float = 1.3,
) -> Tensor:
    """Bool [N]: which Gaussians the view sees.

    "blend" is occlusion-aware: the sum over pixels of the Gaussian's blend weight exceeds ``blend_eps`` (one
    rasterization; gsplat on CUDA, the pure-torch rasterizer elsewhere). "frustum" is the official rule: centre in
    front of the camera and NDC |x|, |y| <= ``ndc_margin``; it ignores occlusion.
    """
    if mode == "blend":
        return _blend_visibility(scene, camera, blend_eps)
    if mode == "frustum":
        return _frustum_visibility(scene.means.detach(), camera, ndc_margin)
    raise ValueError(f"gaussian_visibility: mode must be 'blend' or 'frustum', got {mode!r}")


def visibility_masks(
    scene: GaussianScene,
    cameras: Sequence[ViewCamera],
    config: PairMiningConfig,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Tensor:
    """Bool [V, N]: ``gaussian_visibility`` of every view; ``progress(done, total)`` is called after each view."""
    rows = []
    for i, camera in enumerate(cameras):
        rows.append(gaussian_visibility(scene, camera, config.visibility, config.blend_eps, config.ndc_margin))
        if progress is not None:
            progress(i + 1, len(cameras))
    if not rows:
        return torch.zeros(0, scene.num_gaussians, dtype=torch.bool, device=scene.device)
    return torch.stack(rows)


def pairs_from_visibility(visible: Tensor, config: PairMiningConfig) -> List[ViewPair]:
    """The anchor/partner scan of the module docstring over precomputed masks ``visible`` Bool [V, N]."""
    if visible.dim() != 2 or visible.dtype != torch.bool:
        raise ValueError(f"pairs_from_visibility: visible must be Bool [V, N], got {visible.dtype} {visible.shape}")
    if config.anchor_every < 1 or config.min_gap < 1:
        raise ValueError("pairs_from_visibility: anchor_every and min_gap must be >= 1")
    lo, hi = config.jaccard_range
    num_views = visible.shape[0]
    masks = list(visible.unbind(0))  # one tensor per view, shared by every pair that uses the view
    counts = visible.sum(dim=1)
    pairs: List[ViewPair] = []
    for first in range(0, num_views, config.anchor_every):
        last = first
        for second in range(first + 1, num_views):
            if second - last < config.min_gap:
                continue
            both = masks[first] & masks[second]
            inter = int(both.sum())
            union = int(counts[first] + counts[second]) - inter
            jaccard = inter / union if union > 0 else 0.0
            if lo < jaccard < hi:
                corr = both.nonzero()[:, 0]
                pairs.append(ViewPair(first, second, jaccard, corr, masks[first], masks[second]))
                last = second
    return pairs


def mine_pairs(
    scene: GaussianScene,
    cameras: Sequence[ViewCamera],
    config: Optional[PairMiningConfig] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[ViewPair]:
    """Visibility of every view, then the overlapping pairs (module docstring); ``progress`` as in
    ``visibility_masks``."""
    config = config or PairMiningConfig()
    return pairs_from_visibility(visibility_masks(scene, cameras, config, progress), config)
