"""Pinhole cameras of a nerfstudio ``transforms.json`` as gsplat tensors, without nerfstudio's dataparser.

- Poses: each frame's ``transform_matrix`` (OpenGL camera-to-world) -> OpenCV world-to-camera ``viewmats [V, 4, 4]``.
- Intrinsics: ``fl_x, fl_y, cx, cy, w, h`` at the top level or per frame (per frame wins); ``fl_y`` defaults to
  ``fl_x``, ``cx, cy`` to the image centre; Blender-style ``camera_angle_x`` gives ``fl_x`` when it is missing.
  Distortion coefficients are ignored (3DGS renders are undistorted pinhole images). Fisheye and equirectangular
  camera models are refused.
- Splits: ``train_filenames`` / ``val_filenames`` / ``test_filenames`` select frames; without such a list the split
  is every frame (nerfstudio would hold out a fraction; for editing data every camera is usable).
- A nerfstudio run trains its Gaussians in the dataparser's frame: oriented, centred and scaled. Its
  ``dataparser_transforms.json`` maps *original* data coordinates (before ns-process-data's ``applied_transform``)
  to that frame, so :func:`to_run_frame` undoes ``applied_transform`` / ``applied_scale`` of the transforms.json and
  then applies the run's transform, as nerfstudio's dataparser does to the poses. A ``.ply`` is taken to be in the
  dataset's own frame (3DGS convention).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import List, Literal, Optional, Tuple, Union

import torch
from torch import Tensor

from gsstudio_ext.core.cameras import viewmat_from_c2w

Split = Literal["all", "train", "val", "test"]
TRANSFORMS_FILE = "transforms.json"
DATAPARSER_FILE = "dataparser_transforms.json"
COLMAP_APPLIED_TRANSFORM = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]
"""nerfstudio's implicit applied_transform of COLMAP datasets written before the field existed."""
_UNSUPPORTED_MODELS = ("OPENCV_FISHEYE", "FISHEYE624", "EQUIRECTANGULAR")


@dataclass
class DatasetCameras:
    """Cameras of some frames of a dataset, in the order of transforms.json's ``frames``."""

    viewmats: Tensor
    """Float[V, 4, 4] OpenCV world-to-camera."""
    Ks: Tensor
    """Float[V, 3, 3] pinhole intrinsics in pixels at each frame's (w, h)."""
    sizes: List[Tuple[int, int]]
    """(width, height) of each frame."""
    file_paths: List[str]
    """Each frame's ``file_path`` as written."""
    source: Path
    """The transforms.json they were read from."""

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    @property
    def c2w(self) -> Tensor:
        """Float[V, 4, 4] OpenGL camera-to-world (nerfstudio's convention)."""
        return torch.linalg.inv(self.viewmats.double()).float() @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def _norm_name(name: str) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).as_posix().removeprefix("./")


def _value(frame: dict, meta: dict, key: str) -> Optional[float]:
    if key in frame:
        return float(frame[key])
    if key in meta:
        return float(meta[key])
    return None


def _intrinsics(frame: dict, meta: dict, where: str) -> Tuple[Tensor, Tuple[int, int]]:
    w, h = _value(frame, meta, "w"), _value(frame, meta, "h")
    if w is None or h is None:
        raise ValueError(f"{where}: no image size (set 'w' and 'h' at the top level or per frame)")
    fx = _value(frame, meta, "fl_x")
    if fx is None:
        angle = _value(frame, meta, "camera_angle_x")
        if angle is None:
            raise ValueError(f"{where}: no focal length ('fl_x' or 'camera_angle_x')")
        fx = 0.5 * w / math.tan(0.5 * angle)
    fy = _value(frame, meta, "fl_y")
    fy = fx if fy is None else fy
    cx, cy = _value(frame, meta, "cx"), _value(frame, meta, "cy")
    cx, cy = (w / 2.0 if cx is None else cx), (h / 2.0 if cy is None else cy)
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)
    return K, (int(w), int(h))


def transforms_path(data: Union[str, Path]) -> Path:
    """The transforms.json of ``data`` (the file itself or a dataset folder holding one).

    Raises:
        FileNotFoundError: there is none.
    """
    data = Path(data).expanduser()
    path = data / TRANSFORMS_FILE if data.is_dir() else data
    if not path.is_file():
        raise FileNotFoundError(f"no {TRANSFORMS_FILE} at {data} (give the dataset folder or its transforms.json)")
    return path


