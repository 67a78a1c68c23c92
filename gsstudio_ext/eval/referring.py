"""Referring segmentation metrics of a trained scene on its eval frames (Ref-LERF protocol, spec §3.5).

Every (eval frame, expression valid in it) pair is scored: the rendered logit map thresholded at ``threshold``
(probability; pixels no Gaussian covers have logit 0 and are never predicted) against the expression's target mask,
IoU per pair, mIoU = mean over pairs. All expressions of a frame come from ONE render. Also reported: mIoU on the
expressions trained on ("seen") and on held-out kinds ("unseen"), per expression kind, per expression, and the
official scorer's variant that keeps only the last expression per (frame, target) (its files overwrite each other).

Method-agnostic: the method passes ``render(camera, texts) -> logits [S, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from gsstudio_ext.data.expression_table import ExpressionTable, target_masks
from gsstudio_ext.eval.report import ProtocolResult, SceneResult

PROTOCOL = "referring"


@dataclass
class ReferringEvalConfig:
    """ns-eval referring metrics (run when the eval frames carry expressions and instance masks)."""

    enabled: bool = True
    """Compute the referring metrics in ns-eval."""
    threshold: float = 0.5
    """A pixel is predicted when sigmoid(logit) exceeds this."""
    min_gt_pixels: int = 1
    """Pairs whose target covers fewer pixels of the frame are not scored (Ref-LERF scores non-empty targets)."""


@dataclass
class ReferringView:
    """One eval frame with the expressions valid in it and their target masks."""

    stem: str
    camera: Cameras
    expression_ids: List[int]
    targets: Tensor
    """Bool [S, H, W], one per expression."""


def referring_views(datamanager, table: ExpressionTable) -> List[ReferringView]:
    """Eval frames with at least one expression, from the datamanager's expression and instance sidecars."""
    views = []
    for (camera, batch), stem in zip(datamanager.fixed_indices_eval_dataloader, datamanager.eval_stems):
        ids, masks = batch.get("expression_ids"), batch.get("instance_masks")
        if ids is None or masks is None or ids.numel() == 0:
            continue
        ids = [i for i in ids.tolist() if i < len(table)]
        targets = target_masks([table.object_ids[i] for i in ids], batch["instance_ids"], masks)
        views.append(ReferringView(stem, camera, ids, targets.cpu()))
    return views


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def evaluate_referring(
    render: Callable[[Cameras, Sequence[str]], Tensor],
    views: Sequence[ReferringView],
    table: ExpressionTable,
    config: ReferringEvalConfig,
    held_out_kinds: Sequence[str] = (),
    scene: str = "scene",
) -> ProtocolResult:
    """Score every (view, expression) pair; one ``render`` call per view."""
    rows: List[Dict] = []
    with torch.no_grad():
        for view in views:
            logits = render(view.camera, [table.texts[i] for i in view.expression_ids]).float().cpu()
            predicted = torch.sigmoid(logits) > config.threshold
            for slot, expression in enumerate(view.expression_ids):
                target = view.targets[slot]
                if int(target.sum()) < config.min_gt_pixels:
                    continue
                pred = predicted[slot]
                union = int((pred | target).sum())
                rows.append(
                    {
                        "frame": view.stem,
                        "expression_id": expression,
                        "text": table.texts[expression],
                        "kind": table.kinds[expression],
                        "seen": table.kinds[expression] not in held_out_kinds,
                        "category": int(table.categories[expression]),
                        "iou": int((pred & target).sum()) / union if union else 1.0,
                        "predicted_pixels": int(pred.sum()),
                        "target_pixels": int(target.sum()),
                    }
                )
    metrics = {"miou": _mean([r["iou"] for r in rows])}
    names = ["miou"]
    if held_out_kinds:
        metrics["miou_seen"] = _mean([r["iou"] for r in rows if r["seen"]])
        metrics["miou_unseen"] = _mean([r["iou"] for r in rows if not r["seen"]])
        names += ["miou_seen", "miou_unseen"]
    last_per_category: Dict[tuple, float] = {}
    for r in rows:  # the official file names collide per (frame, category): the last expression wins
        last_per_category[(r["frame"], r["category"])] = r["iou"]
    metrics["miou_last_per_category"] = _mean(list(last_per_category.values()))
    names.append("miou_last_per_category")
    for kind in sorted({r["kind"] for r in rows}):
        metrics[f"miou_{kind}"] = _mean([r["iou"] for r in rows if r["kind"] == kind])
        names.append(f"miou_{kind}")
    per_expression = {}
    for expression in sorted({r["expression_id"] for r in rows}):
        mine = [r for r in rows if r["expression_id"] == expression]
        per_expression[str(expression)] = {
            "text": mine[0]["text"],
            "kind": mine[0]["kind"],
            "seen": mine[0]["seen"],
            "miou": _mean([r["iou"] for r in mine]),
            "num_views": len(mine),
        }
    settings = {"threshold": config.threshold, "min_gt_pixels": config.min_gt_pixels,
                "held_out_kinds": list(held_out_kinds)}  # fmt: skip
    info = {"num_views": len(views), "expressions": per_expression}
    return ProtocolResult(PROTOCOL, names, [SceneResult(scene, metrics, rows, info)], settings)
