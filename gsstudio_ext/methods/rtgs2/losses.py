"""RT-GS2 Stage B losses: label-smoothed cross-entropy and the CeCo centre-collapse regulariser with a fixed
simplex-ETF classifier.

Cross-scene training: CE with label smoothing 0.15. Per-scene fine-tuning: CE (smoothing 0) + 0.4 x CeCo.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CROSS_SCENE_LABEL_SMOOTHING = 0.15
FINETUNE_CECO_WEIGHT = 0.4


def segmentation_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.15, ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy over labelled pixels.

    Args:
        logits: Float[B, C, H, W].
        labels: Long[B, H, W]; ``ignore_index`` pixels do not count.
        label_smoothing: weight of the uniform target (loss = (1-e) CE + e mean_c -log p_c).

    Returns:
        Scalar; 0 (still attached to ``logits``) when no pixel is labelled.
    """
    if logits.ndim != 4 or labels.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"logits [B, C, H, W] and labels [B, H, W] do not match: {logits.shape} vs {labels.shape}")
    labels = labels.long()
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing)


def etf_classifier(
    dim: int, num_classes: int, alpha: float = 1.0, generator: Optional[torch.Generator] = None
) -> Tensor:
    """A fixed simplex equiangular tight frame W* Float[dim, C]: random orthonormal basis U (QR of a Gaussian matrix)
    times (I - 11^T / C), scaled so every column has norm sqrt(alpha); pairwise cosines are -1 / (C - 1).

    The spec writes the scale as sqrt(alpha (C-1) / C); the factor that gives the simplex unit-norm columns (the
    neural-collapse ETF that CeCo uses) is sqrt(alpha C / (C-1)), which is what is applied here.
    """
    if num_classes < 2:
        raise ValueError(f"an ETF needs at least 2 classes, got {num_classes}")
    if dim < num_classes:
        raise ValueError(f"an ETF with a random orthonormal basis needs dim >= num_classes, got {dim} < {num_classes}")
    gaussian = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(gaussian)  # [dim, C], orthonormal columns
    centre = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    etf = basis @ centre * math.sqrt(alpha * num_classes / (num_classes - 1))
    return etf.float()


def ceco_loss(embedding: Tensor, labels: Tensor, etf: Tensor, ignore_index: int = -1) -> Tensor:
    """CeCo: cross-entropy of the class centres of ``embedding`` classified by the fixed ETF.

    Args:
        embedding: Float[B, D, h, w] decoder features.
        labels: Long[B, H, W], nearest-resized to h x w; ``ignore_index`` pixels do not count.
        etf: Float[D, C] from :func:`etf_classifier`.

    Returns:
        Scalar mean CE over the classes present in the batch (0, attached, when none is).
    """
    b, d, h, w = embedding.shape
    if etf.shape[0] != d:
        raise ValueError(f"ETF rows {etf.shape[0]} != embedding width {d}")
    if labels.shape[-2:] != (h, w):
        labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    labels = labels.long().reshape(-1)
    feats = embedding.permute(0, 2, 3, 1).reshape(-1, d)
    keep = (labels != ignore_index) & (labels >= 0) & (labels < etf.shape[1])
    if not bool(keep.any()):
        return embedding.sum() * 0.0
    labels, feats = labels[keep], feats[keep]
    classes, index = torch.unique(labels, return_inverse=True)
    sums = feats.new_zeros(classes.numel(), d).index_add_(0, index, feats)
    counts = torch.bincount(index, minlength=classes.numel()).to(feats.dtype)
    centres = sums / counts[:, None]
    return F.cross_entropy(centres @ etf.to(centres), classes)


def rtgs2_loss(
    logits: Tensor,
    labels: Tensor,
    embedding: Optional[Tensor] = None,
    etf: Optional[Tensor] = None,
    label_smoothing: float = CROSS_SCENE_LABEL_SMOOTHING,
    ceco_weight: float = 0.0,
) -> Dict[str, Tensor]:
    """Stage B loss dict: ``ce``, optional ``ceco`` (weighted), ``total``. Fine-tuning: smoothing 0, ceco_weight 0.4."""
    out = {"ce": segmentation_loss(logits, labels, label_smoothing)}
    if ceco_weight > 0:
        if embedding is None or etf is None:
            raise ValueError("ceco_weight > 0 needs the decoder embedding and the ETF classifier")
        out["ceco"] = ceco_weight * ceco_loss(embedding, labels, etf)
    out["total"] = sum(out.values())  # type: ignore[assignment]
    return out
