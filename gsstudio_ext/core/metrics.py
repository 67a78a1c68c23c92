"""Binary-mask metrics shared by the evaluation protocols: IoU, boundary IoU and nearest-neighbour resizing.

All functions take numpy arrays or torch tensors (any device) and return python floats or arrays of the input's
kind. They need neither OpenCV nor a model.

Conventions (those of the OpenGaussian / AG2aussian ``compute_lerf_iou.py`` script, segmentation-methods.md §2.11):
- :func:`mask_iou` is 0.0 when the union is empty (both masks empty).
- :func:`boundary_iou` follows Cheng et al.'s boundary-IoU reference (the gist Gaussian Grouping and AG2aussian
  copy): the boundary of a mask is the mask minus its erosion by a 3x3 square repeated
  ``d = max(1, round(ratio * image_diagonal))`` times, where pixels outside the image count as background (so an
  object cut by the image border has a boundary there). That erosion equals one erosion by a (2d+1)x(2d+1) square
  with zero padding, which is what we compute (with an integral image, O(H*W) for any d).
  Deviation: when both boundaries are empty the reference divides 0 by 0 (NaN, which poisons a scene mean); we
  return 0.0, matching :func:`mask_iou`. ``round`` is Python's (half to even), as in the reference.
- :func:`resize_nearest` reproduces ``cv2.resize(..., interpolation=cv2.INTER_NEAREST)``: output pixel i reads
  source pixel ``min(floor(i * (src / dst)), src - 1)``, with the scale computed in float64 as OpenCV does.
"""

from __future__ import annotations

from typing import Tuple, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[np.ndarray, Tensor]
A = TypeVar("A", np.ndarray, Tensor)


def as_bool_mask(mask: ArrayLike) -> np.ndarray:
    """Bool[H, W] numpy copy of a mask: bool as is; any other dtype is positive where the value is > 0.5.

    Raw grey images (uint8 0..255, possibly JPEG-noisy) should be thresholded by the caller (the LERF protocols use
    grey > 10, see :func:`gsstudio_ext.eval.opengaussian_lerf.binarize_grey`).
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must have shape [H, W], got {arr.shape}")
    return arr.astype(bool) if arr.dtype == bool else arr > 0.5


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction {pred.shape} and ground truth {gt.shape} differ in shape; align them first "
            "(e.g. with align_shapes)"
        )


def mask_iou(pred: ArrayLike, gt: ArrayLike) -> float:
    """Intersection over union of two binary masks.

    Args:
        pred: Bool[H, W] predicted mask (non-bool: positive where > 0.5).
        gt: Bool[H, W] ground-truth mask, same shape.

    Returns:
        |pred AND gt| / |pred OR gt|, or 0.0 when both are empty.
    """
    p, g = as_bool_mask(pred), as_bool_mask(gt)
    _check_same_shape(p, g)
    union = int(np.logical_or(p, g).sum())
    return float(np.logical_and(p, g).sum()) / union if union else 0.0


def boundary_width(shape: Tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """Erosion depth d in pixels for an image of ``shape`` (H, W): max(1, round(ratio * diagonal))."""
    h, w = shape
    return max(1, int(round(dilation_ratio * float(np.sqrt(h * h + w * w)))))


def _box_sum(x: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the (2r+1)x(2r+1) window centred on each pixel, zero outside the image (integral image)."""
    h, w = x.shape
    k = 2 * radius + 1
    ii = np.zeros((h + k, w + k), dtype=np.int64)
    ii[1:, 1:] = np.pad(x.astype(np.int64), radius).cumsum(0).cumsum(1)
    return ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]


def erode_square(mask: ArrayLike, radius: int) -> np.ndarray:
    """Bool[H, W] erosion by a (2r+1)x(2r+1) square; pixels outside the image count as background."""
    m = as_bool_mask(mask)
    if radius <= 0:
        return m.copy()
    return _box_sum(m, radius) == (2 * radius + 1) ** 2


def mask_boundary(mask: ArrayLike, dilation_ratio: float = 0.02) -> np.ndarray:
    """Bool[H, W] inner boundary band: the mask minus its erosion by ``boundary_width`` pixels."""
    m = as_bool_mask(mask)
    return m & ~erode_square(m, boundary_width(m.shape, dilation_ratio))


def boundary_iou(pred: ArrayLike, gt: ArrayLike, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al. 2021) of two binary masks of the same shape.

    Args:
        pred: Bool[H, W] predicted mask.
        gt: Bool[H, W] ground-truth mask.
        dilation_ratio: boundary band width as a fraction of the image diagonal (0.02 in all LERF scripts).

    Returns:
        IoU of the two boundary bands; 0.0 when both bands are empty (the reference gives NaN there).
    """
    p, g = as_bool_mask(pred), as_bool_mask(gt)
    _check_same_shape(p, g)
    return mask_iou(mask_boundary(p, dilation_ratio), mask_boundary(g, dilation_ratio))


def _nearest_index(src: int, dst: int) -> np.ndarray:
    inv_scale = float(dst) / float(src)  # OpenCV: inv_scale_x = dsize.width / ssize.width
    scale = 1.0 / inv_scale
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * scale).astype(np.int64), src - 1)


def resize_nearest(mask: A, size: Tuple[int, int]) -> A:
    """Nearest-neighbour resize of an image or mask, bit-compatible with ``cv2.INTER_NEAREST``.

    Args:
        mask: [H, W, ...] numpy array or torch tensor (trailing channel dims are kept).
        size: target (height, width).

    Returns:
        [height, width, ...] array of the same kind, dtype and device.
    """
    h, w = int(mask.shape[0]), int(mask.shape[1])
    th, tw = int(size[0]), int(size[1])
    if th <= 0 or tw <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    if (h, w) == (th, tw):
        return mask
    rows, cols = _nearest_index(h, th), _nearest_index(w, tw)
    if isinstance(mask, Tensor):
        r = torch.as_tensor(rows, device=mask.device)
        c = torch.as_tensor(cols, device=mask.device)
        return mask.index_select(0, r).index_select(1, c)
    return mask[rows][:, cols]


def align_shapes(a: A, b: A) -> Tuple[A, A]:
    """Nearest-resize both masks to (min height, min width) when their shapes differ (the LERF protocols' rule)."""
    if tuple(a.shape[:2]) == tuple(b.shape[:2]):
        return a, b
    size = (min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1]))
    return resize_nearest(a, size), resize_nearest(b, size)
