"""Semantic segmentation metrics from pooled pixel confusion matrices (RT-GS2 protocol, spec §4.6).

- One confusion matrix Int64[C, C] (rows = ground truth, columns = prediction) accumulates **all pixels of all
  test frames**; GT labels < 0 or == ``ignore_index`` are skipped (RT-GS2 ignores -1).
- mIoU = mean per-class IoU over classes **present in the GT** (a class only predicted is left out);
  mAcc = mean per-class recall over the same classes; oAcc = trace / total.
- Several scenes: each scene gets its own numbers, and the protocol's totals come from the SUM of the scene
  matrices (pixel pooling), not from the mean of the per-scene numbers. Cross-scene (unseen scenes) and
  novel-view (every 8th frame of the training scenes, :func:`novel_view_indices`) are reported separately:
  call :func:`semantic_result` / :func:`write_semantic_report` once for each, with its own ``protocol`` name.

Result layout (a :class:`ProtocolResult`): ``result.metrics`` keeps report.py's mean over scenes; the pooled
totals live in ``result.settings["pooled"]`` ({"metrics", "rows", "scenes"}), read them with
:func:`pooled_metrics`. Each scene's info holds its raw matrix ("confusion"), so results of separate runs can be
re-pooled exactly (:func:`matrices_from_result`).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from rich.table import Table
from torch import Tensor

from gsstudio_ext.core.atomic import atomic_write
from gsstudio_ext.eval.report import ProtocolResult, SceneResult

PROTOCOL = "semantic"
METRICS = ("miou", "macc", "oacc")
IGNORE_INDEX = -1
NOVEL_VIEW_EVERY = 8
"""RT-GS2's novel-view test frames inside training scenes: idx % 8 == 0."""

PathLike = Union[str, Path]


def novel_view_indices(num_frames: int, every: int = NOVEL_VIEW_EVERY) -> List[int]:
    """Frame indices held out for the novel-view test: 0, every, 2 * every, ..."""
    return list(range(0, num_frames, every))


