"""LERF-OVS evaluation, LangSplat protocol ("langsplat-lerf"): 2-D relevancy-map mIoU and localisation accuracy.

Reproduces LangSplat's ``eval/evaluate_iou_loc.py`` (segmentation-methods.md §5.2) on relevancy maps
Float[L, H, W] (L feature levels, LangSplat has 3; one level is fine):

- Relevancy (see :func:`relevancy_from_features`): for each canonical negative {object, things, stuff, texture},
  the positive probability of softmax(10 * [pos_sim, neg_sim]); the minimum over the negatives.
- Mask IoU: per level, smooth S = 0.5 * (box30(R) + R); min-max normalise S to [-1, 1]
  (``(S - min) / (max(S - min) + 1e-9) * 2 - 1``), clip to [0, 1], threshold at > 0.4, then LangSplat's 7x7
  majority filter (:func:`majority_smooth`). The level with the highest max(S) is chosen; its IoU counts.
- Localisation: per level, F = box30(R); its maximum pixels are the peaks; the level with the highest max(F) is
  chosen (first on ties); a hit if any peak (x, y) lies inside any GT box of the label (inclusive bounds).
- mIoU = mean chosen IoU over (frame, label) pairs; localisation accuracy = hits / pairs. Multi-scene numbers
  are per-scene means.
- ``box30`` is ``cv2.filter2D`` with a normalised 30x30 kernel: anchor at (15, 15), BORDER_REFLECT_101.

Choices where LangSplat is silent (documented):
- Pairs without a relevancy map score IoU 0 and a miss (LangSplat always has them).
- A GT given as a mask only gets one box: the mask's bounding box (LangSplat's LERF labels carry per-object boxes).
- IoU with an empty union is 0 (LangSplat divides 0 by 0); relevancy and GT must have the same H, W (no resize).
- Maths in float64 (LangSplat: float32); the box filter sums each window separately, so equal windows tie exactly.
- Polygons of the LERF-OVS JSON labels are filled with ``cv2.fillPoly`` when OpenCV is importable (LangSplat's own
  rule), else with PIL; the result's settings name the rasteriser.
- Relevancy files (our layout, LangSplat saves none): ``<dir>/<frame>/<label>.npy`` holding Float[L, H, W] or
  Float[H, W]. Decoding LangSplat's own compressed feature renders needs its autoencoder and CLIP: not included.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw
from torch import Tensor

from gsstudio_ext.core.atomic import atomic_write
from gsstudio_ext.core.metrics import as_bool_mask, mask_iou
from gsstudio_ext.eval.opengaussian_lerf import list_gt_queries, read_mask_image
from gsstudio_ext.eval.report import ProtocolResult, SceneResult

PROTOCOL = "langsplat-lerf"
METRICS = ("miou", "localization_accuracy")
CANONICAL_NEGATIVES = ("object", "things", "stuff", "texture")
MASK_THRESH = 0.4
FILTER_SIZE = 30
SMOOTH_RADIUS = 3

ArrayLike = Union[np.ndarray, Tensor]
PathLike = Union[str, Path]


@dataclass
class LerfTarget:
    """Ground truth of one label in one frame."""

    mask: np.ndarray
    """Bool[H, W] union of the label's objects."""
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    """Float[K, 4] boxes (x1, y1, x2, y2) in pixels, one per object."""


@dataclass
class QueryScore:
    """Score of one (frame, label) pair."""

    frame: str
    """Frame name (image stem)."""
    label: str
    """Query text."""
    iou: float
    """IoU of the chosen level's mask."""
    localized: bool
    """Whether a localisation peak fell inside a GT box."""
    level: int = -1
    """Level chosen for the mask (highest max of the smoothed relevancy)."""
    level_ious: List[float] = field(default_factory=list)
    """IoU of every level."""
    loc_level: int = -1
    """Level chosen for localisation (highest max of the box-filtered relevancy)."""
    peak_xy: List[int] = field(default_factory=list)
    """First peak pixel (x, y) of the localisation level."""
    num_peaks: int = 0
    """Number of pixels tied at the maximum."""
    missing: bool = False
    """True when no relevancy map was given (scores 0, miss)."""


def relevancy_from_features(
    features: ArrayLike, positives: ArrayLike, negatives: ArrayLike, temperature: float = 10.0
) -> Tensor:
    """LangSplat/LERF relevancy: min over negatives of the pairwise-softmax positive probability.

    Args:
        features: Float[..., D] rendered language features (LangSplat's decoder outputs unit vectors).
        positives: Float[P, D] unit text embeddings of the queries.
        negatives: Float[N, D] unit text embeddings of the canonical negatives.
        temperature: softmax temperature (10).

    Returns:
        Float[P, ...] relevancy in [0, 1].
    """
    f = torch.as_tensor(features).float()
    pos = torch.as_tensor(positives, device=f.device).float()
    neg = torch.as_tensor(negatives, device=f.device).float()
    sp, sn = f @ pos.T, f @ neg.T
    # softmax over the pair (pos, neg), positive entry == sigmoid(T * (pos - neg)).
    prob = torch.sigmoid(temperature * (sp[..., :, None] - sn[..., None, :]))
    return prob.amin(dim=-1).movedim(-1, 0)


