"""core.metrics: IoU, boundary IoU (Cheng et al.) and OpenCV-compatible nearest resizing on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsstudio_ext.core.metrics import (
    align_shapes,
    boundary_iou,
    boundary_width,
    erode_square,
    mask_boundary,
    mask_iou,
    resize_nearest,
)


def square(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_mask_iou_known_values() -> None:
    a = square(8, 8, 0, 4, 0, 4)
    b = square(8, 8, 2, 6, 2, 6)
    assert mask_iou(a, b) == pytest.approx(4 / 28)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros_like(a), a) == 0.0
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)) == 0.0  # empty union -> 0, as the reference script
    # torch tensors and 0/1 / 0/255 numbers are accepted
    assert mask_iou(torch.from_numpy(a), torch.from_numpy(b).float()) == pytest.approx(4 / 28)
    assert mask_iou(a.astype(np.uint8) * 255, b.astype(np.uint8)) == pytest.approx(4 / 28)


def test_mask_iou_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        mask_iou(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_iou(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


def test_boundary_width() -> None:
    assert boundary_width((100, 100)) == 3  # round(0.02 * 141.4)
    assert boundary_width((10, 10)) == 1  # never below one pixel
    assert boundary_width((480, 640), 0.02) == 16


def test_boundary_band_and_image_border() -> None:
    gt = square(100, 100, 10, 40, 10, 40)
    assert mask_boundary(gt).sum() == 30 * 30 - 24 * 24  # 3-pixel inner ring
    full = np.ones((10, 10), dtype=bool)
    assert mask_boundary(full).sum() == 100 - 64  # the image border counts as background
    assert erode_square(full, 0).all()


def test_boundary_iou_known_values() -> None:
    gt = square(100, 100, 10, 40, 10, 40)
    assert boundary_iou(gt, gt) == 1.0
    # A prediction inside gt's interior: overlapping masks, disjoint boundaries.
    inner = square(100, 100, 20, 30, 20, 30)
    assert mask_iou(inner, gt) == pytest.approx(100 / 900)
    assert boundary_iou(inner, gt) == 0.0
    # Wider box sharing the top, bottom and left bands: 252 / 576 (counted by hand).
    wide = square(100, 100, 10, 40, 10, 70)
    assert boundary_iou(wide, gt) == pytest.approx(252 / 576)
    assert boundary_iou(np.zeros_like(gt), gt) == 0.0
    assert boundary_iou(np.zeros_like(gt), np.zeros_like(gt)) == 0.0


def test_boundary_matches_opencv_reference() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for _ in range(6):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        m = cv2.dilate((rng.random((h, w)) > 0.9).astype(np.uint8), np.ones((5, 5), np.uint8))
        d = boundary_width((h, w))
        padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
        np.testing.assert_array_equal(mask_boundary(m.astype(bool)), (m - eroded).astype(bool))


def test_resize_nearest_known_indices() -> None:
    row = np.arange(6)[None].repeat(2, 0)
    np.testing.assert_array_equal(resize_nearest(row, (2, 3)), [[0, 2, 4], [0, 2, 4]])
    np.testing.assert_array_equal(resize_nearest(np.array([[1, 2]]), (1, 4)), [[1, 1, 2, 2]])
    t = torch.arange(12).reshape(3, 4)
    out = resize_nearest(t, (6, 2))
    assert isinstance(out, torch.Tensor) and out.shape == (6, 2)
    assert out[:, 0].tolist() == [0, 0, 4, 4, 8, 8]
    rgb = np.zeros((4, 4, 3))
    assert resize_nearest(rgb, (2, 2)).shape == (2, 2, 3)
    with pytest.raises(ValueError):
        resize_nearest(row, (0, 3))


def test_resize_nearest_matches_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w, th, tw = (int(v) for v in rng.integers(1, 90, 4))
        img = rng.integers(0, 255, (h, w), dtype=np.uint8)
        ref = cv2.resize(img, (tw, th), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(resize_nearest(img, (th, tw)), ref)


def test_align_shapes_to_smaller() -> None:
    a, b = align_shapes(np.zeros((4, 6)), np.zeros((6, 4)))
    assert a.shape == b.shape == (4, 4)
    gt = square(32, 32, 8, 24, 8, 24)
    up = np.kron(gt, np.ones((2, 2), dtype=bool))
    p, g = align_shapes(up, gt)
    assert mask_iou(p, g) == 1.0