class ConfusionMatrix:
    """Pooled pixel confusion matrix Int64[C, C] (rows = ground truth, cols = prediction) over all pixels of all
    frames. GT labels < 0 (or == ``ignore_index``) are ignored; predictions outside [0, C) raise ValueError.

    With ``device=None`` the counts follow the device of the tensors given to :meth:`update`.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: Optional[torch.device] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._fixed_device = device is not None
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @classmethod
    def from_counts(
        cls, counts: Union[Tensor, Sequence[Sequence[int]]], ignore_index: int = IGNORE_INDEX
    ) -> "ConfusionMatrix":
        """A matrix holding ``counts`` Int[C, C] (e.g. read back from a result JSON)."""
        counts = torch.as_tensor(counts, dtype=torch.int64)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
            raise ValueError(f"confusion counts must be square [C, C], got shape {tuple(counts.shape)}")
        out = cls(counts.shape[0], ignore_index, device=counts.device)
        out.matrix = counts.clone()
        return out

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add the pixels of a prediction Int[...] and its GT Int[...] (same shape: a frame, a batch, anything)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
        if pred.is_floating_point() or gt.is_floating_point():
            raise ValueError("pass integer class ids (e.g. logits.argmax(dim=0)), not floating-point tensors")
        pred = pred.reshape(-1).long()
        gt = gt.reshape(-1).to(pred.device).long()
        c = self.num_classes
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
            raise ValueError(f"predictions must lie in [0, {c}); got min {int(pred.min())}, max {int(pred.max())}")
        keep = (gt >= 0) & (gt != self.ignore_index)
        pred, gt = pred[keep], gt[keep]
        if gt.numel() and int(gt.max()) >= c:
            raise ValueError(f"ground-truth label {int(gt.max())} >= num_classes {c} (and != ignore_index)")
        counts = torch.bincount(gt * c + pred, minlength=c * c).reshape(c, c)
        if not self._fixed_device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """A new matrix holding the counts of both (same as updating one matrix with both inputs)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {self.num_classes}-class and {other.num_classes}-class matrices")
        out = ConfusionMatrix(self.num_classes, self.ignore_index, device=self.matrix.device)
        out.matrix = self.matrix + other.matrix.to(self.matrix.device)
        return out

    def reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all torch.distributed ranks in place (no-op when not initialised); returns self."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)
        return self

    @property
    def total(self) -> int:
        """Number of counted (non-ignored) pixels."""
        return int(self.matrix.sum())

    def present(self) -> Tensor:
        """Bool[C]: classes with at least one GT pixel."""
        return self.matrix.sum(dim=1) > 0

    def iou(self) -> Tensor:
        """Float64[C] IoU = TP / (GT + pred - TP); NaN where the class is in neither GT nor prediction."""
        m = self.matrix.double()
        tp = m.diagonal()
        union = m.sum(dim=1) + m.sum(dim=0) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def recall(self) -> Tensor:
        """Float64[C] per-class accuracy TP / GT pixels; NaN where the class has no GT pixel."""
        m = self.matrix.double()
        gt = m.sum(dim=1)
        return torch.where(gt > 0, m.diagonal() / gt.clamp_min(1), torch.full_like(gt, math.nan))

    def miou(self) -> float:
        """Mean IoU over GT-present classes (NaN when nothing was counted)."""
        return _masked_mean(self.iou(), self.present())

    def macc(self) -> float:
        """Mean recall over GT-present classes (NaN when nothing was counted)."""
        return _masked_mean(self.recall(), self.present())

    def oacc(self) -> float:
        """Overall pixel accuracy: trace / total (NaN when nothing was counted)."""
        total = self.total
        return int(self.matrix.diagonal().sum()) / total if total else math.nan

    def metrics(self) -> Dict[str, float]:
        """{"miou", "macc", "oacc"}."""
        return {"miou": self.miou(), "macc": self.macc(), "oacc": self.oacc()}

    def rows(self, classes: Sequence[str]) -> List[Dict[str, Any]]:
        """One JSON-ready row per class: class_id, name, gt_pixels, pred_pixels, iou, acc (None if undefined),
        present (in the GT, so counted in the means)."""
        _check_classes(self, classes)
        m = self.matrix.cpu()
        gt, pred = m.sum(dim=1).tolist(), m.sum(dim=0).tolist()
        iou, acc, present = self.iou().cpu().tolist(), self.recall().cpu().tolist(), self.present().cpu().tolist()
        return [
            {
                "class_id": k,
                "name": str(classes[k]),
                "gt_pixels": int(gt[k]),
                "pred_pixels": int(pred[k]),
                "iou": None if math.isnan(iou[k]) else iou[k],
                "acc": None if math.isnan(acc[k]) else acc[k],
                "present": bool(present[k]),
            }
            for k in range(self.num_classes)
        ]

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, miou={self.miou():.4f})"


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else math.nan


def _check_classes(matrix: ConfusionMatrix, classes: Sequence[str]) -> None:
    if len(classes) != matrix.num_classes:
        raise ValueError(f"{len(classes)} class names for a {matrix.num_classes}-class confusion matrix")


