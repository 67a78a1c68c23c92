"""3-D group <-> 2-D mask language association in one render per view (segmentation spec §2.9 with §2.14.2).

The official OpenGaussian-style association renders every view once per 3 super-anchors (groups), thresholds the
render into a mask and scores it against each SAM mask: score = IoU x (1 - |mu_F(group) - mu_F(mask)|_1). Here
the hard IoU becomes a soft IoU from per-Gaussian blend-weight sums (`core.contributions`, one rasterization per
view): W[s, m] = sum of the blend weights of group s's Gaussians inside mask m, F[s] = the group's footprint,
soft-IoU = W / (F + |m| - W). Best mask per group per view, matched if score > 0.3, and the aggregated embedding

    c_s = sum_v emb[v, m_v] (1.0 a_v + 0.1 matched_v) / (sum_v score_v + 0.1 #matched + 1e-6),
    a_v = softmax_v(10 score_v) * sum_v score_v,

with unmatched views' scores zeroed and their embeddings left out. Every group is processed (the official loop
skips the last super-anchor; not reproduced). Views are streamed: memory is O(S x E), not O(S x V x E).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from gsstudio_ext.core.contributions import contributions_and_footprint


@dataclass
class AssociationConfig:
    """Thresholds and weights of the §2.9 aggregation (defaults are the official values)."""

    match_threshold: float = 0.3
    """A group's best mask in a view counts as matched when its score is above this (score zeroed otherwise)."""
    softmax_temperature: float = 10.0
    """View weights a_v = softmax_v(temperature * score_v) * sum_v score_v."""
    view_weight: float = 1.0
    """Weight of a_v in the aggregation."""
    matched_bonus: float = 0.1
    """Extra weight per matched view (numerator) and per match (denominator)."""
    eps: float = 1e-6
    """Added to the aggregation's denominator."""
    use_feature_consistency: bool = True
    """Multiply the soft IoU by clamp(1 - |mu_F(group) - mu_F(mask)|_1, 0) when instance features are available."""


@dataclass
class AssociationView:
    """One view's inputs. Shapes: N Gaussians, M masks, E embedding dims, S groups, F instance-feature dims."""

    contributions: Tensor
    """[N, M] per-Gaussian blend-weight sums inside each mask (`core.contributions`)."""
    footprint: Tensor
    """[N] per-Gaussian blend-weight sums over the whole image."""
    mask_pixel_counts: Tensor
    """[M] pixels per mask (|m|)."""
    mask_embeddings: Tensor
    """[M, E] one embedding per mask (CLIP or the label stand-in)."""
    mask_features: Optional[Tensor] = None
    """[M, F] mean rendered instance feature inside each mask; derived from `instance_features` when None."""
    group_features: Optional[Tensor] = None
    """[S, F] mean instance feature of each group in this view; derived from `instance_features` when None."""


@dataclass
class GroupEmbeddings:
    """Result of `associate_groups` (S groups, V views, E embedding dims)."""

    embeddings: Tensor
    """[S, E] aggregated embeddings (zero for groups never matched; not normalised)."""
    scores: Tensor
    """[S, V] best score per view (zeroed where not matched)."""
    matched: Tensor
    """[S, V] bool: the best mask's score was above the threshold."""
    best_mask: Tensor
    """[S, V] long: index of the best mask in each view (-1 for a view without masks)."""
    unmatched_groups: Tensor
    """[K] long: groups matched in no view (their embedding is zero)."""
    soft_iou: list[Tensor] = field(default_factory=list)
    """Per view [S, M_v] soft IoU (only with keep_soft_iou=True)."""


def group_mask_overlap(
    contributions: Tensor, footprint: Tensor, group_of_gaussian: Tensor, num_groups: int
) -> tuple[Tensor, Tensor]:
    """Scatter-add per-Gaussian sums into groups -> W [S, M] (group weight inside each mask), footprint [S].

    Gaussians with group -1 are ignored."""
    keep = group_of_gaussian >= 0
    idx = group_of_gaussian[keep]
    W = contributions.new_zeros(num_groups, contributions.shape[1]).index_add_(0, idx, contributions[keep])
    fp = footprint.new_zeros(num_groups).index_add_(0, idx, footprint[keep])
    return W, fp