def read_transforms_cameras(data: Union[str, Path], split: Split = "all") -> DatasetCameras:
    """The pinhole cameras of ``split``'s frames of a nerfstudio dataset (folder or transforms.json).

    Raises:
        FileNotFoundError: no transforms.json.
        ValueError: malformed file, unsupported camera model, a split entry naming no frame, or no frames.
    """
    path = transforms_path(data)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed {path}: {err}") from err
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{path} lists no frames")
    model = str(meta.get("camera_model", "OPENCV")).upper()
    if model in _UNSUPPORTED_MODELS:
        raise ValueError(f"{path}: camera model {model} is not a pinhole camera (only pinhole/OPENCV are supported)")
    if split not in ("all", "train", "val", "test"):
        raise ValueError(f"split must be all, train, val or test, got {split!r}")
    chosen = list(range(len(frames)))
    listed = meta.get(f"{split}_filenames") if split != "all" else None
    if listed is not None:
        index = {_norm_name(f.get("file_path", "")): i for i, f in enumerate(frames)}
        unknown = [name for name in listed if _norm_name(name) not in index]
        if unknown:
            raise ValueError(f"{path}: {split}_filenames names frames that do not exist: {unknown[:5]}")
        keep = {index[_norm_name(name)] for name in listed}
        chosen = [i for i in chosen if i in keep]
    if not chosen:
        raise ValueError(f"{path}: the {split} split has no frames")
    c2w, Ks, sizes, names = [], [], [], []
    for i in chosen:
        frame = frames[i]
        where = f"{path} frame {i}"
        matrix = torch.tensor(frame.get("transform_matrix", []), dtype=torch.float32)
        if matrix.shape not in ((4, 4), (3, 4)):
            raise ValueError(f"{where}: transform_matrix must be 4x4 or 3x4, got {list(matrix.shape)}")
        K, size = _intrinsics(frame, meta, where)
        c2w.append(matrix[:3])
        Ks.append(K)
        sizes.append(size)
        names.append(str(frame.get("file_path", "")))
    viewmats = viewmat_from_c2w(torch.stack(c2w))
    return DatasetCameras(viewmats, torch.stack(Ks), sizes, names, path)


def find_transforms(scene: Union[str, Path], levels: int = 3) -> Optional[Path]:
    """A transforms.json next to a scene file: in the scene's folder (or the folder itself) and up to ``levels``
    parent folders; None when there is none."""
    scene = Path(scene).expanduser().resolve()
    folder = scene if scene.is_dir() else scene.parent
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / TRANSFORMS_FILE).is_file():
            return candidate / TRANSFORMS_FILE
    return None


def read_run_frame(scene: Union[str, Path]) -> Optional[Tuple[Tensor, float]]:
    """(Float[3, 4] transform, scale) of the nerfstudio run that holds ``scene`` (a run folder, its config.yml,
    ``nerfstudio_models/`` or a .ckpt), from its dataparser_transforms.json; None for a .ply or when absent."""
    scene = Path(scene)
    if scene.suffix.lower() == ".ply":
        return None
    folder = scene if scene.is_dir() else scene.parent
    for candidate in (folder, folder.parent):
        path = candidate / DATAPARSER_FILE
        if path.is_file():
            meta = json.loads(path.read_text())
            transform = torch.tensor(meta["transform"], dtype=torch.float32)
            if transform.shape != (3, 4):
                raise ValueError(f"{path}: 'transform' must be 3x4, got {list(transform.shape)}")
            return transform, float(meta["scale"])
    return None


def applied_transform(transforms: Union[str, Path]) -> Tuple[Tensor, float]:
    """(Float[4, 4], scale) that ns-process-data applied to the original coordinates to write ``transforms``
    (``applied_transform`` / ``applied_scale``; COLMAP folders without the field get nerfstudio's implicit one)."""
    path = transforms_path(transforms)
    meta = json.loads(path.read_text())
    rows = meta.get("applied_transform")
    if rows is None and (path.parent / "colmap" / "sparse" / "0").exists():
        rows = COLMAP_APPLIED_TRANSFORM
    out = torch.eye(4)
    if rows is not None:
        out[:3] = torch.tensor(rows, dtype=torch.float32)[:3]
    return out, float(meta.get("applied_scale", 1.0))


def run_pose_transform(
    frame: Tuple[Tensor, float], transforms: Optional[Union[str, Path]] = None
) -> Tuple[Tensor, float]:
    """(Float[4, 4] M, s): a camera-to-world pose P of ``transforms`` (saved coordinates) is ``M @ P`` in the frame
    :func:`read_run_frame` describes, its translation then times s (nerfstudio scales poses before it folds
    ``applied_scale`` into the saved scale). Without ``transforms`` no ``applied_transform`` is undone."""
    transform, scale = frame
    applied, applied_scale = applied_transform(transforms) if transforms is not None else (torch.eye(4), 1.0)
    dataparser = torch.eye(4)
    dataparser[:3] = transform
    return dataparser @ torch.linalg.inv(applied), scale / applied_scale


def to_run_frame(cameras: DatasetCameras, frame: Optional[Tuple[Tensor, float]]) -> DatasetCameras:
    """Move ``cameras`` (transforms.json coordinates) into a nerfstudio run's frame (:func:`read_run_frame`); a no-op
    for ``frame=None``. Intrinsics are unchanged."""
    if frame is None:
        return cameras
    to_run, scale = run_pose_transform(frame, cameras.source)
    moved = to_run[None] @ cameras.c2w
    moved[:, :3, 3] *= scale
    return DatasetCameras(
        viewmat_from_c2w(moved), cameras.Ks.clone(), list(cameras.sizes), list(cameras.file_paths), cameras.source
    )
