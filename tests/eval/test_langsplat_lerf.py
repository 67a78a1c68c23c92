"""LangSplat LERF protocol: relevancy maths, mask IoU on constructed maps, localisation, files and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gsstudio_ext.eval import langsplat_lerf as ls
from gsstudio_ext.eval.opengaussian_lerf import write_gt_mask

H = W = 64


def square(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


GT = square(16, 48, 16, 48)  # 32 x 32


def blob(cy: float, cx: float, peak: float = 0.9, sigma: float = 5.0) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return 0.4 + (peak - 0.4) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def test_relevancy_is_min_pairwise_softmax() -> None:
    torch.manual_seed(0)
    pos = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    feats = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    rel = ls.relevancy_from_features(feats, pos, neg)
    assert rel.shape == (2, 3, 5)
    f = feats[1, 2]
    expected = min(torch.softmax(10 * torch.stack([f @ pos[1], f @ n]), dim=0)[0].item() for n in neg)
    assert rel[1, 1, 2].item() == pytest.approx(expected, abs=1e-6)
    assert ls.relevancy_from_features(pos[:1], pos[:1], pos[:1]).item() == pytest.approx(0.5)


def test_box_filter_is_cv2_filter2d() -> None:
    const = np.full((40, 50), 0.3)
    np.testing.assert_allclose(ls.box_filter(const), 0.3)
    cv2 = pytest.importorskip("cv2")
    x = np.random.default_rng(0).random((2, 45, 70)).astype(np.float32)
    for k in range(2):
        ref = cv2.filter2D(x[k], -1, np.ones((30, 30)) / 900.0)
        np.testing.assert_allclose(ls.box_filter(x)[k], ref, atol=1e-5)


def reference_smooth(mask: np.ndarray) -> np.ndarray:
    """LangSplat's loop, written out: majority of the clipped 7x7 window, ties -> 0."""
    h, w = mask.shape
    out = mask.copy()
    for i in range(h):
        for j in range(w):
            win = mask[max(0, i - 3) : min(i + 4, h - 1), max(0, j - 3) : min(j + 4, w - 1)]
            out[i, j] = np.argmax(np.bincount(win.reshape(-1)))
    return out


def test_majority_smooth_matches_langsplat_loop() -> None:
    rng = np.random.default_rng(2)
    m = (rng.random((23, 31)) > 0.45).astype(np.uint8)
    np.testing.assert_array_equal(ls.majority_smooth(m), reference_smooth(m).astype(bool))
    last_row = np.zeros((10, 10), dtype=bool)
    last_row[-1] = True
    assert not ls.majority_smooth(last_row).any()  # the last row never votes (LangSplat's window bound)
    speck = GT.copy()
    speck[2, 2] = True
    out = ls.majority_smooth(speck)
    assert not out[2, 2] and out[20:44, 20:44].all()


def test_mask_iou_on_step_relevancy() -> None:
    rel = np.where(GT, 0.9, 0.1)
    score = ls.score_query(rel, GT)
    masks, level = ls.relevancy_masks(rel)
    assert level == 0 and not (masks[0] & ~GT).any()  # nothing outside the object
    assert score.iou == pytest.approx(masks[0].sum() / 1024) and score.iou > 0.8  # corners are smoothed away
    assert score.localized
    assert ls.score_query(np.where(GT, 0.1, 0.9), GT).iou < 0.1


def test_mask_pipeline_matches_langsplat_reference() -> None:
    """Restates LangSplat's per-level mask steps with OpenCV and the loop smoother; ours must agree exactly."""
    cv2 = pytest.importorskip("cv2")
    rel = (blob(30.5, 36.0, sigma=9.0) + 0.05 * np.random.default_rng(3).random((H, W))).astype(np.float32)
    smoothed = 0.5 * (cv2.filter2D(rel, -1, np.ones((30, 30)) / 900.0) + rel)
    out = smoothed - smoothed.min()
    out = np.clip(out / (out.max() + 1e-9) * 2.0 - 1.0, 0.0, 1.0)
    expected = reference_smooth((out > 0.4).astype(np.uint8)).astype(bool)
    masks, _ = ls.relevancy_masks(rel)
    assert expected.sum() > 50
    np.testing.assert_array_equal(masks[0], expected)


def test_level_choice_uses_highest_smoothed_max() -> None:
    weak = np.where(square(0, 20, 0, 20), 0.7, 0.1)
    strong = np.where(GT, 0.9, 0.1)
    score = ls.score_query(torch.tensor(np.stack([weak, strong])), GT)
    assert score.level == 1 and score.loc_level == 1
    assert score.iou == pytest.approx(score.level_ious[1]) and score.level_ious[0] == 0.0


def test_localization_peak_inside_and_outside() -> None:
    target = ls.LerfTarget(GT, np.array([[16, 16, 47, 47]]))
    # the 30x30 window spans -15..+14 (OpenCV anchor), so a blob centred at 32.5 peaks at pixel 33
    inside = ls.score_query(blob(32.5, 32.5), target)
    assert inside.localized and inside.peak_xy == [33, 33] and inside.num_peaks == 1
    outside = ls.score_query(blob(5, 58), target)
    assert not outside.localized
    # corners given in any order, bounds inclusive
    assert ls.peaks_in_boxes(np.array([[47, 16]]), np.array([[47, 47, 16, 16]]))
    assert not ls.peaks_in_boxes(np.array([[48, 16]]), np.array([[16, 16, 47, 47]]))
    # a second object of the same label counts
    two = ls.LerfTarget(GT, np.array([[16, 16, 47, 47], [50, 0, 63, 10]]))
    assert ls.score_query(blob(5, 58), two).localized