def _as_levels(relevancy: ArrayLike) -> np.ndarray:
    arr = relevancy.detach().cpu().numpy() if isinstance(relevancy, Tensor) else np.asarray(relevancy)
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"relevancy must have shape [L, H, W] or [H, W], got {tuple(arr.shape)}")
    return arr


def box_filter(x: ArrayLike, size: int = FILTER_SIZE) -> np.ndarray:
    """``cv2.filter2D(x, -1, ones((size, size)) / size**2)`` over the last two axes: Float64[..., H, W]."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    arr = arr.astype(np.float64)
    before = size // 2
    pad = [(0, 0)] * (arr.ndim - 2) + [(before, size - 1 - before)] * 2
    padded = np.pad(arr, pad, mode="reflect")  # numpy "reflect" == OpenCV BORDER_REFLECT_101
    rows = sliding_window_view(padded, size, axis=-2).sum(-1)
    return sliding_window_view(rows, size, axis=-1).sum(-1) / float(size * size)


def majority_smooth(mask: ArrayLike, radius: int = SMOOTH_RADIUS) -> np.ndarray:
    """LangSplat's ``smooth``: each pixel becomes the majority value (ties -> 0) of its window.

    The window of pixel (i, j) is rows ``max(0, i-r) .. min(i+r+1, H-1)`` (end exclusive) and likewise for
    columns, so the last row and column never vote, exactly as in LangSplat. Bool[H, W] -> Bool[H, W].
    """
    m = as_bool_mask(mask).astype(np.int64)
    h, w = m.shape
    ii = np.zeros((h + 1, w + 1), dtype=np.int64)
    ii[1:, 1:] = m.cumsum(0).cumsum(1)
    i, j = np.arange(h), np.arange(w)
    r0, r1 = np.maximum(0, i - radius), np.minimum(i + radius + 1, h - 1)
    c0, c1 = np.maximum(0, j - radius), np.minimum(j + radius + 1, w - 1)
    ones = ii[r1][:, c1] - ii[r0][:, c1] - ii[r1][:, c0] + ii[r0][:, c0]
    total = np.maximum(r1 - r0, 0)[:, None] * np.maximum(c1 - c0, 0)[None, :]
    return 2 * ones > total


def relevancy_masks(
    relevancy: ArrayLike, thresh: float = MASK_THRESH, filter_size: int = FILTER_SIZE
) -> Tuple[np.ndarray, int]:
    """Per-level predicted masks and the chosen level.

    Args:
        relevancy: Float[L, H, W] (or [H, W]) raw relevancy.

    Returns:
        (Bool[L, H, W] masks, index of the level with the highest max of the smoothed relevancy).
    """
    raw = _as_levels(relevancy)
    smoothed = 0.5 * (box_filter(raw, filter_size) + raw)
    masks = np.zeros(raw.shape, dtype=bool)
    for k, s in enumerate(smoothed):
        out = s - s.min()
        out = out / (out.max() + 1e-9) * 2.0 - 1.0
        masks[k] = majority_smooth(np.clip(out, 0.0, 1.0) > thresh)
    return masks, int(np.argmax(smoothed.reshape(len(raw), -1).max(1)))


def localization_peaks(relevancy: ArrayLike, filter_size: int = FILTER_SIZE) -> Tuple[int, np.ndarray]:
    """(chosen level, Int[K, 2] peak pixels (x, y)) of the box-filtered relevancy Float[L, H, W]."""
    filtered = box_filter(_as_levels(relevancy), filter_size)
    scores = filtered.reshape(len(filtered), -1).max(1)
    level = int(np.argmax(scores))
    ys, xs = np.nonzero(filtered[level] == scores[level])
    return level, np.stack([xs, ys], axis=1)


def peaks_in_boxes(peaks_xy: np.ndarray, boxes: ArrayLike) -> bool:
    """True if any peak (x, y) lies in any box (x1, y1, x2, y2), corners in either order, bounds inclusive."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) == 0 or len(peaks_xy) == 0:
        return False
    x0, x1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y0, y1 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    x, y = peaks_xy[:, :1].astype(np.float64), peaks_xy[:, 1:2].astype(np.float64)
    return bool(((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).any())


def mask_to_box(mask: ArrayLike) -> np.ndarray:
    """Float[1, 4] bounding box (x1, y1, x2, y2) of a Bool[H, W] mask, inclusive pixels; [0, 4] when empty."""
    ys, xs = np.nonzero(as_bool_mask(mask))
    if len(xs) == 0:
        return np.zeros((0, 4))
    return np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=np.float64)