def soft_iou(W: Tensor, group_footprint: Tensor, mask_pixel_counts: Tensor) -> Tensor:
    """Soft IoU [S, M] = W / (|group footprint| + |m| - W); 0 where both are empty."""
    union = group_footprint[:, None] + mask_pixel_counts.to(W.dtype)[None, :] - W
    return torch.where(union > 0, W / union.clamp_min(1e-12), torch.zeros_like(W))


def view_from_render(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    masks: Tensor,
    mask_embeddings: Tensor,
    mask_features: Optional[Tensor] = None,
    **rasterize_kwargs: Any,
) -> AssociationView:
    """Build one view's `AssociationView` from its masks [M, H, W] with ONE rasterization (M <= 32)."""
    if mask_embeddings.dim() != 2 or mask_embeddings.shape[0] != masks.shape[0]:
        raise ValueError(
            f"view_from_render: mask_embeddings must be [M={masks.shape[0]}, E], got {tuple(mask_embeddings.shape)}"
        )
    contrib, fp = contributions_and_footprint(
        means, quats, scales, opacities, viewmat, K, width, height, masks, **rasterize_kwargs
    )
    counts = masks.flatten(1).to(contrib.dtype).sum(1)
    return AssociationView(contrib, fp, counts, mask_embeddings, mask_features=mask_features)


def _check_view(v: int, view: AssociationView, n: int) -> None:
    m = view.contributions.shape[1] if view.contributions.dim() == 2 else -1
    ok = view.contributions.dim() == 2 and view.contributions.shape[0] == n and view.footprint.shape == (n,)
    ok = ok and view.mask_pixel_counts.shape == (m,) and view.mask_embeddings.dim() == 2
    ok = ok and view.mask_embeddings.shape[0] == m
    if not ok:
        raise ValueError(
            f"associate_groups: view {v} has contributions {tuple(view.contributions.shape)}, footprint "
            f"{tuple(view.footprint.shape)}, mask_pixel_counts {tuple(view.mask_pixel_counts.shape)}, "
            f"mask_embeddings {tuple(view.mask_embeddings.shape)}; expected [N={n}, M], [N], [M], [M, E]"
        )


def _consistency(
    view: AssociationView, W: Tensor, fp: Tensor, group_of_gaussian: Tensor, num_groups: int, feats: Optional[Tensor]
) -> Optional[Tensor]:
    """[S, M] factor clamp(1 - |mu_F(group) - mu_F(mask)|_1, 0), or None without features.

    From per-Gaussian features f_i: mu_F(mask m) = sum_i contrib[i, m] f_i / |m| (the exact mean of the rendered
    feature over the mask, zero background); mu_F(group s) = footprint-weighted mean of the group's own features."""
    mf, gf = view.mask_features, view.group_features
    if feats is not None and mf is None:
        mf = view.contributions.T.to(feats.dtype) @ feats / view.mask_pixel_counts.to(feats.dtype).clamp_min(1)[:, None]
    if feats is not None and gf is None:
        keep = group_of_gaussian >= 0
        wf = (view.footprint[keep, None].to(feats.dtype)) * feats[keep]
        gf = wf.new_zeros(num_groups, feats.shape[1]).index_add_(0, group_of_gaussian[keep], wf)
        gf = gf / fp.to(feats.dtype).clamp_min(1e-12)[:, None]
    if mf is None or gf is None:
        return None
    dist = (gf[:, None, :] - mf[None, :, :]).abs().sum(-1)
    return (1.0 - dist).clamp_min(0.0).to(W.dtype)


