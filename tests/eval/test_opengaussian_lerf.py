"""OpenGaussian / AG2aussian LERF protocol: known scores, missing files, shapes, official folder layout, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsstudio_ext.eval import opengaussian_lerf as og
from gsstudio_ext.eval.report import ProtocolResult

H = W = 64


def square(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


GT = square(16, 32, 16, 32)  # 256 pixels, on 8x8 JPEG blocks


def known_pairs():
    """GT and predictions with IoU 1, 0.5 (strictly not > 0.5), 0.25 (strictly not > 0.25) and a missing one."""
    gt = {("frame_00001", "cup"): GT, ("frame_00001", "old camera"): GT, ("frame_00002", "cup"): GT}
    gt[("frame_00002", "plate")] = GT
    pred = {
        ("frame_00001", "cup"): GT.copy(),
        ("frame_00001", "old camera"): square(16, 24, 16, 32),  # 128 / 256
        ("frame_00002", "cup"): square(16, 20, 16, 32),  # 64 / 256
    }
    return gt, pred


def test_known_scores_and_strict_thresholds() -> None:
    gt, pred = known_pairs()
    result = og.evaluate_masks(gt, pred, scene="toy")
    m = result.scene("toy").metrics
    assert m["miou"] == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)
    assert m["acc_25"] == pytest.approx(2 / 4)  # IoU > 0.25: only 1.0 and 0.5
    assert m["acc_50"] == pytest.approx(1 / 4)
    rows = {(r["frame"], r["query"]): r for r in result.scene("toy").rows}
    assert rows[("frame_00002", "plate")]["missing"] and rows[("frame_00002", "plate")]["iou"] == 0.0
    assert rows[("frame_00001", "cup")]["boundary_iou"] == 1.0
    assert result.scene("toy").info["num_missing"] == 1


def test_perfect_and_empty_predictions() -> None:
    gt = {("f", "a"): GT, ("f", "b"): square(40, 60, 0, 30)}
    perfect = og.evaluate_masks(gt, {k: torch.from_numpy(v) for k, v in gt.items()})
    assert perfect.metrics == {"miou": 1.0, "acc_25": 1.0, "acc_50": 1.0, "mbiou": 1.0}
    empty = og.evaluate_masks(gt, {k: np.zeros_like(v) for k, v in gt.items()})
    assert empty.metrics == {"miou": 0.0, "acc_25": 0.0, "acc_50": 0.0, "mbiou": 0.0}
    none = og.evaluate_masks(gt, {("f", "a"): None})
    assert none.metrics["miou"] == 0.0 and none.scene("scene").info["num_missing"] == 2


def test_shape_mismatch_resizes_both_to_the_smaller() -> None:
    big = np.kron(GT, np.ones((2, 2), dtype=bool))  # prediction rendered at twice the resolution
    assert og.score_pair(big, GT) == (1.0, 1.0)
    assert og.score_pair(GT, big) == (1.0, 1.0)
    iou, _ = og.score_pair(np.ones((64, 32), dtype=bool), np.ones((32, 64), dtype=bool))
    assert iou == 1.0  # both become 32 x 32


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no GT"):
        og.evaluate_masks({}, {})
    with pytest.raises(ValueError, match="tuples"):
        og.evaluate_masks({"frame": GT}, {})
    with pytest.raises(FileNotFoundError, match="GT folder"):
        og.evaluate_folders(tmp_path / "nope", tmp_path)
    gt_dir = tmp_path / "label" / "toy" / "gt"
    og.write_gt_mask(gt_dir, "frame_00001", "cup", GT, ".png")
    og.write_gt_mask(gt_dir, "frame_00001", "cup", GT, ".jpg")
    with pytest.raises(ValueError, match="several GT files"):
        og.evaluate_folders(gt_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="prediction folder"):
        og.evaluate_folders(gt_dir, tmp_path / "missing_preds")


def write_official_layout(root: Path, suffix: str) -> tuple[Path, Path]:
    gt, pred = known_pairs()
    gt_dir, pred_dir = root / "label" / "toy" / "gt", root / "outputs" / "toy" / "text2obj" / "ours_30000"
    for (frame, query), mask in gt.items():
        og.write_gt_mask(gt_dir, frame, query, mask, suffix)
    for (frame, query), mask in pred.items():
        og.write_prediction(pred_dir, frame, query, mask)
    return gt_dir, pred_dir


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_folder_round_trip_matches_in_memory(tmp_path: Path, suffix: str) -> None:
    gt_dir, pred_dir = write_official_layout(tmp_path, suffix)
    assert (gt_dir / "frame_00001" / f"old camera{suffix}").is_file()
    assert (pred_dir / "frame_00001_old camera.png").is_file()
    # an extra prediction with no GT pair is ignored but reported
    og.write_prediction(pred_dir, "frame_00009", "ghost", GT)
    from_files = og.evaluate_folders(gt_dir, pred_dir)
    in_memory = og.evaluate_masks(*known_pairs(), scene="toy")
    assert from_files.scene("toy").metrics == pytest.approx(in_memory.scene("toy").metrics)
    assert from_files.scene("toy").info["unmatched_predictions"] == ["frame_00009_ghost.png"]


def test_grey_threshold_and_rgb_files(tmp_path: Path) -> None:
    gt_dir = tmp_path / "gt"
    grey = np.where(GT, 200, 10).astype(np.uint8)  # 10 is background (> 10 is the rule)
    (gt_dir / "f1").mkdir(parents=True)
    Image.fromarray(grey).save(gt_dir / "f1" / "cup.png")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    rgb = np.stack([np.where(GT, 255, 0).astype(np.uint8)] * 3, axis=-1)
    Image.fromarray(rgb).save(pred_dir / "f1_cup.png")
    np.testing.assert_array_equal(og.read_mask_image(gt_dir / "f1" / "cup.png"), GT)
    result = og.evaluate_folders(gt_dir, pred_dir, scene="toy")
    assert result.metrics["miou"] == 1.0


def test_official_frame_list_is_used(tmp_path: Path) -> None:
    gt_dir = tmp_path / "label" / "figurines" / "gt"
    for frame in og.LERF_EVAL_FRAMES["figurines"]:
        og.write_gt_mask(gt_dir, frame, "rubber duck", GT)
    og.write_gt_mask(gt_dir, "frame_00007", "rubber duck", GT)  # not an evaluated frame
    pred_dir = tmp_path / "pred"
    og.write_prediction(pred_dir, "frame_00041", "rubber duck", GT)
    result = og.evaluate_folders(gt_dir, pred_dir)
    scene = result.scene("figurines")
    assert scene.info["num_pairs"] == 4 and scene.metrics["miou"] == pytest.approx(0.25)
    only = og.evaluate_folders(gt_dir, pred_dir, frames=["frame_00041"])
    assert only.metrics["miou"] == 1.0
    (gt_dir / "frame_00195" / "rubber duck.png").unlink()
    (gt_dir / "frame_00195").rmdir()
    with pytest.raises(FileNotFoundError, match="frame_00195"):
        og.evaluate_folders(gt_dir, pred_dir)


def test_json_names_protocol_and_round_trips(tmp_path: Path) -> None:
    result = og.evaluate_masks(*known_pairs(), scene="toy")
    data = json.loads(result.to_json())
    assert data["protocol"] == "opengaussian-lerf"
    assert set(data["metrics"]) == {"miou", "acc_25", "acc_50", "mbiou"}
    assert set(data["scenes"]["toy"]["rows"][0]) == {"frame", "query", "iou", "boundary_iou", "missing"}
    path = result.save(tmp_path / "out" / "eval.json")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    loaded = ProtocolResult.load(path)
    assert loaded.protocol == "opengaussian-lerf" and loaded.metrics == pytest.approx(result.metrics)
    assert result.flat_metrics()["opengaussian-lerf/toy/miou"] == result.metrics["miou"]


def test_scene_average_is_mean_of_scenes() -> None:
    one = og.evaluate_masks({("f", "a"): GT}, {("f", "a"): GT}, scene="s1")
    gt, pred = known_pairs()
    two = og.evaluate_masks(gt, pred, scene="s2")
    merged = ProtocolResult.merge([one, two])
    assert merged.metrics["miou"] == pytest.approx((1.0 + 0.4375) / 2)
    assert merged.table().row_count == 3
    with pytest.raises(ValueError, match="duplicate"):
        ProtocolResult.merge([one, one])
