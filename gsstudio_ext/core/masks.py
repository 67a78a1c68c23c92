"""Binary-mask set operations: pairwise overlaps and the mask NMS used to clean SAM proposals.

:func:`mask_nms` follows AG2aussian's ``extract_datas_masks_v5.py`` (segmentation-methods.md §2.2): masks are
ranked by score (stability x predicted IoU); a mask is dropped when its score is at or below a floor, when its IoU
with any higher-scored mask exceeds a threshold, or when it lies inside another mask (covers >= 85 % of itself
inside the other while the other has < 50 % of its area in it) with containment penalty
``1 - (I/A_i)(I/A_j)`` above ``1 - inner_thresh``. The tests are evaluated against all candidates at once
(matrix NMS), not greedily against the kept ones, exactly as the reference does.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[np.ndarray, Tensor]


def _as_bool_tensor(masks: ArrayLike) -> Tensor:
    t = torch.as_tensor(masks)
    if t.ndim != 3:
        raise ValueError(f"masks must have shape [M, H, W], got {tuple(t.shape)}")
    return t.bool()


def pairwise_intersection(masks: ArrayLike, chunk_pixels: int = 1 << 22) -> Tensor:
    """Pixel counts of pairwise intersections.

    Args:
        masks: Bool[M, H, W].
        chunk_pixels: bound on M x pixels handled per matmul (keeps memory flat for large images).

    Returns:
        Float[M, M] where entry (i, j) = |mask_i AND mask_j|.
    """
    m = _as_bool_tensor(masks)
    n = m.shape[0]
    flat = m.reshape(n, -1)
    out = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    step = max(1, chunk_pixels // max(n, 1))
    for start in range(0, flat.shape[1], step):
        block = flat[:, start : start + step].float()
        out += (block @ block.T).double()
    return out.float()


def pairwise_mask_iou(masks: ArrayLike) -> Tensor:
    """Float[M, M] IoU between all pairs of masks (0 where both are empty)."""
    m = _as_bool_tensor(masks)
    inter = pairwise_intersection(m)
    area = m.reshape(m.shape[0], -1).sum(1).float()
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


def mask_nms(
    masks: ArrayLike,
    scores: ArrayLike,
    iou_thresh: float = 0.8,
    score_thresh: float = 0.7,
    inner_thresh: Optional[float] = 0.5,
    inner_cover: float = 0.85,
    outer_cover: float = 0.5,
) -> Tensor:
    """AG2aussian-style mask non-maximum suppression.

    Args:
        masks: Bool[M, H, W] candidate masks.
        scores: Float[M], higher is better (AG2aussian uses stability_score * predicted_iou).
        iou_thresh: drop a mask whose IoU with any higher-scored mask exceeds this.
        score_thresh: drop a mask whose score is <= this.
        inner_thresh: drop a contained mask when its containment penalty exceeds ``1 - inner_thresh``;
            None disables the containment test.
        inner_cover: fraction of the contained mask that must lie inside the container (>=).
        outer_cover: fraction of the container covered by the contained mask must stay below this (<).

    Returns:
        Long[K] indices into ``masks`` of the kept masks, by descending score.
    """
    m = _as_bool_tensor(masks)
    s = torch.as_tensor(scores, dtype=torch.float32, device=m.device).reshape(-1)
    if s.shape[0] != m.shape[0]:
        raise ValueError(f"got {m.shape[0]} masks but {s.shape[0]} scores")
    n = m.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=m.device)
    order = torch.sort(s, descending=True, stable=True).indices
    m, s = m[order], s[order]

    inter = pairwise_intersection(m)
    area = m.reshape(n, -1).sum(1).float()
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    # Duplicate test: column j against every higher-ranked row i < j.
    dup = torch.triu(iou, diagonal=1).amax(dim=0) > iou_thresh
    keep = ~dup & (s > score_thresh)

    if inner_thresh is not None:
        # cover[i, j] = fraction of mask i that lies inside mask j.
        cover = torch.where(area[:, None] > 0, inter / area[:, None].clamp_min(1.0), torch.zeros_like(inter))
        contained = (cover >= inner_cover) & (cover.T < outer_cover)
        contained.fill_diagonal_(False)
        penalty = torch.where(contained, 1.0 - cover * cover.T, torch.zeros_like(cover))
        keep &= ~(penalty.amax(dim=1) > 1.0 - inner_thresh)
    return order[keep]


def drop_small_masks(
    masks: ArrayLike,
    min_area: int = 25,
    alpha: Optional[ArrayLike] = None,
    alpha_thresh: float = 0.1,
) -> Tuple[Tensor, Tensor]:
    """Clear transparent pixels (RGBA images) and drop masks with at most ``min_area`` pixels.

    Args:
        masks: Bool[M, H, W].
        min_area: masks with <= this many pixels (after alpha clearing) are dropped.
        alpha: optional Float[H, W] in 0..1 (or uint8 0..255); pixels below ``alpha_thresh`` are cleared.
        alpha_thresh: transparency cut in 0..1.

    Returns:
        (Bool[K, H, W] kept masks, Long[K] their indices in the input).
    """
    m = _as_bool_tensor(masks)
    if alpha is not None:
        a = torch.as_tensor(alpha, device=m.device)
        a = a.float() / 255.0 if a.dtype == torch.uint8 else a.float()
        if a.shape != m.shape[1:]:
            raise ValueError(f"alpha has shape {tuple(a.shape)}, masks are {tuple(m.shape[1:])}")
        m = m & (a >= alpha_thresh)[None]
    idx = torch.nonzero(m.reshape(m.shape[0], -1).sum(1) > min_area).reshape(-1)
    return m[idx], idx


def dilate_mask(mask: Tensor, radius: int) -> Tensor:
    """Bool mask [..., H, W] grown by ``radius`` pixels with a square (Chebyshev) structuring element."""
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    mask = mask.bool()
    if radius == 0:
        return mask.clone()
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    x = torch.nn.functional.max_pool2d(x, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return (x > 0.5).reshape(mask.shape)


def erode_mask(mask: Tensor, radius: int) -> Tensor:
    """Bool mask [..., H, W] shrunk by ``radius`` pixels (square element; outside the image counts as inside)."""
    return ~dilate_mask(~mask.bool(), radius)