def associate_groups(
    group_of_gaussian: Tensor,
    num_groups: int,
    views: Iterable[AssociationView],
    config: Optional[AssociationConfig] = None,
    instance_features: Optional[Tensor] = None,
    keep_soft_iou: bool = False,
) -> GroupEmbeddings:
    """Aggregate per-mask embeddings onto 3-D groups (§2.9 aggregation, §2.14 soft IoU), streaming over views.

    Args:
        group_of_gaussian [N] long: group id per Gaussian in [0, num_groups), -1 = no group.
        num_groups: S.
        views: `AssociationView`s (e.g. a generator of `view_from_render(...)`, one rasterization each).
        config: thresholds and weights (official defaults).
        instance_features [N, F]: per-Gaussian instance features for the consistency term (optional).
        keep_soft_iou: also return every view's [S, M] soft-IoU matrix.
    """
    cfg = config or AssociationConfig()
    if group_of_gaussian.dim() != 1:
        raise ValueError(f"associate_groups: group_of_gaussian must be [N], got {tuple(group_of_gaussian.shape)}")
    n = group_of_gaussian.shape[0]
    group_of_gaussian = group_of_gaussian.long()
    if n and (group_of_gaussian.min() < -1 or group_of_gaussian.max() >= num_groups):
        raise ValueError(f"associate_groups: group ids must be in [-1, {num_groups}), got "
                         f"[{int(group_of_gaussian.min())}, {int(group_of_gaussian.max())}]")  # fmt: skip
    if instance_features is not None and (instance_features.dim() != 2 or instance_features.shape[0] != n):
        raise ValueError(f"associate_groups: instance_features must be [N={n}, F], got "
                         f"{tuple(instance_features.shape)}")  # fmt: skip
    feats = instance_features if cfg.use_feature_consistency else None
    T = cfg.softmax_temperature
    scores, matched, best = [], [], []
    ious: list[Tensor] = []
    num = None  # sum_v emb_v exp(T (s_v - 1))  [S, E]   (scores <= 1, so no overflow)
    bonus = None  # sum_v emb_v matched_v        [S, E]
    for v, view in enumerate(views):
        _check_view(v, view, n)
        gid = group_of_gaussian.to(view.contributions.device)
        W, fp = group_mask_overlap(view.contributions, view.footprint, gid, num_groups)
        iou = soft_iou(W, fp, view.mask_pixel_counts)
        score = iou
        if cfg.use_feature_consistency:
            factor = _consistency(view, W, fp, gid, num_groups, feats)
            if factor is not None:
                score = iou * factor
        if keep_soft_iou:
            ious.append(iou)
        if score.shape[1] == 0:
            s_v = score.new_zeros(num_groups)
            m_v = torch.full((num_groups,), -1, dtype=torch.long, device=score.device)
        else:
            s_v, m_v = score.max(dim=1)
        hit = s_v > cfg.match_threshold
        s_v = torch.where(hit, s_v, torch.zeros_like(s_v))
        emb = view.mask_embeddings.float()
        if num is None:
            num = emb.new_zeros(num_groups, emb.shape[1])
            bonus = emb.new_zeros(num_groups, emb.shape[1])
        if emb.shape[1] != num.shape[1]:
            raise ValueError(f"associate_groups: view {v} has E={emb.shape[1]}, earlier views E={num.shape[1]}")
        chosen = emb[m_v.clamp_min(0)] * hit[:, None].to(emb.dtype) if emb.shape[0] else torch.zeros_like(num)
        num = num + chosen * torch.exp(T * (s_v.float() - 1.0))[:, None]
        bonus = bonus + chosen
        scores.append(s_v.float())
        matched.append(hit)
        best.append(m_v)
    if num is None or bonus is None:
        raise ValueError("associate_groups: no views given")
    S = torch.stack(scores, dim=1)  # [S, V]
    Mt = torch.stack(matched, dim=1)
    score_sum = S.sum(1)
    Z = torch.exp(T * (S - 1.0)).sum(1)  # softmax normaliser (same shift as num)
    a_part = num * (score_sum / Z)[:, None]  # sum_v emb_v a_v
    denom = score_sum + cfg.matched_bonus * Mt.sum(1).float() + cfg.eps
    emb_out = (cfg.view_weight * a_part + cfg.matched_bonus * bonus) / denom[:, None]
    any_match = Mt.any(1)
    emb_out = torch.where(any_match[:, None], emb_out, torch.zeros_like(emb_out))
    unmatched = torch.nonzero(~any_match).flatten()
    return GroupEmbeddings(emb_out, S, Mt, torch.stack(best, dim=1), unmatched, ious)
