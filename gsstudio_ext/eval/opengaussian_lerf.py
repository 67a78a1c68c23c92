"""LERF-OVS evaluation, OpenGaussian / AG2aussian protocol ("opengaussian-lerf").

Reproduces AG2aussian's ``scripts/compute_lerf_iou.py`` (OpenGaussian's script plus boundary IoU),
segmentation-methods.md §2.11 and §5.1:

- Ground truth: ``<gt_dir>/<frame>/<query>.jpg`` (LERF, ``label/<scene>/gt``) or ``.png`` (360 scenes,
  ``label_360/<scene>/gt``); a pixel is positive if its grey value is > 10. Queries are the GT file names.
- Prediction: ``<pred_dir>/<frame>_<query>.png``, read as grey ("L"), positive if > 10. A missing file scores
  IoU 0 and boundary IoU 0. When shapes differ both masks are nearest-resized (OpenCV rule) to (min H, min W).
- Per scene, over all (frame, query) pairs: mIoU, Acc@0.25 (fraction with IoU > 0.25, OpenGaussian's "mAcc"),
  Acc@0.5 (IoU > 0.5) and mean boundary IoU (dilation ratio 0.02). Multi-scene numbers are per-scene means.
- Evaluated frames: the official per-scene lists for the four LERF scenes (:data:`LERF_EVAL_FRAMES`). Both the
  GT and the prediction folders are parameters (the official script hard-codes them to the 360 folders).

Choices where the script is silent or fragile (documented deviations):
- GT images are converted to grey ("L") before thresholding, as predictions are; identical for the grey LERF
  labels, and it makes RGB/RGBA label files usable.
- A frame folder holding both ``q.jpg`` and ``q.png`` is an error; by default both suffixes are accepted.
- Scenes not in :data:`LERF_EVAL_FRAMES` use every frame folder of the GT directory unless ``frames`` is given.
- Empty unions give IoU 0 (as the script) and boundary IoU 0 (the script gives NaN); see ``core.metrics``.
- Prediction files matching no GT pair are ignored, as in the script, but counted in ``info``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch import Tensor

from gsstudio_ext.core.atomic import atomic_write
from gsstudio_ext.core.metrics import align_shapes, as_bool_mask, boundary_iou, mask_iou
from gsstudio_ext.eval.report import ProtocolResult, SceneResult

PROTOCOL = "opengaussian-lerf"
METRICS = ("miou", "acc_25", "acc_50", "mbiou")
GREY_THRESHOLD = 10
GT_SUFFIXES = (".jpg", ".png")

LERF_EVAL_FRAMES: Dict[str, Tuple[str, ...]] = {
    "waldo_kitchen": tuple(f"frame_{i:05d}" for i in (53, 66, 89, 140, 154)),
    "ramen": tuple(f"frame_{i:05d}" for i in (6, 24, 60, 65, 81, 119, 128)),
    "figurines": tuple(f"frame_{i:05d}" for i in (41, 105, 152, 195)),
    "teatime": tuple(f"frame_{i:05d}" for i in (2, 25, 43, 107, 129, 140)),
}
"""Evaluated frames of the LERF-OVS scenes (training views), as in the official scripts."""

MaskLike = Union[np.ndarray, Tensor]
PathLike = Union[str, Path]


@dataclass
class PairScore:
    """Score of one (frame, query) pair."""

    frame: str
    """Frame name (image stem), e.g. "frame_00053"."""
    query: str
    """Query text (the GT file stem)."""
    iou: float
    """Mask IoU."""
    boundary_iou: float
    """Boundary IoU (dilation ratio of the run)."""
    missing: bool = False
    """True when there was no prediction (scores 0)."""


def binarize_grey(image: MaskLike, threshold: int = GREY_THRESHOLD) -> np.ndarray:
    """Bool[H, W] from a grey image: positive where the value is > ``threshold`` (10 in the protocol)."""
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"expected a grey image [H, W], got shape {arr.shape}")
    return arr > threshold


def read_mask_image(path: PathLike, threshold: int = GREY_THRESHOLD) -> np.ndarray:
    """Read a mask image file as grey ("L") and threshold it: Bool[H, W]."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read mask image {path}: {err}") from err
    return binarize_grey(grey, threshold)