def as_target(gt: Union[LerfTarget, ArrayLike]) -> LerfTarget:
    """A :class:`LerfTarget` from a target or a bare Bool[H, W] mask (boxes: the mask's bounding box)."""
    if isinstance(gt, LerfTarget):
        boxes = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)
        return LerfTarget(as_bool_mask(gt.mask), boxes if len(boxes) else mask_to_box(gt.mask))
    mask = as_bool_mask(gt)
    return LerfTarget(mask, mask_to_box(mask))


def score_query(
    relevancy: ArrayLike,
    target: Union[LerfTarget, ArrayLike],
    frame: str = "",
    label: str = "",
    thresh: float = MASK_THRESH,
    filter_size: int = FILTER_SIZE,
) -> QueryScore:
    """Score one relevancy map Float[L, H, W] against its GT (mask IoU of the chosen level and localisation)."""
    t = as_target(target)
    raw = _as_levels(relevancy)
    if raw.shape[1:] != t.mask.shape:
        raise ValueError(
            f"relevancy of {frame}/{label} is {raw.shape[1:]} but its GT mask is {t.mask.shape}; "
            "render relevancy at the GT resolution"
        )
    masks, level = relevancy_masks(raw, thresh, filter_size)
    level_ious = [mask_iou(m, t.mask) for m in masks]
    loc_level, peaks = localization_peaks(raw, filter_size)
    return QueryScore(
        frame=frame,
        label=label,
        iou=level_ious[level],
        localized=peaks_in_boxes(peaks, t.boxes),
        level=level,
        level_ious=level_ious,
        loc_level=loc_level,
        peak_xy=[int(v) for v in peaks[0]],
        num_peaks=int(len(peaks)),
    )


def _settings(thresh: float, filter_size: int) -> Dict[str, object]:
    return {
        "mask_thresh": thresh,
        "filter_size": filter_size,
        "smooth_radius": SMOOTH_RADIUS,
        "negatives": list(CANONICAL_NEGATIVES),
        "polygon_rasterizer": _polygon_backend(),
    }


def evaluate_relevancy(
    targets: Mapping[Tuple[str, str], Union[LerfTarget, ArrayLike]],
    relevancy: Mapping[Tuple[str, str], Optional[ArrayLike]],
    scene: str = "scene",
    thresh: float = MASK_THRESH,
    filter_size: int = FILTER_SIZE,
) -> ProtocolResult:
    """Score in-memory relevancy maps.

    Args:
        targets: (frame, label) -> :class:`LerfTarget` or Bool[H, W] mask; its keys are the evaluated pairs.
        relevancy: (frame, label) -> Float[L, H, W] or Float[H, W]; missing (or None) scores 0 and a miss.
        scene: scene name in the result.
        thresh: mask threshold after normalisation (0.4).
        filter_size: box filter size (30).

    Returns:
        A single-scene :class:`ProtocolResult` with protocol "langsplat-lerf".
    """
    if not targets:
        raise ValueError("no GT (frame, label) pairs given")
    scores = []
    for key, target in targets.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"keys must be (frame, label) tuples, got {key!r}")
        frame, label = str(key[0]), str(key[1])
        rel = relevancy.get(key)
        if rel is None:
            scores.append(QueryScore(frame, label, 0.0, False, missing=True))
        else:
            scores.append(score_query(rel, target, frame, label, thresh, filter_size))
    metrics = {
        "miou": float(np.mean([s.iou for s in scores])),
        "localization_accuracy": float(np.mean([s.localized for s in scores])),
    }
    info = {
        "num_pairs": len(scores),
        "num_missing": sum(s.missing for s in scores),
        "unmatched_relevancy": sorted(f"{k[0]}/{k[1]}" for k in relevancy if k not in targets),
    }
    scene_result = SceneResult(scene, metrics, [asdict(s) for s in scores], info)
    return ProtocolResult(PROTOCOL, METRICS, [scene_result], _settings(thresh, filter_size))


def _polygon_backend() -> str:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return "pil"
    return "cv2"


