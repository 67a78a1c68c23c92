"""AG2aussian's training losses (spec segmentation-methods.md §1.2, §2.5), computed without custom kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def normalized_feature_map(features: Tensor, alpha: Tensor, alpha_min: float = 0.1) -> Tensor:
    """F / alpha, zero where alpha < alpha_min: features [H, W, D], alpha [H, W, 1] -> [H, W, D]."""
    valid = alpha >= alpha_min
    return torch.where(valid, features / alpha.clamp_min(alpha_min), torch.zeros_like(features))


def mask_losses(features: Tensor, masks: Tensor, eps: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mask smoothness and rank-weighted contrast of a feature map [H, W, D] under masks bool [K, H, W].

    Smoothness: (1 / (K H W)) sum_k sum_{p in k} ||F(p) - mu_k|| (Euclidean, not squared, mean over all K*H*W).
    Contrast: mean_{i != j} w_ij / (||mu_i - mu_j|| + eps), with w_ij = 0.1 + 0.9 * rank_ij / (K - 1), where the
    pairs of row i are ranked by ascending inverse distance (rank 0 = farthest), so confusable pairs weigh about 1.
    With fewer than two masks the contrast is 0 (the original code divides by zero).
    """
    K, H, W = masks.shape
    zero = features.sum() * 0.0
    if K == 0:
        return zero, zero
    # Dense over [K, H*W] (K is small): no nonzero(), so no host sync, and no index backward.
    flat = features.reshape(H * W, -1)
    weight = masks.reshape(K, H * W).to(flat.dtype)
    means = (weight @ flat) / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    distance = (flat[None] - means[:, None]).norm(dim=-1)  # [K, H*W]
    smooth = (weight * distance).sum() / (K * H * W)
    if K < 2:
        return smooth, zero
    inverse = 1.0 / (torch.cdist(means, means) + eps)
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=means.device)
    rows = inverse[off_diagonal].reshape(K, K - 1)
    ranks = rows.detach().argsort(dim=1).argsort(dim=1).to(rows.dtype)
    weights = 0.1 + 0.9 * ranks / (K - 1)
    return smooth, (weights * rows).mean()


def ndc_depth(z: Tensor, near: float = 0.2, far: float = 100.0) -> Tensor:
    """2DGS's NDC-mapped depth m = f / (f - n) * (1 - n / z) of camera-space depths z."""
    return far / (far - near) * (1.0 - near / z.clamp_min(1e-6))


def distortion_from_moments(moments: Tensor, alpha: Tensor) -> Tensor:
    """Depth distortion sum_i w_i sum_{j<i} w_j (m_i - m_j)^2 per pixel from rendered [sum w m, sum w m^2] [H, W, 2].

    Exact identity: sum_{i,j} w_i w_j (m_i - m_j)^2 / 2 = A * sum w m^2 - (sum w m)^2, with A = sum w (the alpha).
    """
    return alpha[..., 0] * moments[..., 1] - moments[..., 0] ** 2


def child_in_anchor_loss(offsets: Tensor, scales: Tensor, anchor_radius: Tensor, visible: Tensor) -> Tensor:
    """Keep children within one anchor radius and no larger than it: mean(exp(relu(|o| - 1)) - 1) +
    mean(relu(max scale - r)) over the ``visible`` children; offsets [N, 3] in radius units, scales [N, 3]
    activated, radius [N], visible [N] bool (a weight, not an index: no host sync)."""
    outside = torch.exp(torch.relu(offsets.norm(dim=-1) - 1.0)) - 1.0
    too_big = torch.relu(scales.amax(dim=-1) - anchor_radius)
    weight = visible.to(offsets.dtype)
    return ((outside + too_big) * weight).sum() / weight.sum().clamp_min(1.0)