def _save_mask_image(path: Path, mask: MaskLike) -> Path:
    image = Image.fromarray(as_bool_mask(mask).astype(np.uint8) * 255)
    image_format = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    return atomic_write(path, lambda h: image.save(h, format=image_format, quality=95))


def prediction_path(pred_dir: PathLike, frame: str, query: str) -> Path:
    """Official prediction file name: ``<pred_dir>/<frame>_<query>.png``."""
    return Path(pred_dir) / f"{frame}_{query}.png"


def write_prediction(pred_dir: PathLike, frame: str, query: str, mask: MaskLike) -> Path:
    """Write a predicted Bool[H, W] mask as the official 0/255 PNG (atomic); returns its path."""
    return _save_mask_image(prediction_path(pred_dir, frame, query), mask)


def write_gt_mask(gt_dir: PathLike, frame: str, query: str, mask: MaskLike, suffix: str = ".png") -> Path:
    """Write a GT Bool[H, W] mask as ``<gt_dir>/<frame>/<query><suffix>`` (0/255 grey; .jpg or .png)."""
    if suffix not in GT_SUFFIXES:
        raise ValueError(f"GT suffix must be one of {GT_SUFFIXES}, got {suffix!r}")
    return _save_mask_image(Path(gt_dir) / frame / f"{query}{suffix}", mask)


def score_pair(pred: MaskLike, gt: MaskLike, dilation_ratio: float = 0.02) -> Tuple[float, float]:
    """(IoU, boundary IoU) of a Bool[H, W] prediction against a Bool[H', W'] GT, aligning shapes first."""
    p, g = align_shapes(as_bool_mask(pred), as_bool_mask(gt))
    return mask_iou(p, g), boundary_iou(p, g, dilation_ratio)


def scene_metrics(pairs: Sequence[PairScore]) -> Dict[str, float]:
    """mIoU, Acc@0.25, Acc@0.5 and mean boundary IoU over the pooled pairs of one scene."""
    if not pairs:
        raise ValueError("no (frame, query) pairs to score")
    iou = np.array([p.iou for p in pairs], dtype=np.float64)
    biou = np.array([p.boundary_iou for p in pairs], dtype=np.float64)
    return {
        "miou": float(iou.mean()),
        "acc_25": float((iou > 0.25).mean()),
        "acc_50": float((iou > 0.5).mean()),
        "mbiou": float(biou.mean()),
    }


def _result(scene: str, pairs: Sequence[PairScore], dilation_ratio: float, info: Dict) -> ProtocolResult:
    info = {"num_pairs": len(pairs), "num_missing": sum(p.missing for p in pairs), **info}
    rows = [asdict(p) for p in pairs]
    settings = {"dilation_ratio": dilation_ratio, "grey_threshold": GREY_THRESHOLD, "acc_thresholds": [0.25, 0.5]}
    return ProtocolResult(PROTOCOL, METRICS, [SceneResult(scene, scene_metrics(pairs), rows, info)], settings)


def evaluate_masks(
    gt: Mapping[Tuple[str, str], MaskLike],
    pred: Mapping[Tuple[str, str], Optional[MaskLike]],
    scene: str = "scene",
    dilation_ratio: float = 0.02,
) -> ProtocolResult:
    """Score in-memory masks.

    Args:
        gt: (frame, query) -> Bool[H, W] GT mask; its keys are the evaluated pairs.
        pred: (frame, query) -> Bool[H', W'] predicted mask; a missing key (or None) scores 0.
        scene: scene name in the result.
        dilation_ratio: boundary IoU band width (fraction of the image diagonal).

    Returns:
        A single-scene :class:`ProtocolResult` with protocol "opengaussian-lerf".
    """
    if not gt:
        raise ValueError("no GT (frame, query) pairs given")
    pairs = []
    for key in gt:
        frame, query = _split_key(key)
        p = pred.get(key)
        if p is None:
            pairs.append(PairScore(frame, query, 0.0, 0.0, missing=True))
        else:
            pairs.append(PairScore(frame, query, *score_pair(p, gt[key], dilation_ratio)))
    unmatched = sorted(f"{k[0]}_{k[1]}" for k in pred if k not in gt)
    return _result(scene, pairs, dilation_ratio, {"unmatched_predictions": unmatched})


