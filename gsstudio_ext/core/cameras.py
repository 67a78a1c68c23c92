"""Camera conversions between nerfstudio (OpenGL camera-to-world) and gsplat (OpenCV world-to-camera)."""

from __future__ import annotations

import torch
from torch import Tensor


def viewmat_from_c2w(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world [C, 3 or 4, 4] -> OpenCV world-to-camera [C, 4, 4] (flip y and z, invert)."""
    rot = c2w[:, :3, :3].clone()
    rot[:, :, 1:3] = -rot[:, :, 1:3]  # no host-to-device constant: that would synchronise a CUDA stream
    rot_inv = rot.transpose(1, 2)
    viewmat = torch.zeros(c2w.shape[0], 4, 4, device=c2w.device, dtype=c2w.dtype)
    viewmat[:, :3, :3] = rot_inv
    viewmat[:, :3, 3] = -torch.bmm(rot_inv, c2w[:, :3, 3:4])[..., 0]
    viewmat[:, 3, 3] = 1.0
    return viewmat
