"""Clicks on a trained ag2aussian-ext model: pixel -> rendered depth -> 3D point -> grown anchor selection."""

from __future__ import annotations

from typing import Optional

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from gsstudio_ext.core.selection import gaussians_of
from gsstudio_ext.methods.ag2aussian.index import anchor_centers, grow_from_point
from gsstudio_ext.viewer.model_actions import rendered_point


def click_point(model, camera: Cameras, x: int, y: int) -> Optional[Tensor]:
    """World point [3] under pixel (x, y) of ``camera`` from the rendered depth; None if the pixel shows nothing."""
    width, height = int(camera.width.flatten()[0]), int(camera.height.flatten()[0])
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"click ({x}, {y}) is outside the {width}x{height} image")
    return rendered_point(model, camera, x, y)


@torch.no_grad()
def select_by_point(model, point: Tensor) -> Tensor:
    """Children [N] bool selected by a 3D point: its nearest anchors, grown over the training-scale graph."""
    params = model.gauss_params
    centers = anchor_centers(params["anchor_xyz"].detach(), model.means.detach(), params["point2anchor"])
    anchors = grow_from_point(model.anchor_index, centers, params["anchor_feat"].detach(), point,
                              model.config.graph_settings)  # fmt: skip
    return gaussians_of(anchors, params["point2anchor"])
