"""Part-editing evaluation (RoMaP protocol, spec §2.8): CLIP score, CLIP directional similarity, locality, part
mIoU, and the edit report (JSON + Markdown + a before/after grid PNG, all written atomically).

- CLIP score: mean over images of cos(E_I(edited image), E_T(target text)).
- CLIPdir (StyleGAN-NADA, as IN2N / IGS2GS compute it): features are L2-normalised first, then per pose pair
  cos(E_I(edit) - E_I(src), E_T(t_edit) - E_T(t_src)); the mean over pairs. A zero direction scores 0.
- Locality: mean absolute RGB change (in [0, 1] units) over the pixels outside the dilated 2D part mask, all
  views pooled. 0 means the edit stayed inside the part.
- Part mIoU: labels 0 = background / no part, 1..num_parts = parts (the gs-synth part-map convention); GT pixels < 0
  are ignored. Mean over parts present in the GT or the prediction (a part in neither is skipped).

The encoder is any object with ``encode_images(Float[B, 3, H, W] in [0, 1]) -> Float[B, D]`` and
``encode_text(list of str) -> Float[B, D]``: an :class:`~gsstudio_ext.models.image_text.ImageTextEncoder`
(open_clip ViT-L/14@336 for the paper's numbers; ``TinyImageTextConfig`` in tests) or a stub.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.atomic import atomic_write, write_json_atomic
from gsstudio_ext.core.masks import dilate_mask

REPORT_JSON = "edit_report.json"
REPORT_MD = "edit_report.md"
REPORT_GRID = "edit_grid.png"
GRID_COLUMNS = ("before", "after", "part mask", "|after - before| x4")


class ImageTextLike(Protocol):
    """What the CLIP metrics need from an encoder."""

    def encode_images(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> Tensor: ...


def _images(images: Tensor, name: str) -> Tensor:
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be Float[B, 3, H, W], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} holds no image")
    return images


def clip_score(encoder: ImageTextLike, images: Tensor, text: str) -> float:
    """Mean cosine similarity between the images Float[B, 3, H, W] in [0, 1] and ``text``."""
    img = F.normalize(encoder.encode_images(_images(images, "images")).float(), dim=-1)
    txt = F.normalize(encoder.encode_text([text]).float(), dim=-1).to(img.device)
    return float((img @ txt[0]).mean())


def clip_directional_similarity(
    encoder: ImageTextLike, src_images: Tensor, edit_images: Tensor, src_text: str, edit_text: str
) -> float:
    """Mean over pose pairs of cos(E_I(edit) - E_I(src), E_T(edit_text) - E_T(src_text)), features L2-normalised.

    src_images, edit_images: Float[B, 3, H, W] in [0, 1], the same B poses in the same order."""
    src, edit = _images(src_images, "src_images"), _images(edit_images, "edit_images")
    if src.shape[0] != edit.shape[0]:
        raise ValueError(f"src_images and edit_images must pair up; got {src.shape[0]} and {edit.shape[0]} images")
    img_src = F.normalize(encoder.encode_images(src).float(), dim=-1)
    img_edit = F.normalize(encoder.encode_images(edit).float(), dim=-1)
    txt = F.normalize(encoder.encode_text([src_text, edit_text]).float(), dim=-1).to(img_src.device)
    img_dir = img_edit - img_src  # [B, D]
    txt_dir = (txt[1] - txt[0])[None].expand_as(img_dir)
    return float(F.cosine_similarity(img_dir, txt_dir, dim=-1).mean())


def locality(before: Tensor, after: Tensor, masks2d: Tensor, dilate_px: int = 2) -> float:
    """Mean |after - before| over channels and over the pixels outside the ``dilate_px``-dilated part masks.

    before, after: Float[B, 3, H, W] in [0, 1]; masks2d: Bool[B, H, W]."""
    before, after = _images(before, "before"), _images(after, "after")
    if before.shape != after.shape:
        raise ValueError(f"before and after must have the same shape; got {list(before.shape)}, {list(after.shape)}")
    if masks2d.ndim == 2:
        masks2d = masks2d[None]
    if masks2d.shape != (before.shape[0], *before.shape[2:]):
        raise ValueError(f"masks2d must be Bool[{before.shape[0]}, {before.shape[2]}, {before.shape[3]}]")
    outside = ~dilate_mask(masks2d.to(before.device).bool(), dilate_px)
    if not bool(outside.any()):
        raise ValueError("the dilated part masks cover every pixel: locality is undefined")
    diff = (after.float() - before.float()).abs().mean(dim=1)  # [B, H, W]
    return float(diff[outside].mean())


def part_ious(pred: Tensor, gt: Tensor, num_parts: int, ignore_background: bool = True) -> Dict[int, float]:
    """IoU of each label (1..num_parts, plus 0 unless ``ignore_background``) present in ``gt`` or ``pred``.

    pred, gt: Long[...] of the same shape; GT pixels < 0 are ignored."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape; got {list(pred.shape)}, {list(gt.shape)}")
    valid = gt >= 0
    pred, gt = pred.to(gt.device)[valid].long(), gt[valid].long()
    out: Dict[int, float] = {}
    for label in range(0 if not ignore_background else 1, num_parts + 1):
        p, g = pred == label, gt == label
        union = int((p | g).sum())
        if union:
            out[label] = int((p & g).sum()) / union
    return out


