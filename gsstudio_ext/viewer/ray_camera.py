"""A viewer click is a world-space ray; models answer clicks for a camera and a pixel. This turns the ray into a
small pinhole camera looking along it, whose centre pixel sees exactly that ray.

Rendering a tiny narrow camera (17x17 pixels, 2 degrees) costs far less than re-rendering the viewer's whole view,
and the z-depth of its centre pixel is the distance along the ray, so the clicked 3D point is
``origin + depth * direction`` (:func:`pixel_to_world`).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from torch import Tensor


def look_along(origin: Sequence[float], direction: Sequence[float]) -> Tensor:
    """Camera-to-world [3, 4] (nerfstudio/OpenGL axes: x right, y up, looking down -z) at ``origin`` facing
    ``direction``; "up" is the world axis least aligned with the ray."""
    forward = torch.as_tensor(direction, dtype=torch.float32)
    if forward.shape != (3,) or float(forward.norm()) == 0.0:
        raise ValueError(f"ray direction must be a non-zero 3-vector, got {list(direction)}")
    forward = forward / forward.norm()
    hint = torch.zeros(3)
    hint[int(forward.abs().argmin())] = 1.0
    right = torch.linalg.cross(forward, hint)
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    rotation = torch.stack([right, up, -forward], dim=1)
    return torch.cat([rotation, torch.as_tensor(origin, dtype=torch.float32).reshape(3, 1)], dim=1)


def ray_camera(
    origin: Sequence[float], direction: Sequence[float], size: int = 17, fov_degrees: float = 2.0
) -> Tuple[Cameras, int, int]:
    """(camera, x, y): a ``size`` x ``size`` pinhole camera at ``origin`` looking along ``direction``; the ray
    passes through the centre of pixel (x, y) (``size`` is made odd so that pixel exists)."""
    size = size if size % 2 else size + 1
    focal = size / 2.0 / math.tan(math.radians(fov_degrees) / 2.0)
    camera = Cameras(
        camera_to_worlds=look_along(origin, direction)[None],
        fx=focal,
        fy=focal,
        cx=size / 2.0,
        cy=size / 2.0,
        width=size,
        height=size,
        camera_type=CameraType.PERSPECTIVE,
    )
    return camera, size // 2, size // 2


def pixel_to_world(camera: Cameras, x: int, y: int, depth: float) -> Tensor:
    """World point seen at pixel (x, y) of a one-camera ``Cameras`` at z-depth ``depth`` (pixel centres at +0.5);
    for the centre pixel of a :func:`ray_camera` this is ``origin + depth * direction``."""
    c2w = camera.camera_to_worlds.reshape(-1, 3, 4)[0].float()
    fx, fy = float(camera.fx.flatten()[0]), float(camera.fy.flatten()[0])
    cx, cy = float(camera.cx.flatten()[0]), float(camera.cy.flatten()[0])
    local = torch.tensor([(x + 0.5 - cx) / fx, -(y + 0.5 - cy) / fy, -1.0], device=c2w.device) * depth
    return c2w[:, :3] @ local + c2w[:, 3]
