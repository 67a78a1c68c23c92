"""Many scenes as one dataset: each a nerfstudio dataset with semantic sidecars plus an already-trained Gaussian scene.

``data`` is either a folder with ``scenes.json`` (what ``gs-synth --num-scenes N`` writes; any layout works)::

    {"classes": ["background", ...],
     "scenes": [{"name": "office_0", "path": "office_0", "split": "train" | "unseen",
                 "gaussians": "office_0/point_cloud.ply"}, ...]}

or one dataset folder (a single scene, split "train"). ``gaussians`` names a 3DGS ``.ply`` or a splatfacto /
gsstudio run (config.yml, run folder or .ckpt); relative paths are taken from ``data``; without it the scene's
``gaussians.ply`` is used. Cameras come from nerfstudio's dataparser in the dataset's own world frame (the frame of
3DGS ``.ply`` files); for a nerfstudio run they are moved into the frame it was trained in, using the run's
``dataparser_transforms.json``, so Gaussians and their spherical harmonics are used untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig, DataparserOutputs
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from torch import Tensor

from gsstudio_ext.core.metrics import resize_nearest
from gsstudio_ext.data import layout
from gsstudio_ext.data.sidecars import read_scene_meta, read_semantics
from gsstudio_ext.data.transforms_cameras import read_run_frame, run_pose_transform

SCENES_FILE = "scenes.json"
DEFAULT_GAUSSIANS = "gaussians.ply"
Split = Literal["train", "unseen"]


def world_frame_parser() -> NerfstudioDataParserConfig:
    """transforms.json in its own world frame: no re-orientation, centring or rescaling (as 3DGS .ply files)."""
    return NerfstudioDataParserConfig(orientation_method="none", center_method="none", auto_scale_poses=False)


@dataclass(frozen=True)
class SceneEntry:
    """One scene of a multi-scene dataset."""

    name: str
    root: Path
    """The scene's nerfstudio dataset folder."""
    split: Split
    gaussians: Path
    """Its trained Gaussians: a .ply or a nerfstudio run (config.yml, folder or .ckpt)."""


@dataclass
class SceneViews:
    """The cameras and semantic ground truth of one split of a scene."""

    cameras: Cameras
    stems: List[str]
    semantics: Optional[Tensor]
    """Long [V, H, W] class ids (-1 = unlabelled) at the cameras' resolution, or None without semantic sidecars."""


def read_scene_list(data: Path) -> Tuple[List[SceneEntry], List[str]]:
    """The scenes and the shared class list of ``data`` (a scenes.json folder or one dataset folder).

    Raises:
        FileNotFoundError: ``data`` or a listed scene / Gaussian file does not exist.
        ValueError: scenes.json is malformed or scenes disagree on the class list.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"dataset {data} does not exist")
    index = data / SCENES_FILE
    if index.is_file():
        meta = json.loads(index.read_text())
        if not isinstance(meta.get("scenes"), list) or not meta["scenes"]:
            raise ValueError(f"{index}: 'scenes' must be a non-empty list")
        entries = []
        for item in meta["scenes"]:
            root = data / item.get("path", item["name"])
            split = item.get("split", "train")
            if split not in ("train", "unseen"):
                raise ValueError(f"{index}: scene {item['name']!r} has split {split!r}; use 'train' or 'unseen'")
            gaussians = data / item["gaussians"] if "gaussians" in item else root / DEFAULT_GAUSSIANS
            entries.append(SceneEntry(item["name"], root, split, gaussians))
        classes = meta.get("classes")
    else:
        entries = [SceneEntry(data.name, data, "train", data / DEFAULT_GAUSSIANS)]
        classes = None
    for entry in entries:
        if not entry.gaussians.exists():
            raise FileNotFoundError(
                f"scene {entry.name!r}: no trained Gaussians at {entry.gaussians} (give a .ply or a nerfstudio run "
                f"as 'gaussians' in {SCENES_FILE}, or write one with gs-synth --fuse-gaussians)"
            )
    scene_classes = [read_scene_meta(e.root).get("classes") for e in entries if layout.sidecar_root(e.root).exists()]
    classes = classes or (scene_classes[0] if scene_classes else None)
    if not classes:
        raise ValueError(f"{data}: no class list (scenes.json 'classes' or sidecars/scene.json 'classes')")
    for entry, other in zip(entries, scene_classes):
        if other and list(other) != list(classes):
            raise ValueError(f"scene {entry.name!r} has a different class list than {data}: {other} vs {classes}")
    return entries, list(classes)


def to_run_frame(cameras: Cameras, frame: Optional[Tuple[Tensor, float]], transforms: Optional[Path] = None) -> Cameras:
    """Move world-frame cameras into a nerfstudio run's frame (:func:`read_run_frame`), as nerfstudio's dataparser
    moves poses; with the dataset's ``transforms`` (file or folder) its ``applied_transform`` is undone first."""
    if frame is None:
        return cameras
    to_run, scale = run_pose_transform(frame, transforms)
    c2w = cameras.camera_to_worlds
    moved = to_run[:3, :3] @ c2w
    moved[..., 3] = (moved[..., 3] + to_run[:3, 3]) * scale
    return replace_cameras(cameras, moved)


def replace_cameras(cameras: Cameras, camera_to_worlds: Tensor) -> Cameras:
    return Cameras(
        camera_to_worlds=camera_to_worlds,
        fx=cameras.fx,
        fy=cameras.fy,
        cx=cameras.cx,
        cy=cameras.cy,
        width=cameras.width,
        height=cameras.height,
        distortion_params=cameras.distortion_params,
        camera_type=cameras.camera_type,
    )


def scene_dataparser_outputs(
    entry: SceneEntry, split: Literal["train", "test"], parser: Optional[DataParserConfig] = None, downscale: int = 1
) -> DataparserOutputs:
    """nerfstudio's dataparser outputs of ``entry``'s ``split`` with the cameras in the frame of its Gaussians,
    optionally downscaled by an integer factor."""
    parser = replace(parser or world_frame_parser(), data=entry.root)
    outputs = parser.setup().get_dataparser_outputs(split=split)
    cameras = to_run_frame(outputs.cameras, read_run_frame(entry.gaussians), entry.root)
    if downscale > 1:
        cameras.rescale_output_resolution(1.0 / downscale)
    return replace(outputs, cameras=cameras)


def load_scene_views(
    entry: SceneEntry, split: Literal["train", "test"], parser: Optional[DataParserConfig] = None, downscale: int = 1
) -> SceneViews:
    """Cameras and semantics of ``entry``'s ``split`` ("train" or the dataset's "test" frames), optionally
    downscaled by an integer factor (semantics by nearest neighbour)."""
    outputs = scene_dataparser_outputs(entry, split, parser, downscale)
    cameras = outputs.cameras
    stems = [Path(f).stem for f in outputs.image_filenames]
    semantics = None
    if all(layout.semantic_path(entry.root, s).is_file() for s in stems) and stems:
        maps = []
        for stem, w, h in zip(stems, cameras.width.view(-1).tolist(), cameras.height.view(-1).tolist()):
            m = torch.from_numpy(read_semantics(layout.semantic_path(entry.root, stem)).astype(np.int64))
            maps.append(resize_nearest(m, (int(h), int(w))))
        semantics = torch.stack(maps)
    return SceneViews(cameras=cameras, stems=stems, semantics=semantics)


def scenes_of_split(entries: Sequence[SceneEntry], split: Split) -> List[SceneEntry]:
    return [e for e in entries if e.split == split]
