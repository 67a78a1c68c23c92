"""Orbit camera poses, pinhole intrinsics, and exact conversions between them, pybullet and nerfstudio.

Conventions:
- ``c2w`` [4, 4] is camera-to-world in the OpenGL / nerfstudio convention (camera x right, y up, looks along -z),
  which is what ``transforms.json`` stores.
- Intrinsics (fx, fy, cx, cy) follow nerfstudio/OpenCV pixel coordinates: u right, v down, the centre of pixel
  (row i, column j) is (j + 0.5, i + 0.5).
- pybullet's TinyRenderer samples pixel (i, j) at (j, i + 1) of the image plane its projection matrix describes
  (measured: back-projected depth of tilted planes matches to 1e-6 m only with this offset), so the projection
  matrix handed to pybullet shifts the principal point by (-0.5, +0.5) to land on nerfstudio's pixel centres.
- The depth buffer is OpenGL's non-linear [0, 1] value; :func:`depth_buffer_to_z` turns it into metric z-depth
  (distance along the optical axis), which is what ``depths/*.png`` store in millimetres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels (no distortion)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def matrix(self) -> np.ndarray:
        """K [3, 3]."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


def intrinsics_from_fov(width: int, height: int, fov_deg: float) -> Intrinsics:
    """Square-pixel intrinsics with horizontal field of view ``fov_deg`` and the principal point at the centre."""
    focal = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    return Intrinsics(fx=focal, fy=focal, cx=width / 2, cy=height / 2, width=width, height=height)


def scaled_intrinsics(intr: Intrinsics, factor: int) -> Intrinsics:
    """The same camera sampled ``factor`` times more densely (pixel-centre convention preserved)."""
    return Intrinsics(
        fx=intr.fx * factor,
        fy=intr.fy * factor,
        cx=intr.cx * factor,
        cy=intr.cy * factor,
        width=intr.width * factor,
        height=intr.height * factor,
    )


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """OpenGL camera-to-world [4, 4] at ``eye`` looking at ``target`` with no roll."""
    forward = np.asarray(target, dtype=np.float64) - np.asarray(eye, dtype=np.float64)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight down or up: pick any right vector
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -forward, eye
    return c2w


def orbit_poses(
    num_views: int,
    target: np.ndarray,
    radius: float,
    elevation_min_deg: float,
    elevation_max_deg: float,
    elevation_waves: int = 3,
) -> np.ndarray:
    """Camera-to-world poses [N, 4, 4] on a sphere around ``target``, evenly spaced in azimuth.

    View 0 stands on the -y side of the target, looking towards +y: the reference viewpoint of the spatial
    relations (left = -x, right = +x, front = -y, behind = +y). Azimuth increases counter-clockwise seen from
    above; the elevation oscillates ``elevation_waves`` times between its bounds (views 0 and N/2 at the lowest).
    """
    poses = []
    lo, hi = math.radians(elevation_min_deg), math.radians(elevation_max_deg)
    for k in range(num_views):
        t = k / num_views
        azimuth = -math.pi / 2 + 2 * math.pi * t
        elevation = lo + (hi - lo) * 0.5 * (1 - math.cos(2 * math.pi * elevation_waves * t))
        offset = radius * np.array(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
        )
        poses.append(look_at(np.asarray(target) + offset, np.asarray(target)))
    return np.stack(poses)


def fit_radius(extent: float, intr: Intrinsics, margin: float = 1.08) -> float:
    """Camera distance at which a sphere of radius ``extent`` around the look-at point fills the narrower FOV."""
    half_fov = min(math.atan(intr.width / 2 / intr.fx), math.atan(intr.height / 2 / intr.fy))
    return margin * extent / math.sin(half_fov)


def pybullet_view_matrix(c2w: np.ndarray) -> List[float]:
    """pybullet's viewMatrix (OpenGL world-to-camera, column-major, 16 floats) of an OpenGL ``c2w``."""
    return np.linalg.inv(c2w).T.reshape(-1).tolist()


def pybullet_projection_matrix(intr: Intrinsics, near: float, far: float) -> List[float]:
    """pybullet's projectionMatrix (column-major, 16 floats) whose pixels sample nerfstudio's pixel centres."""
    cx, cy = intr.cx - 0.5, intr.cy + 0.5  # TinyRenderer pixel (i, j) samples image-plane point (j, i + 1)
    proj = np.zeros((4, 4))
    proj[0, 0] = 2 * intr.fx / intr.width
    proj[0, 2] = 1 - 2 * cx / intr.width
    proj[1, 1] = 2 * intr.fy / intr.height
    proj[1, 2] = 2 * cy / intr.height - 1
    proj[2, 2] = -(far + near) / (far - near)
    proj[2, 3] = -2 * far * near / (far - near)
    proj[3, 2] = -1.0
    return proj.T.reshape(-1).tolist()


def depth_buffer_to_z(buffer: np.ndarray, near: float, far: float) -> np.ndarray:
    """Metric z-depth [H, W] from OpenGL's non-linear depth buffer [H, W]; 0 where nothing was hit (buffer 1)."""
    buffer = np.asarray(buffer, dtype=np.float64)
    z = far * near / (far - (far - near) * buffer)
    return np.where(buffer >= 1.0, 0.0, z)


def project(points: np.ndarray, intr: Intrinsics, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) [N, 2] and z-depth [N] of world points [N, 3] (negative depth = behind)."""
    w2c = np.linalg.inv(c2w)
    cam = np.asarray(points, dtype=np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    depth = -cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intr.fx * cam[:, 0] / depth + intr.cx
        v = -intr.fy * cam[:, 1] / depth + intr.cy
    return np.stack([u, v], axis=1), depth


def backproject(depth: np.ndarray, intr: Intrinsics, c2w: np.ndarray) -> np.ndarray:
    """World points [H, W, 3] at every pixel centre of a z-depth map [H, W] (meaningless where depth is 0)."""
    rows, cols = np.meshgrid(np.arange(intr.height), np.arange(intr.width), indexing="ij")
    x = (cols + 0.5 - intr.cx) / intr.fx * depth
    y = -(rows + 0.5 - intr.cy) / intr.fy * depth
    cam = np.stack([x, y, -depth], axis=-1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]