def part_miou(pred: Tensor, gt: Tensor, num_parts: int, ignore_background: bool = True) -> float:
    """Mean of :func:`part_ious` (NaN when no part is in the GT nor predicted)."""
    ious = part_ious(pred, gt, num_parts, ignore_background)
    return sum(ious.values()) / len(ious) if ious else math.nan


# ---------------------------------------------------------------------------------------------------------- report


def _to_uint8(image: Tensor) -> np.ndarray:
    """Float[3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def edit_grid(before: Tensor, after: Tensor, masks2d: Tensor, max_views: int = 8) -> np.ndarray:
    """uint8 [rows * H, 4 * W, 3]: one row per view (up to ``max_views``) with the columns :data:`GRID_COLUMNS`."""
    rows: List[np.ndarray] = []
    for v in range(min(before.shape[0], max_views)):
        b, a = before[v].float().cpu(), after[v].float().cpu()
        m = masks2d[v].cpu().bool()
        overlay = torch.where(m[None], 0.5 * a + 0.5 * torch.tensor([1.0, 0.0, 1.0])[:, None, None], 0.4 * a)
        diff = ((a - b).abs() * 4.0).clamp(0, 1)
        rows.append(np.concatenate([_to_uint8(x) for x in (b, a, overlay, diff)], axis=1))
    return np.concatenate(rows, axis=0)


def _json_number(value: float) -> Union[float, None]:
    value = float(value)
    return value if math.isfinite(value) else None


def write_edit_report(
    out_dir: Union[str, Path],
    metrics: Mapping[str, float],
    before: Tensor,
    after: Tensor,
    masks2d: Tensor,
    provider_name: str,
    prompt: str,
    max_views: int = 8,
    mask_name: str = "part mask",
    title: str = "Part edit report",
) -> Path:
    """Write ``edit_report.json``, ``edit_report.md`` and ``edit_grid.png`` to ``out_dir`` (each atomically).

    JSON keys: prompt, provider (which 2D editor made the targets), metrics (name -> value, NaN as null), num_views,
    grid (file name), grid_columns. before/after: Float[B, 3, H, W] renders at the same poses; masks2d: Bool[B, H, W],
    shown in the third column as ``mask_name``. Returns the JSON path."""
    from PIL import Image

    before, after = _images(before, "before"), _images(after, "after")
    if masks2d.ndim == 2:
        masks2d = masks2d[None]
    if before.shape != after.shape or masks2d.shape[0] != before.shape[0]:
        raise ValueError("before, after and masks2d must hold the same views")
    out_dir = Path(out_dir)
    grid = Image.fromarray(edit_grid(before, after, masks2d, max_views))
    atomic_write(out_dir / REPORT_GRID, lambda handle: grid.save(handle, format="PNG"))
    values = {str(k): _json_number(v) for k, v in metrics.items()}
    columns = [GRID_COLUMNS[0], GRID_COLUMNS[1], mask_name, GRID_COLUMNS[3]]
    report = {
        "prompt": prompt,
        "provider": provider_name,
        "metrics": values,
        "num_views": int(before.shape[0]),
        "grid": REPORT_GRID,
        "grid_columns": columns,
    }
    lines = [
        f"# {title}",
        "",
        f"- prompt: `{prompt}`",
        f"- 2D edit provider: `{provider_name}`",
        f"- views: {before.shape[0]} (grid shows {min(before.shape[0], max_views)})",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {'n/a' if v is None else f'{v:.4f}'} |" for k, v in values.items()],
        "",
        f"Columns: {', '.join(columns)}.",
        "",
        f"![before / after]({REPORT_GRID})",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(out_dir / REPORT_MD, lambda handle: handle.write(text), mode="w")
    return write_json_atomic(out_dir / REPORT_JSON, report)
