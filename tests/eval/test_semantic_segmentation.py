"""RT-GS2 semantic metrics: pooled confusion matrix, mIoU/mAcc over GT-present classes, oAcc, ignore labels,
pooling over frames and scenes, distributed reduce, confusion PNGs and the markdown/JSON report."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from rich.console import Console

from gsstudio_ext.eval.report import ProtocolResult
from gsstudio_ext.eval.semantic_segmentation import (
    ConfusionMatrix,
    matrices_from_result,
    novel_view_indices,
    per_class_table,
    pooled_metrics,
    save_confusion_png,
    semantic_result,
    write_semantic_report,
)

CLASSES = ["wall", "floor", "chair", "lamp"]
# Hand-made frame (2 x 5): class 3 ("lamp") is predicted once but absent from the GT.
GT = torch.tensor([[0, 0, 0, 0, 1], [1, 1, 2, 2, 2]])
PRED = torch.tensor([[0, 0, 0, 1, 1], [1, 3, 2, 2, 0]])
# Confusion rows (GT) x cols (pred): [3,1,0,0] [0,2,0,1] [1,0,2,0] [0,0,0,0]
# IoU = 3/5, 2/4, 2/3, (0, excluded); recall = 3/4, 2/3, 2/3; oAcc = 7/10.


def _hand_matrix() -> ConfusionMatrix:
    m = ConfusionMatrix(4)
    m.update(PRED, GT)
    return m


def test_hand_computed_three_class_example() -> None:
    m = _hand_matrix()
    assert m.matrix.tolist() == [[3, 1, 0, 0], [0, 2, 0, 1], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert m.matrix.dtype == torch.int64
    assert m.present().tolist() == [True, True, True, False]
    iou = m.iou()
    assert iou[:3].tolist() == pytest.approx([0.6, 0.5, 2 / 3])
    assert iou[3].item() == 0.0  # predicted but not in GT: IoU 0, yet left out of the mean
    assert torch.isnan(m.recall()[3])
    assert m.miou() == pytest.approx((0.6 + 0.5 + 2 / 3) / 3)  # 0.58889, not 0.44167 with the lamp
    assert m.macc() == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)  # 0.69444
    assert m.oacc() == pytest.approx(0.7)
    rows = m.rows(CLASSES)
    assert [r["gt_pixels"] for r in rows] == [4, 3, 3, 0]
    assert [r["pred_pixels"] for r in rows] == [4, 3, 2, 1]
    assert rows[3] == {"class_id": 3, "name": "lamp", "gt_pixels": 0, "pred_pixels": 1, "iou": 0.0, "acc": None,
                       "present": False}  # fmt: skip


def test_class_in_neither_gt_nor_prediction_has_nan_iou_and_empty_matrix_gives_nan() -> None:
    m = ConfusionMatrix(3)
    assert math.isnan(m.miou()) and math.isnan(m.macc()) and math.isnan(m.oacc())
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert math.isnan(m.iou()[2].item())
    assert m.miou() == 1.0 and m.macc() == 1.0 and m.oacc() == 1.0


def test_ignore_labels_are_not_counted() -> None:
    base = _hand_matrix()
    gt = torch.cat([GT, torch.full((2, 3), -1)], dim=1)  # extra ignored pixels with wrong and right predictions
    pred = torch.cat([PRED, torch.tensor([[0, 1, 2], [3, 3, 0]])], dim=1)
    m = ConfusionMatrix(4)
    m.update(pred, gt)
    assert torch.equal(m.matrix, base.matrix)
    # a custom ignore index (255) and any negative label are both skipped
    m255 = ConfusionMatrix(4, ignore_index=255)
    m255.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 255, -3, 255]))
    assert m255.matrix.sum().item() == 1 and m255.matrix[0, 0].item() == 1
    with pytest.raises(ValueError, match="ground-truth label 7"):
        m255.update(torch.tensor([0]), torch.tensor([7]))


def test_pooling_over_frames_equals_one_update_on_the_concatenation() -> None:
    torch.manual_seed(0)
    frames = [(torch.randint(0, 6, (h, w)), torch.randint(-1, 6, (h, w))) for h, w in [(32, 32), (48, 40), (16, 64)]]
    pooled = ConfusionMatrix(6)
    for pred, gt in frames:
        pooled.update(pred, gt)
    joint = ConfusionMatrix(6)
    joint.update(torch.cat([p.reshape(-1) for p, _ in frames]), torch.cat([g.reshape(-1) for _, g in frames]))
    assert torch.equal(pooled.matrix, joint.matrix)
    valid = sum(int((g >= 0).sum()) for _, g in frames)
    assert pooled.total == valid
    # pooled mIoU is not the mean of the per-frame mIoUs
    per_frame = []
    for pred, gt in frames:
        one = ConfusionMatrix(6)
        one.update(pred, gt)
        per_frame.append(one.miou())
    assert pooled.miou() != pytest.approx(sum(per_frame) / 3, abs=1e-6)


def test_merge_equals_joint_update_and_reduce_sums_over_ranks(tmp_path) -> None:
    torch.manual_seed(1)
    a_pred, a_gt = torch.randint(0, 5, (2, 32, 32)), torch.randint(-1, 5, (2, 32, 32))
    b_pred, b_gt = torch.randint(0, 5, (40, 24)), torch.randint(-1, 5, (40, 24))
    a, b, joint = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(a_pred, a_gt)
    b.update(b_pred, b_gt)
    joint.update(a_pred, a_gt)
    joint.update(b_pred, b_gt)
    merged = a.merge(b)
    assert torch.equal(merged.matrix, joint.matrix)
    assert merged.matrix.sum() == a.matrix.sum() + b.matrix.sum()  # inputs untouched
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionMatrix(4))
    before = a.matrix.clone()
    assert a.reduce() is a and torch.equal(a.matrix, before)  # not initialised: no-op
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        a.reduce()
        assert torch.equal(a.matrix, before)  # one rank: the sum is itself
    finally:
        dist.destroy_process_group()


def test_bad_predictions_raise_and_leave_the_matrix_unchanged() -> None:
    m = _hand_matrix()
    before = m.matrix.clone()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m.update(torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m.update(torch.tensor([-1, 0]), torch.tensor([-1, 0]))  # even on an ignored pixel
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax"):
        m.update(torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(m.matrix, before)
    with pytest.raises(ValueError, match="class names"):
        m.rows(["a", "b"])


def _two_scenes() -> dict:
    # scene A: big, perfect; scene B: small, all wrong -> pooled numbers differ from the scene mean
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(torch.tensor([0] * 90 + [1] * 10), torch.tensor([0] * 90 + [1] * 10))
    b.update(torch.tensor([1] * 10), torch.tensor([0] * 10))
    return {"office_3": a, "room_2": b}


def test_semantic_result_pools_by_summing_matrices_not_averaging_scenes() -> None:
    scenes = _two_scenes()
    result = semantic_result(scenes, CLASSES, protocol="semantic-cross-scene")
    assert [s.scene for s in result.scenes] == ["office_3", "room_2"]
    assert result.scene("office_3").metrics == {"miou": 1.0, "macc": 1.0, "oacc": 1.0}
    assert result.scene("room_2").metrics["oacc"] == 0.0 and result.scene("room_2").metrics["miou"] == 0.0
    pooled = pooled_metrics(result)
    # pooled matrix [[90, 10], [0, 10]]: IoU 90/100, 10/20 -> 0.7; recall 0.9, 1.0 -> 0.95; oAcc 100/110
    assert pooled["miou"] == pytest.approx(0.7)
    assert pooled["macc"] == pytest.approx(0.95)
    assert pooled["oacc"] == pytest.approx(100 / 110)
    assert result.metrics["oacc"] == pytest.approx(0.5)  # report.py's scene mean, kept alongside
    assert len(result.scene("room_2").rows) == 4 and result.scene("room_2").rows[0]["gt_pixels"] == 10


def test_report_writes_json_pngs_and_markdown(tmp_path) -> None:
    scenes = _two_scenes()
    folder = write_semantic_report(tmp_path / "rep", scenes, CLASSES)
    assert folder == tmp_path / "rep"
    loaded = ProtocolResult.load(folder / "semantic.json")
    assert pooled_metrics(loaded)["miou"] == pytest.approx(0.7)
    rebuilt = matrices_from_result(loaded)
    assert all(torch.equal(rebuilt[k].matrix, scenes[k].matrix) for k in scenes)
    for name in ("office_3", "room_2", "pooled"):
        with Image.open(folder / "confusion" / f"{name}.png") as im:
            assert im.format == "PNG" and 350 <= im.width <= 1200 and 350 <= im.height <= 1200
    text = (folder / "semantic.md").read_text()
    pooled_section = text.split("## pooled")[1].split("## ")[0]
    assert "| 0 | wall | 100 | 90 | 0.9000 | 0.9000 |" in pooled_section
    assert "| 1 | floor | 10 | 20 | 0.5000 | 1.0000 |" in pooled_section
    assert "chair" not in text and "lamp" not in text  # neither in GT nor predicted
    assert "| **pooled** | 0.7000 | 0.9500 | 0.9091 | 110 |" in text
    assert not list(folder.rglob("*.tmp"))


def test_png_of_fifty_classes_is_larger_and_readable(tmp_path) -> None:
    torch.manual_seed(2)
    classes = [f"class_{k:02d}" for k in range(50)]
    m = ConfusionMatrix(50)
    gt = torch.randint(0, 50, (64, 64))
    pred = torch.where(torch.rand(64, 64) < 0.7, gt, torch.randint(0, 50, (64, 64)))
    m.update(pred, gt)
    small = save_confusion_png(_hand_matrix(), CLASSES, tmp_path / "small.png")
    big = save_confusion_png(m, classes, tmp_path / "big.png", normalize=None)
    with Image.open(small) as a, Image.open(big) as b:
        assert b.width > 2 * a.width and 1000 <= b.width <= 2000 and 1000 <= b.height <= 2000
    with pytest.raises(ValueError, match="normalize"):
        save_confusion_png(m, classes, tmp_path / "x.png", normalize="rows")
    assert not (tmp_path / "x.png").exists()


def test_rich_table_lists_present_classes_and_flags_predicted_only_ones() -> None:
    console = Console(record=True, width=120)
    console.print(per_class_table(_hand_matrix(), CLASSES, "frame"))
    out = console.export_text()
    for name in ("wall", "floor", "chair"):
        assert name in out
    assert "lamp (not in GT)" in out
    assert "0.5889" in out and "0.6944" in out and "oAcc 0.7000" in out


def test_novel_view_indices_take_every_eighth_frame() -> None:
    assert novel_view_indices(20) == [0, 8, 16]
    assert novel_view_indices(0) == []