def test_mask_only_target_uses_its_bounding_box() -> None:
    t = ls.as_target(GT)
    np.testing.assert_array_equal(t.boxes, [[16, 16, 47, 47]])
    assert ls.mask_to_box(np.zeros((4, 4), dtype=bool)).shape == (0, 4)


def test_evaluate_relevancy_metrics_and_missing() -> None:
    targets = {("frame_00001", "cup"): GT, ("frame_00001", "plate"): square(0, 16, 0, 16)}
    rel = np.where(GT, 0.9, 0.1)
    result = ls.evaluate_relevancy(targets, {("frame_00001", "cup"): rel}, scene="toy")
    m = result.scene("toy").metrics
    assert m["miou"] == pytest.approx(ls.score_query(rel, GT).iou / 2)
    assert m["localization_accuracy"] == pytest.approx(0.5)
    assert result.scene("toy").info["num_missing"] == 1
    perfect = ls.evaluate_relevancy({("f", "cup"): GT}, {("f", "cup"): np.where(GT, 0.9, 0.1)})
    assert perfect.metrics["localization_accuracy"] == 1.0
    empty = ls.evaluate_relevancy({("f", "cup"): GT}, {("f", "cup"): np.zeros((H, W))})
    assert empty.metrics["miou"] == 0.0  # a flat map normalises to nothing
    with pytest.raises(ValueError, match="GT resolution"):
        ls.evaluate_relevancy({("f", "cup"): GT}, {("f", "cup"): np.zeros((32, 32))})


def write_label_json(folder: Path, frame: str, objects: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"info": {"height": H, "width": W, "name": f"{frame}.jpg"}, "objects": objects}
    (folder / f"{frame}.json").write_text(json.dumps(data))


def test_lerf_ovs_json_round_trip(tmp_path: Path) -> None:
    poly = [[16, 16], [47, 16], [47, 47], [16, 47]]
    np.testing.assert_array_equal(ls.polygon_to_mask((H, W), poly), GT)
    label_dir = tmp_path / "label" / "toy"
    objects = [
        {"category": "cup", "bbox": [16, 16, 47, 47], "segmentation": poly},
        {"category": "cup", "bbox": [0, 0, 7, 7], "segmentation": [[0, 0], [7, 0], [7, 7], [0, 7]]},
        {"category": "plate", "bbox": [50, 50, 60, 60], "segmentation": [[50, 50], [60, 50], [60, 60], [50, 60]]},
    ]
    write_label_json(label_dir, "frame_00001", objects)
    targets = ls.load_lerf_ovs_annotations(label_dir)
    assert set(targets) == {("frame_00001", "cup"), ("frame_00001", "plate")}
    assert targets[("frame_00001", "cup")].boxes.shape == (2, 4)
    assert targets[("frame_00001", "cup")].mask.sum() == 1024 + 64
    rel_dir = tmp_path / "relevancy"
    rel = np.stack([np.where(GT, 0.9, 0.1), blob(32, 32)])
    ls.write_relevancy(rel_dir, "frame_00001", "cup", torch.from_numpy(rel))
    result = ls.evaluate_folders(label_dir, rel_dir)
    in_memory = ls.evaluate_relevancy(targets, {("frame_00001", "cup"): rel.astype(np.float32)}, scene="toy")
    assert result.scene("toy").metrics == pytest.approx(in_memory.scene("toy").metrics)
    assert result.scene("toy").info["num_missing"] == 1  # plate has no relevancy file
    with pytest.raises(ValueError, match="malformed"):
        write_label_json(tmp_path / "bad", "frame_00002", [{"category": "x"}])
        ls.load_lerf_ovs_annotations(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no LERF-OVS label"):
        ls.load_lerf_ovs_annotations(tmp_path)


def test_mask_folder_gt_and_json(tmp_path: Path) -> None:
    gt_dir = tmp_path / "label" / "toy" / "gt"
    write_gt_mask(gt_dir, "frame_00001", "cup", GT, ".jpg")
    rel_dir = tmp_path / "rel"
    ls.write_relevancy(rel_dir, "frame_00001", "cup", np.where(GT, 0.9, 0.1))
    result = ls.evaluate_folders(None, rel_dir, gt_mask_dir=gt_dir)
    assert result.scene("toy").metrics["localization_accuracy"] == 1.0
    with pytest.raises(ValueError, match="exactly one"):
        ls.evaluate_folders(None, rel_dir)
    data = json.loads(result.to_json())
    assert data["protocol"] == "langsplat-lerf"
    assert set(data["metrics"]) == {"miou", "localization_accuracy"}
    assert data["settings"]["mask_thresh"] == 0.4 and data["settings"]["filter_size"] == 30
    row = data["scenes"]["toy"]["rows"][0]
    assert {"frame", "label", "iou", "localized", "level", "peak_xy"} <= set(row)


def test_polygon_fill_without_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ls, "_polygon_backend", lambda: "pil")
    np.testing.assert_array_equal(ls.polygon_to_mask((H, W), [[16, 16], [47, 16], [47, 47], [16, 47]]), GT)
    assert ls.evaluate_relevancy({("f", "a"): GT}, {}).settings["polygon_rasterizer"] == "pil"
