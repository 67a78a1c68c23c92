"""RT-GS2 pair mining: occlusion-aware vs frustum visibility, and the anchor/partner scan."""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import pytest
import torch

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH
from gsstudio_ext.data.synthetic.cameras import look_at
from gsstudio_ext.methods.rtgs2.pairs import (
    PairMiningConfig,
    ViewCamera,
    gaussian_visibility,
    mine_pairs,
    pairs_from_visibility,
    visibility_masks,
)

HIDDEN = (0.0, 1.45, 0.45)
"""A small Gaussian just behind the wall (y = 1.2 plane), hidden from cameras on the -y side."""


def _grid(a: np.ndarray, b: np.ndarray, spacing: float) -> Tuple[np.ndarray, np.ndarray]:
    """Meshgrid over [a0, a1] x [b0, b1] at ``spacing`` (flattened)."""
    u = np.arange(a[0], a[1] + 1e-9, spacing)
    v = np.arange(b[0], b[1] + 1e-9, spacing)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    return uu.ravel(), vv.ravel()


def box_scene(seed: int = 0, spacing: float = 0.12, colour_noise: float = 0.12) -> GaussianScene:
    """~1k opaque isotropic Gaussians: a ground plane, a wall at y = 1.2 (facing -y), three boxes, one hidden
    Gaussian behind the wall (last row). Colours: per object plus per-Gaussian noise of std ``colour_noise``;
    opacities vary in sigmoid([2, 5]) = [0.88, 0.99]."""
    rng = np.random.default_rng(seed)
    parts: List[Tuple[np.ndarray, np.ndarray]] = []

    x, y = _grid(np.array([-1.5, 1.5]), np.array([-1.5, 1.1]), spacing)
    parts.append((np.stack([x, y, np.zeros_like(x)], 1), np.array([0.5, 0.5, 0.45])))
    x, z = _grid(np.array([-1.5, 1.5]), np.array([0.0, 1.0]), spacing * 0.7)
    parts.append((np.stack([x, np.full_like(x, 1.2), z], 1), np.array([0.8, 0.8, 0.7])))
    boxes = [
        ((-0.7, -0.4), 0.4, (0.9, 0.2, 0.2)),
        ((0.5, -0.2), 0.5, (0.2, 0.3, 0.9)),
        ((0.0, 0.6), 0.3, (0.2, 0.8, 0.3)),
    ]
    for (cx, cy), size, colour in boxes:
        h = size / 2
        lo, hi = np.array([-h, -h]), np.array([h, h])
        u, v = _grid(lo, hi, spacing * 0.8)
        faces = [
            np.stack([cx + u, cy + v, np.full_like(u, size)], 1),  # top
            np.stack([cx + u, np.full_like(u, cy - h), v + h], 1),
            np.stack([cx + u, np.full_like(u, cy + h), v + h], 1),
            np.stack([np.full_like(u, cx - h), cy + u, v + h], 1),
            np.stack([np.full_like(u, cx + h), cy + u, v + h], 1),
        ]
        parts.append((np.concatenate(faces), np.array(colour)))

    means = np.concatenate([p for p, _ in parts])
    colours = np.concatenate([np.tile(c, (len(p), 1)) for p, c in parts])
    colours = np.clip(colours + rng.normal(0, colour_noise, colours.shape), 0.02, 0.98)
    n = len(means)
    log_scales = np.full((n, 3), math.log(spacing * 0.7))
    means = np.concatenate([means, np.array([HIDDEN])])
    colours = np.concatenate([colours, np.array([[1.0, 0.0, 1.0]])])
    log_scales = np.concatenate([log_scales, np.full((1, 3), math.log(0.03))])
    n += 1
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return GaussianScene(
        means=t(means),
        quats=quats,
        log_scales=t(log_scales),
        opacity_logits=t(np.append(rng.uniform(2.0, 5.0, n - 1), 4.0)),
        sh_dc=RGB2SH(t(colours)),
        sh_rest=torch.zeros(n, 0, 3),
    ).validate()


def orbit_cameras(num: int = 24, radius: float = 3.2, height: float = 1.3, size: int = 40) -> List[ViewCamera]:
    """``num`` cameras on a circle around the origin looking at (0, 0, 0.3); view 0 stands at -y (sees the wall's
    front), azimuth increasing counter-clockwise."""
    fx = (size / 2) / math.tan(math.radians(32))
    K = torch.tensor([[fx, 0, size / 2], [0, fx, size / 2], [0, 0, 1]], dtype=torch.float32)
    cams = []
    for k in range(num):
        az = -math.pi / 2 + 2 * math.pi * k / num
        eye = np.array([radius * math.cos(az), radius * math.sin(az), height])
        c2w = torch.tensor(look_at(eye, np.array([0.0, 0.0, 0.3])), dtype=torch.float32)
        cams.append(ViewCamera(viewmat_from_c2w(c2w[None])[0], K, size, size))
    return cams


@pytest.fixture(scope="module")
def scene() -> GaussianScene:
    return box_scene()


@pytest.fixture(scope="module")
def cameras() -> List[ViewCamera]:
    return orbit_cameras()


