"""Render a frozen GaussianScene's RGB and per-Gaussian feature channels with one rasterization."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import sh_to_view_colors


class SceneRender(NamedTuple):
    rgb: Tensor
    """[C, H, W, 3] composited on the background, clamped to [0, 1]."""
    features: Optional[Tensor]
    """[C, H, W, F] alpha-blended features on black (None without features)."""
    alpha: Tensor
    """[C, H, W, 1]."""
    depth: Optional[Tensor] = None
    """[C, H, W, 1] expected z-depth (with ``depth=True``)."""


def render_scene(
    scene: GaussianScene,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    features: Optional[Tensor] = None,
    background: Optional[Tensor] = None,
    backend: str = "auto",
    depth: bool = False,
) -> SceneRender:
    """RGB (SH evaluated per view) and ``features`` [N, F] of ``scene`` from cameras viewmats [C, 4, 4] (OpenCV
    world-to-camera), Ks [C, 3, 3], in one rasterization of 3 + F channels (+ expected depth with ``depth``)."""
    sh = scene.colors_sh()
    colors = sh_to_view_colors(scene.means, sh, viewmats, scene.sh_degree)
    if features is not None:
        feats = features.to(colors.dtype)
        colors = torch.cat([colors, feats[None].expand(colors.shape[0], -1, -1)], dim=-1)
    render, alpha, _ = rasterize(
        scene.means,
        scene.quats,
        scene.scales(),
        scene.opacities(),
        colors,
        viewmats,
        Ks,
        width,
        height,
        channel_chunk=max(32, colors.shape[-1]),
        render_mode="RGB+ED" if depth else "RGB",
        backend=backend,
    )
    rgb = render[..., :3]
    if background is not None:
        rgb = rgb + (1.0 - alpha) * background
    channels = colors.shape[-1]
    feats = render[..., 3:channels] if features is not None else None
    return SceneRender(rgb.clamp(0.0, 1.0), feats, alpha, render[..., channels:] if depth else None)
