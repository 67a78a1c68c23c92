"""Referring metrics: target masks from instance masks, IoU per (view, expression), seen/unseen and kind
breakdowns, the official last-per-category variant, one render per view."""

from __future__ import annotations

import math

import torch

from gsstudio_ext.data.expression_table import ExpressionTable, target_masks
from gsstudio_ext.eval.referring import ReferringEvalConfig, ReferringView, evaluate_referring

RECORDS = [
    {"id": 0, "text": "the mug", "object_ids": [1], "kind": "name"},
    {"id": 1, "text": "the cyan mug", "object_ids": [1], "kind": "colour"},
    {"id": 2, "text": "the duck", "object_ids": [2], "kind": "name"},
    {"id": 3, "text": "the mug left of the duck", "object_ids": [1], "kind": "left_right"},
    {"id": 4, "text": "both", "object_ids": [2, 1], "kind": "name"},
]


def _masks():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, :3, :4] = True  # object 1
    masks[1, 3:, 4:] = True  # object 2
    return torch.tensor([1, 2]), masks


def test_expression_table_groups_categories_by_target_and_filters_held_out_kinds() -> None:
    table = ExpressionTable.from_records(RECORDS)
    assert table.categories.tolist() == [0, 0, 1, 0, 2]
    assert table.trained(torch.arange(5), ("left_right",)).tolist() == [0, 1, 2, 4]
    assert table.trained(torch.arange(5), ()).tolist() == [0, 1, 2, 3, 4]


def test_target_masks_are_unions_of_the_objects_masks() -> None:
    ids, masks = _masks()
    targets = target_masks([[1], [2], [1, 2], [7]], ids, masks)
    assert torch.equal(targets[0], masks[0]) and torch.equal(targets[1], masks[1])
    assert torch.equal(targets[2], masks[0] | masks[1])
    assert not targets[3].any()  # an object not in the frame


def test_scores_each_pair_with_one_render_per_view() -> None:
    table = ExpressionTable.from_records(RECORDS)
    ids, masks = _masks()
    expression_ids = [0, 1, 2, 3]
    targets = target_masks([table.object_ids[i] for i in expression_ids], ids, masks)
    views = [ReferringView("f0", None, expression_ids, targets), ReferringView("f1", None, [2], targets[2:3])]
    calls = []

    def render(camera, texts):
        calls.append(list(texts))
        logits = torch.full((len(texts), 6, 8), -5.0)
        for slot, text in enumerate(texts):
            if text == "the mug":
                logits[slot, :3, :4] = 5.0  # exact
            elif text == "the cyan mug":
                logits[slot, :3, :2] = 5.0  # half of the mug
            elif text == "the mug left of the duck":
                logits[slot] = 5.0  # everything: IoU 12/48
        return logits  # "the duck": nothing

    result = evaluate_referring(render, views, table, ReferringEvalConfig(), held_out_kinds=("left_right",))
    assert calls == [["the mug", "the cyan mug", "the duck", "the mug left of the duck"], ["the duck"]]
    metrics = result.metrics
    rows = result.scenes[0].rows
    assert [round(r["iou"], 4) for r in rows] == [1.0, 0.5, 0.0, 0.25, 0.0]
    assert math.isclose(metrics["miou"], 1.75 / 5)
    assert math.isclose(metrics["miou_seen"], 1.5 / 4) and math.isclose(metrics["miou_unseen"], 0.25)
    assert math.isclose(metrics["miou_name"], 1.0 / 3) and math.isclose(metrics["miou_colour"], 0.5)
    # official: the last expression per (frame, target) wins: f0 mug -> 0.25, f0 duck -> 0, f1 duck -> 0
    assert math.isclose(metrics["miou_last_per_category"], 0.25 / 3)
    per_expression = result.scenes[0].info["expressions"]
    assert per_expression["2"] == {"text": "the duck", "kind": "name", "seen": True, "miou": 0.0, "num_views": 2}
    assert set(result.flat_metrics()) >= {"referring/miou", "referring/scene/miou_unseen"}


def test_empty_targets_are_not_scored() -> None:
    table = ExpressionTable.from_records(RECORDS)
    view = ReferringView("f0", None, [0], torch.zeros(1, 6, 8, dtype=torch.bool))
    result = evaluate_referring(lambda c, t: torch.zeros(1, 6, 8), [view], table, ReferringEvalConfig())
    assert result.scenes[0].rows == [] and math.isnan(result.metrics["miou"])