def test_blend_visibility_excludes_occluded_gaussian(scene: GaussianScene, cameras: List[ViewCamera]) -> None:
    hidden = scene.num_gaussians - 1
    front, back = cameras[0], cameras[12]  # -y side (wall in between) and +y side (nothing in between)
    frustum = gaussian_visibility(scene, front, mode="frustum")
    blend = gaussian_visibility(scene, front, mode="blend")
    assert frustum.dtype == torch.bool and frustum.shape == (scene.num_gaussians,)
    assert bool(frustum[hidden]) and not bool(blend[hidden])
    # seen directly from behind the wall it is visible in both modes
    assert bool(gaussian_visibility(scene, back, mode="blend")[hidden])
    assert bool(gaussian_visibility(scene, back, mode="frustum")[hidden])
    # occlusion only removes Gaussians: blend-visible ones are (almost all) inside the frustum too
    assert int((blend & ~frustum).sum()) <= 0.05 * int(blend.sum())
    assert int(blend.sum()) < int(frustum.sum())
    assert int(blend.sum()) > 100


def test_frustum_rule_matches_ndc_margin() -> None:
    K = torch.tensor([[10.0, 0, 10], [0, 10.0, 10], [0, 0, 1]])
    cam = ViewCamera(torch.eye(4), K, 20, 20)
    # at depth 1: u = 10 x + 10, x_ndc = u / 10 - 1 = x; the official margin 1.3
    means = torch.tensor([[1.25, 0.0, 1.0], [1.35, 0.0, 1.0], [0.0, -1.29, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 5.0]])
    scene = GaussianScene(
        means=means,
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(5, 1),
        log_scales=torch.full((5, 3), -3.0),
        opacity_logits=torch.zeros(5),
        sh_dc=torch.zeros(5, 3),
        sh_rest=torch.zeros(5, 0, 3),
    )
    assert gaussian_visibility(scene, cam, mode="frustum").tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="mode"):
        gaussian_visibility(scene, cam, mode="depth")  # type: ignore[arg-type]


def test_pairs_from_visibility_scan_on_constructed_masks() -> None:
    # 8 views over 10 Gaussians; view v sees Gaussians v .. v+4 (mod 10): Jaccard(v, v+d) = (5-d)/(5+d)
    vis = torch.zeros(8, 10, dtype=torch.bool)
    for v in range(8):
        vis[v, [(v + j) % 10 for j in range(5)]] = True
    config = PairMiningConfig(anchor_every=4, min_gap=1, jaccard_range=(0.3, 0.8))
    pairs = pairs_from_visibility(vis, config)
    # d=1: 4/6=0.667, d=2: 3/7=0.43, d=3: 2/8=0.25 (out), d=4: 1/9 (out); d=1 and d=2 kept for anchors 0 and 4
    assert [(p.first, p.second) for p in pairs] == [(0, 1), (0, 2), (4, 5), (4, 6)]
    assert pairs[0].jaccard == pytest.approx(4 / 6) and pairs[1].jaccard == pytest.approx(3 / 7)
    assert pairs[1].correspondences.tolist() == [2, 3, 4]
    # min_gap 2: after keeping (0, 2) the next partner must be >= 4 (none qualifies); v2=1 is too close to v1=0
    gapped = pairs_from_visibility(vis, PairMiningConfig(anchor_every=4, min_gap=2))
    assert [(p.first, p.second) for p in gapped] == [(0, 2), (4, 6)]


def test_mined_pairs_respect_range_gap_and_intersection(scene: GaussianScene, cameras: List[ViewCamera]) -> None:
    config = PairMiningConfig(anchor_every=6, min_gap=2, jaccard_range=(0.3, 0.8))
    calls = []
    vis = visibility_masks(scene, cameras, config, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (24, 24)
    pairs = mine_pairs(scene, cameras, config)
    assert len(pairs) >= 4
    last_partner = {}
    for pair in pairs:
        assert pair.first % 6 == 0 and pair.second > pair.first
        assert 0.3 < pair.jaccard < 0.8
        gap_from = last_partner.get(pair.first, pair.first)
        assert pair.second - gap_from >= 2
        last_partner[pair.first] = pair.second
        both = vis[pair.first] & vis[pair.second]
        assert torch.equal(pair.correspondences, both.nonzero()[:, 0])
        union = int((vis[pair.first] | vis[pair.second]).sum())
        assert pair.jaccard == pytest.approx(int(both.sum()) / union)
        assert torch.equal(pair.visible_first, vis[pair.first]) and torch.equal(pair.visible_second, vis[pair.second])
    # every rejected candidate right after a kept anchor's gap was out of range
    for first in range(0, 24, 6):
        kept = [p.second for p in pairs if p.first == first]
        for second in range(first + 2, 24):
            if second in kept:
                continue
            both = vis[first] & vis[second]
            jac = int(both.sum()) / int((vis[first] | vis[second]).sum())
            previous = max([k for k in kept if k < second], default=first)
            if second - previous >= 2:
                assert not (0.3 < jac < 0.8)
