"""Click queries on a trained ag2aussian-ext model: pixel -> rendered depth -> 3D point -> grown anchor selection."""

from __future__ import annotations

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from gsstudio_ext.core.selection import gaussians_of
from gsstudio_ext.methods.ag2aussian.index import anchor_centers, grow_from_point


def pixel_to_point(camera: Cameras, x: int, y: int, depth: float) -> Tensor:
    """World point [3] seen at pixel (x, y) of a nerfstudio camera at z-depth ``depth`` (pixel centres at +0.5)."""
    fx, fy = float(camera.fx[0]), float(camera.fy[0])
    cx, cy = float(camera.cx[0]), float(camera.cy[0])
    c2w = camera.camera_to_worlds[0]
    # nerfstudio cameras are OpenGL: x right, y up, looking down -z
    local = torch.tensor([(x + 0.5 - cx) / fx * depth, -(y + 0.5 - cy) / fy * depth, -depth], device=c2w.device)
    return c2w[:3, :3] @ local.to(c2w.dtype) + c2w[:3, 3]


@torch.no_grad()
def select_by_click(model, camera: Cameras, x: int, y: int) -> Tensor:
    """Children [N] bool selected by clicking pixel (x, y) of ``camera`` (empty if the pixel shows nothing)."""
    camera = camera.to(model.device)
    was_training = model.training
    model.eval()
    outputs = model.get_outputs_for_camera(camera)
    model.train(was_training)
    if float(outputs["accumulation"][y, x, 0]) < 0.5:
        return torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
    point = pixel_to_point(camera, x, y, float(outputs["depth"][y, x, 0]))
    params = model.gauss_params
    centers = anchor_centers(params["anchor_xyz"].detach(), model.means.detach(), params["point2anchor"])
    anchors = grow_from_point(model.anchor_index, centers, params["anchor_feat"].detach(), point,
                              model.config.graph_settings)  # fmt: skip
    return gaussians_of(anchors, params["point2anchor"])