def polygon_to_mask(shape: Tuple[int, int], points: Sequence[Sequence[float]]) -> np.ndarray:
    """Bool[H, W] filled polygon; vertices (x, y) are truncated to int32 as LangSplat does."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2).astype(np.int32)
    if _polygon_backend() == "cv2":
        import cv2

        mask = np.zeros(shape, dtype=np.uint8)
        cv2.fillPoly(mask, [pts], 1)
        return mask.astype(bool)
    image = Image.new("L", (shape[1], shape[0]), 0)
    if len(pts) >= 2:
        ImageDraw.Draw(image).polygon([tuple(map(int, p)) for p in pts], fill=1, outline=1)
    return np.asarray(image).astype(bool)


def load_lerf_ovs_annotations(
    json_folder: PathLike, pattern: str = "frame_*.json"
) -> Dict[Tuple[str, str], LerfTarget]:
    """Read LERF-OVS labels (LangSplat's ``label/<scene>/frame_XXXXX.json``, labelme-style).

    Each JSON has ``info`` {height, width, name} and ``objects`` [{category, bbox (x1y1x2y2), segmentation
    (polygon)}]. Objects of the same category are merged (mask union, boxes stacked). Keys are
    (image stem of ``info.name``, category); LangSplat's render index of frame ``frame_00053`` is 52.
    """
    folder = Path(json_folder)
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no LERF-OVS label files matching {pattern!r} in {folder}")
    out: Dict[Tuple[str, str], LerfTarget] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
            h, w = int(data["info"]["height"]), int(data["info"]["width"])
            frame = Path(data["info"]["name"]).stem
            objects = data["objects"]
            for obj in objects:
                key = (frame, str(obj["category"]))
                mask = polygon_to_mask((h, w), obj["segmentation"])
                box = np.asarray(obj["bbox"], dtype=np.float64).reshape(1, 4)
                if key in out:
                    prev = out[key]
                    out[key] = LerfTarget(prev.mask | mask, np.concatenate([prev.boxes, box]))
                else:
                    out[key] = LerfTarget(mask, box)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed LERF-OVS label file {path}: {err!r}") from err
    return out


def targets_from_mask_folder(
    gt_dir: PathLike, frames: Optional[Sequence[str]] = None
) -> Dict[Tuple[str, str], LerfTarget]:
    """GT from mask images in the ``<gt_dir>/<frame>/<label>.jpg|png`` layout (boxes: mask bounding boxes)."""
    files = list_gt_queries(gt_dir, frames=frames if frames is not None else _all_frames(gt_dir))
    return {key: as_target(read_mask_image(path)) for key, path in files.items()}


def _all_frames(gt_dir: PathLike) -> List[str]:
    root = Path(gt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"GT folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def relevancy_path(relevancy_dir: PathLike, frame: str, label: str) -> Path:
    """Our relevancy file layout: ``<relevancy_dir>/<frame>/<label>.npy``."""
    return Path(relevancy_dir) / frame / f"{label}.npy"


def write_relevancy(relevancy_dir: PathLike, frame: str, label: str, relevancy: ArrayLike) -> Path:
    """Save Float[L, H, W] (or [H, W]) relevancy as float32 .npy (atomic); returns the path."""
    arr = relevancy.detach().cpu().numpy() if isinstance(relevancy, Tensor) else np.asarray(relevancy)
    return atomic_write(relevancy_path(relevancy_dir, frame, label), lambda h: np.save(h, arr.astype(np.float32)))


def evaluate_folders(
    json_folder: Optional[PathLike],
    relevancy_dir: PathLike,
    scene: Optional[str] = None,
    gt_mask_dir: Optional[PathLike] = None,
    thresh: float = MASK_THRESH,
    filter_size: int = FILTER_SIZE,
) -> ProtocolResult:
    """Score relevancy files against LERF-OVS JSON labels (``label/<scene>``) or a GT mask folder.

    Args:
        json_folder: folder of ``frame_*.json`` labels (boxes + polygons); None to use ``gt_mask_dir``.
        relevancy_dir: ``<frame>/<label>.npy`` relevancy maps.
        scene: scene name (default: the label folder's name).
        gt_mask_dir: alternative GT, ``<frame>/<label>.jpg|png`` masks (boxes from mask bounding boxes).
    """
    if (json_folder is None) == (gt_mask_dir is None):
        raise ValueError("give exactly one of json_folder (LERF-OVS JSON labels) and gt_mask_dir (mask images)")
    if json_folder is not None:
        targets = load_lerf_ovs_annotations(json_folder)
        scene = scene or Path(json_folder).name
    else:
        targets = targets_from_mask_folder(gt_mask_dir)
        gt = Path(gt_mask_dir)
        scene = scene or (gt.parent.name if gt.name == "gt" else gt.name)
    rel_dir = Path(relevancy_dir)
    if not rel_dir.is_dir():
        raise FileNotFoundError(f"relevancy folder not found: {rel_dir} (expected <frame>/<label>.npy)")
    relevancy = {}
    for frame, label in targets:
        path = relevancy_path(rel_dir, frame, label)
        if path.is_file():
            relevancy[(frame, label)] = np.load(path)
    return evaluate_relevancy(targets, relevancy, scene, thresh, filter_size)