def _split_key(key: Hashable) -> Tuple[str, str]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"mask keys must be (frame, query) tuples, got {key!r}")
    return str(key[0]), str(key[1])


def _infer_scene(gt_dir: Path) -> str:
    return gt_dir.parent.name if gt_dir.name == "gt" else gt_dir.name


def list_gt_queries(
    gt_dir: PathLike,
    frames: Optional[Sequence[str]] = None,
    scene: Optional[str] = None,
    suffixes: Sequence[str] = GT_SUFFIXES,
) -> Dict[Tuple[str, str], Path]:
    """(frame, query) -> GT file under ``<gt_dir>/<frame>/``.

    ``frames`` defaults to the official list of ``scene`` (inferred from ``label/<scene>/gt``) when known, else to
    every sub-folder of ``gt_dir``.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"GT folder not found: {gt_dir} (expected label/<scene>/gt/<frame>/<query>.jpg)")
    if frames is None:
        frames = LERF_EVAL_FRAMES.get(scene or _infer_scene(gt_dir))
    if frames is None:
        frames = sorted(p.name for p in gt_dir.iterdir() if p.is_dir())
    out: Dict[Tuple[str, str], Path] = {}
    for frame in frames:
        folder = gt_dir / frame
        if not folder.is_dir():
            raise FileNotFoundError(f"GT frame folder not found: {folder}")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in suffixes or path.name.startswith("."):
                continue
            key = (frame, path.stem)
            if key in out:
                raise ValueError(f"query {path.stem!r} of {frame} has several GT files: {out[key].name}, {path.name}")
            out[key] = path
    if not out:
        raise ValueError(f"no GT masks ({', '.join(suffixes)}) found for frames {list(frames)} in {gt_dir}")
    return out


def evaluate_folders(
    gt_dir: PathLike,
    pred_dir: PathLike,
    scene: Optional[str] = None,
    frames: Optional[Sequence[str]] = None,
    suffixes: Sequence[str] = GT_SUFFIXES,
    dilation_ratio: float = 0.02,
) -> ProtocolResult:
    """Score official-layout files: GT ``<gt_dir>/<frame>/<query>.jpg|png``, predictions
    ``<pred_dir>/<frame>_<query>.png``.

    Args:
        gt_dir: the scene's GT folder (``label/<scene>/gt`` or ``label_360/<scene>/gt``).
        pred_dir: folder of predicted masks (AG2aussian writes ``.../text2obj/ours_<iter>``).
        scene: scene name (default: inferred from ``gt_dir``); selects the official frame list.
        frames: evaluated frames (default: official list of the scene, else all frame folders).
        suffixes: GT file suffixes accepted.
        dilation_ratio: boundary IoU band width.

    Returns:
        A single-scene :class:`ProtocolResult` with protocol "opengaussian-lerf".
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    scene = scene or _infer_scene(gt_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir} (expected <frame>_<query>.png files)")
    gt_files = list_gt_queries(gt_dir, frames, scene, suffixes)
    pairs = []
    for (frame, query), gt_path in gt_files.items():
        pred_path = prediction_path(pred_dir, frame, query)
        if not pred_path.is_file():
            pairs.append(PairScore(frame, query, 0.0, 0.0, missing=True))
            continue
        iou, biou = score_pair(read_mask_image(pred_path), read_mask_image(gt_path), dilation_ratio)
        pairs.append(PairScore(frame, query, iou, biou))
    expected = {prediction_path(pred_dir, f, q).name for f, q in gt_files}
    unmatched = sorted(p.name for p in pred_dir.glob("*.png") if p.name not in expected)
    info = {"gt_dir": str(gt_dir), "pred_dir": str(pred_dir), "unmatched_predictions": unmatched}
    return _result(scene, pairs, dilation_ratio, info)