def _seen(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of classes with GT or predicted pixels (the others say nothing)."""
    return [r for r in rows if r["gt_pixels"] or r["pred_pixels"]]


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.4f}"


def save_confusion_png(
    matrix: ConfusionMatrix,
    classes: Sequence[str],
    path: PathLike,
    normalize: Optional[str] = "true",
    title: str = "",
    only_seen: bool = True,
) -> Path:
    """Heat map of the matrix with class names on both axes, written atomically as a PNG; returns the path.

    ``normalize``: "true" (each GT row sums to 1, the diagonal is per-class recall), "pred" (columns), "all", or
    None (raw counts). Rows/columns of classes with neither GT nor predicted pixels are dropped when ``only_seen``
    (46-class maps of a room show a dozen). The figure grows with the class count (readable to ~50 classes);
    cells are annotated up to 16 classes. Empty rows (class absent from GT) are drawn grey.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_classes(matrix, classes)
    if normalize not in ("true", "pred", "all", None):
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}")
    m = matrix.matrix.cpu().double()
    keep = torch.arange(matrix.num_classes)
    if only_seen:
        seen = (m.sum(dim=0) + m.sum(dim=1)) > 0
        if bool(seen.any()):
            keep = keep[seen]
    m = m[keep][:, keep]
    names = [str(classes[k]) for k in keep.tolist()]
    if normalize == "true":
        m = m / m.sum(dim=1, keepdim=True)  # 0/0 -> NaN: grey row
    elif normalize == "pred":
        m = m / m.sum(dim=0, keepdim=True)
    elif normalize == "all":
        m = m / max(float(m.sum()), 1.0)
    n = len(names)
    side = min(max(4.0, 0.24 * n + 2.5), 16.0)
    font = 9 if n <= 16 else (7.5 if n <= 32 else 6.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    values = m.numpy()
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xticks(range(n), labels=names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=names, fontsize=font)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    metrics = matrix.metrics()
    heading = f"mIoU {_fmt(metrics['miou'])}  mAcc {_fmt(metrics['macc'])}  oAcc {_fmt(metrics['oacc'])}"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                if not math.isnan(v):
                    text = f"{v:.2f}" if normalize else f"{int(v)}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=font - 1, color="w" if v < 0.5 else "k")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def per_class_table(matrix: ConfusionMatrix, classes: Sequence[str], title: str = "") -> Table:
    """A rich table: one row per class with GT or predicted pixels, then the GT-present means and oAcc."""
    table = Table(title=title or None)
    for name, justify in (("id", "right"), ("class", "left"), ("GT px", "right"), ("pred px", "right"),
                          ("IoU", "right"), ("Acc", "right")):  # fmt: skip
        table.add_column(name, justify=justify)
    for r in _seen(matrix.rows(classes)):
        name = r["name"] if r["present"] else f"{r['name']} (not in GT)"
        table.add_row(str(r["class_id"]), name, str(r["gt_pixels"]), str(r["pred_pixels"]), _fmt(r["iou"]),
                      _fmt(r["acc"]), style=None if r["present"] else "dim")  # fmt: skip
    metrics = matrix.metrics()
    present = int(matrix.present().sum())
    table.add_row("", f"mean over {present} GT classes", str(matrix.total), "", _fmt(metrics["miou"]),
                  _fmt(metrics["macc"]), style="bold")  # fmt: skip
    table.caption = f"oAcc {_fmt(metrics['oacc'])}"
    return table


def _pool(matrices: Mapping[str, ConfusionMatrix]) -> ConfusionMatrix:
    if not matrices:
        raise ValueError("no confusion matrices to report")
    items = list(matrices.values())
    pooled = ConfusionMatrix.from_counts(torch.zeros_like(items[0].matrix), items[0].ignore_index)
    for m in items:
        pooled = pooled.merge(m)
    return pooled


def semantic_result(
    matrices: Mapping[str, ConfusionMatrix], classes: Sequence[str], protocol: str = PROTOCOL
) -> ProtocolResult:
    """One SceneResult per scene (name -> matrix) with miou/macc/oacc and per-class rows, and the pooled totals
    (the sum of all matrices) in ``settings["pooled"]``."""
    pooled = _pool(matrices)
    _check_classes(pooled, classes)
    scenes = []
    for name, m in matrices.items():
        info = {"pixels": m.total, "present_classes": int(m.present().sum()), "confusion": m.matrix.cpu().tolist()}
        scenes.append(SceneResult(name, m.metrics(), m.rows(classes), info))
    settings = {
        "num_classes": pooled.num_classes,
        "ignore_index": pooled.ignore_index,
        "classes": [str(c) for c in classes],
        "pooled": {"metrics": pooled.metrics(), "rows": pooled.rows(classes), "scenes": list(matrices)},
    }
    return ProtocolResult(protocol, list(METRICS), scenes, settings)


def pooled_metrics(result: ProtocolResult) -> Dict[str, float]:
    """The protocol's totals (metrics of the summed matrix) of a :func:`semantic_result`, e.g. after a load."""
    if "pooled" not in result.settings:
        raise KeyError(f"result of protocol {result.protocol!r} has no pooled semantic metrics")
    return {k: (math.nan if v is None else float(v)) for k, v in result.settings["pooled"]["metrics"].items()}


def matrices_from_result(result: ProtocolResult) -> Dict[str, ConfusionMatrix]:
    """Scene name -> matrix rebuilt from a result's stored counts (re-pool results of separate runs with these)."""
    ignore = int(result.settings.get("ignore_index", IGNORE_INDEX))
    out = {}
    for s in result.scenes:
        if "confusion" not in s.info:
            raise KeyError(f"scene {s.scene!r} stores no confusion matrix")
        out[s.scene] = ConfusionMatrix.from_counts(s.info["confusion"], ignore)
    return out


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "scene"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown_rows(rows: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ["| id | class | GT px | pred px | IoU | Acc |", "|---:|---|---:|---:|---:|---:|"]
    for r in _seen(rows):
        name = _md(r["name"]) + ("" if r["present"] else " (not in GT)")
        lines.append(f"| {r['class_id']} | {name} | {r['gt_pixels']} | {r['pred_pixels']} | {_fmt(r['iou'])} "
                     f"| {_fmt(r['acc'])} |")  # fmt: skip
    return lines


def semantic_markdown(result: ProtocolResult) -> str:
    """Markdown report: the metrics per scene and pooled, then the per-class tables (pooled first)."""
    pooled = result.settings["pooled"]
    lines = [f"# {result.protocol}", "", "mIoU and mAcc average the classes present in the ground truth; the pooled",
             "row counts all pixels of all scenes in one confusion matrix.", "",
             "| scene | mIoU | mAcc | oAcc | pixels |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for s in result.scenes:
        m = s.metrics
        numbers = " | ".join(_fmt(m[k]) for k in METRICS)
        lines.append(f"| {_md(s.scene)} | {numbers} | {s.info['pixels']} |")
    p = pooled_metrics(result)
    total = sum(s.info["pixels"] for s in result.scenes)
    lines += [f"| **pooled** | {_fmt(p['miou'])} | {_fmt(p['macc'])} | {_fmt(p['oacc'])} | {total} |", ""]
    lines += ["## pooled", ""] + _markdown_rows(pooled["rows"]) + [""]
    if len(result.scenes) > 1:
        for s in result.scenes:
            lines += [f"## {s.scene}", ""] + _markdown_rows(s.rows) + [""]
    return "\n".join(lines)


def write_semantic_report(
    result_dir: PathLike,
    matrices: Mapping[str, ConfusionMatrix],
    classes: Sequence[str],
    protocol: str = PROTOCOL,
) -> Path:
    """Write ``<dir>/<protocol>.json``, ``<dir>/<protocol>.md`` (per-class tables) and row-normalised confusion
    PNGs ``<dir>/confusion/<scene>.png`` and ``pooled.png``; every file atomically. Returns the folder."""
    folder = Path(result_dir)
    result = semantic_result(matrices, classes, protocol)
    result.save(folder / f"{protocol}.json")
    text = semantic_markdown(result) + "\n"
    atomic_write(folder / f"{protocol}.md", lambda handle: handle.write(text), mode="w")
    used = {"pooled"}
    for name, m in matrices.items():
        stem = _file_stem(name)
        while stem in used:
            stem += "_"
        used.add(stem)
        save_confusion_png(m, classes, folder / "confusion" / f"{stem}.png", title=f"{protocol} / {name}")
    save_confusion_png(_pool(matrices), classes, folder / "confusion" / "pooled.png", title=f"{protocol} / pooled")
    return folder
