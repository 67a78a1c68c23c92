"""A Gaussian scene for a generated dataset, fused from its ground-truth RGB-D train views.

Multi-scene methods (RT-GS2) start from an already-trained 3DGS scene per dataset. For generated benchmark sets,
fitting one per scene would dominate the test time, so each train pixel is back-projected with its exact depth and
the points are fused on a voxel grid: one isotropic Gaussian per occupied voxel, at the mean position, with the mean
colour (SH degree 0) and a fixed high opacity. Renders from the train cameras then match the images closely, and the
result is an ordinary 3DGS ``.ply`` in the dataset's world frame (what gs-synth's transforms.json uses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from gsstudio_ext.core.ply import write_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH
from gsstudio_ext.data.synthetic.cameras import Intrinsics, backproject
from gsstudio_ext.data.synthetic.writer import GAUSSIANS_NAME


def _train_frames(meta: dict) -> list:
    train = set(meta.get("train_filenames", []))
    return [f for f in meta["frames"] if not train or f["file_path"] in train]


def _depth_edges(depth: np.ndarray, tolerance: float) -> np.ndarray:
    """Bool [H, W]: pixels whose 3x3 neighbourhood spans a depth jump above ``tolerance`` (relative). Their
    anti-aliased colours mix two surfaces, so fusing them would paint object colour onto the table behind."""
    padded = np.pad(depth, 1, mode="edge")
    h, w = depth.shape
    shifts = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    spread = np.max(shifts, axis=0) - np.min(shifts, axis=0)
    return spread > tolerance * np.maximum(depth, 1e-6)


def fuse_rgbd_views(
    dataset: Path,
    voxel_size: Optional[float] = None,
    opacity: float = 0.98,
    sigma_factor: float = 0.4,
    edge_tolerance: float = 0.1,
) -> GaussianScene:
    """Fuse the train views of a generated dataset into Gaussians.

    Args:
        dataset: a gs-synth dataset folder (transforms.json with depth_file_path per frame, depths in millimetres).
        voxel_size: fusion grid size in scene units; None = the median pixel footprint (depth / focal).
        opacity: opacity of every Gaussian.
        sigma_factor: Gaussian standard deviation as a fraction of the voxel size.
        edge_tolerance: pixels at a relative depth jump above this are not fused (mixed colours).
    """
    dataset = Path(dataset)
    meta = json.loads((dataset / "transforms.json").read_text())
    intr = Intrinsics(meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], int(meta["w"]), int(meta["h"]))
    points, colours, footprints = [], [], []
    for frame in _train_frames(meta):
        depth = np.asarray(Image.open(dataset / frame["depth_file_path"]), dtype=np.float64) / 1000.0
        rgb = np.asarray(Image.open(dataset / frame["file_path"]).convert("RGB"), dtype=np.float64) / 255.0
        valid = (depth > 0) & ~_depth_edges(depth, edge_tolerance)
        world = backproject(depth, intr, np.asarray(frame["transform_matrix"], dtype=np.float64))
        points.append(world[valid])
        colours.append(rgb[valid])
        footprints.append(depth[valid] / intr.fx)
    if not points or sum(len(p) for p in points) == 0:
        raise ValueError(f"{dataset}: no train pixel has a depth; cannot fuse a Gaussian scene")
    pts, cols = np.concatenate(points), np.concatenate(colours)
    if voxel_size is None:
        voxel_size = float(np.median(np.concatenate(footprints)))
    keys = np.floor(pts / voxel_size).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)

    def voxel_mean(values: np.ndarray) -> np.ndarray:
        sums = np.zeros((len(counts), values.shape[1]))
        np.add.at(sums, inverse, values)
        return sums / counts[:, None]

    means = torch.from_numpy(voxel_mean(pts)).float()
    rgb = torch.from_numpy(voxel_mean(cols)).float().clamp(0.0, 1.0)
    n = len(means)
    log_sigma = math.log(sigma_factor * voxel_size)
    return GaussianScene(
        means=means,
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        log_scales=torch.full((n, 3), log_sigma),
        opacity_logits=torch.full((n,), math.log(opacity / (1.0 - opacity))),
        sh_dc=RGB2SH(rgb),
        sh_rest=torch.zeros(n, 0, 3),
    ).validate()


def write_fused_gaussians(dataset: Path, voxel_size: Optional[float] = None) -> Path:
    """Fuse ``dataset``'s train views (see :func:`fuse_rgbd_views`) and write ``dataset/gaussians.ply``."""
    scene = fuse_rgbd_views(dataset, voxel_size)
    return write_ply(Path(dataset) / GAUSSIANS_NAME, scene, comments=("fused from ground-truth RGB-D train views",))
