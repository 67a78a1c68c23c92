"""core.association: one-render-per-view group <-> mask association (§2.9 aggregation with the §2.14 soft IoU)."""

from __future__ import annotations

import math

import pytest
import torch

from gsstudio_ext.core import contributions as contrib_mod
from gsstudio_ext.core.association import (
    AssociationConfig,
    AssociationView,
    associate_groups,
    group_mask_overlap,
    soft_iou,
    view_from_render,
)
from gsstudio_ext.core.rasterize import rasterize

W = H = 96
CENTRES = [(-1.2, 0.0, 0.0), (0.0, 0.1, 0.0), (1.2, -0.1, 0.0)]
ANGLES = [-0.25, 0.0, 0.25]


def _camera(angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orbit around the world y axis at distance 6, looking at the origin (OpenCV convention)."""
    c, s = math.cos(angle), math.sin(angle)
    vm = torch.eye(4)
    vm[:3, :3] = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    vm[2, 3] = 6.0
    K = torch.tensor([[150.0, 0.0, W / 2], [0.0, 150.0, H / 2], [0.0, 0.0, 1.0]])
    return vm[None], K[None]


def _blob_scene(per_blob: int = 200, radius: float = 0.4):
    """3 dense balls of Gaussians (groups 0-2), a group 3 behind every camera, and 2 ungrouped Gaussians (-1)."""
    g = torch.Generator().manual_seed(0)
    means, groups = [], []
    for k, c in enumerate(CENTRES + [(0.0, 0.0, -12.0)]):
        d = torch.randn(per_blob, 3, generator=g)
        d = d / d.norm(dim=1, keepdim=True) * radius * torch.rand(per_blob, 1, generator=g) ** (1 / 3)  # uniform
        means.append(torch.tensor(c) + d)
        groups.append(torch.full((per_blob,), k))
    means.append(torch.tensor([[0.0, 2.0, 0.0], [0.0, -2.0, 0.0]]))  # ungrouped, out of every mask
    groups.append(torch.full((2,), -1))
    means_t = torch.cat(means)
    n = means_t.shape[0]
    quats = torch.randn(n, 4, generator=g)
    scales = torch.full((n, 3), 0.06)
    opac = torch.full((n,), 0.97)
    return means_t, quats, scales, opac, torch.cat(groups)


def _blob_masks(means, quats, scales, opac, groups, vm, K) -> torch.Tensor:
    """Exact per-blob masks: render each blob alone, alpha > 0.5 -> [3, H, W]."""
    out = []
    for k in range(3):
        sel = groups == k
        _, alpha, _ = rasterize(
            means[sel], quats[sel], scales[sel], opac[sel], torch.ones(int(sel.sum()), 1), vm, K, W, H, backend="torch"
        )
        out.append(alpha[0, ..., 0] > 0.5)
    return torch.stack(out)


def test_blobs_get_their_own_embedding_one_render_per_view(monkeypatch: pytest.MonkeyPatch) -> None:
    means, quats, scales, opac, groups = _blob_scene()
    cams = [_camera(a) for a in ANGLES]
    masks_per_view = [_blob_masks(means, quats, scales, opac, groups, vm, K) for vm, K in cams]
    assert all(int(m.sum(dim=(1, 2)).min()) > 20 for m in masks_per_view)
    onehot = torch.eye(4)
    perms = [[0, 1, 2], [2, 0, 1], [1, 2, 0]]  # mask order differs per view
    calls: list[int] = []
    real = contrib_mod.rasterize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(contrib_mod, "rasterize", counting)

    def views():
        for (vm, K), masks, perm in zip(cams, masks_per_view, perms):
            background = ~masks.any(0, keepdim=True)
            m = torch.cat([masks[perm], background])
            emb = torch.cat([onehot[perm, :], onehot[3:]])  # blob k -> e_k, background -> e_3
            yield view_from_render(means, quats, scales, opac, vm, K, W, H, m, emb, backend="torch")

    res = associate_groups(groups, 4, views(), keep_soft_iou=True)
    assert len(calls) == len(ANGLES)  # one rasterization per view
    assert res.embeddings.shape == (4, 4) and res.scores.shape == (4, 3) and res.matched.shape == (4, 3)
    for k in range(3):
        cos = torch.nn.functional.cosine_similarity(res.embeddings[k], onehot[k], dim=0)
        assert cos > 0.99, (k, res.embeddings[k])
        assert res.matched[k].all()
    for v, perm in enumerate(perms):
        iou = res.soft_iou[v]  # [4, 4]: groups x (3 permuted blob masks + background)
        for k in range(3):
            right = perm.index(k)
            assert iou[k, right] > 0.8, (v, k, iou[k])
            wrong = [j for j in range(4) if j != right]
            assert iou[k, wrong].max() < 0.05, (v, k, iou[k])
            assert res.best_mask[k, v] == right
    # the hidden group: never matched, zero embedding, reported
    assert res.unmatched_groups.tolist() == [3]
    assert torch.equal(res.embeddings[3], torch.zeros(4))
    assert not res.matched[3].any() and torch.equal(res.scores[3], torch.zeros(3))


def _reference_aggregate(scores: torch.Tensor, embs: torch.Tensor, thr=0.3, T=10.0) -> torch.Tensor:
    """Direct (non-streaming) §2.9 formula for one group: scores [V], embs [V, E] of the best masks."""
    matched = scores > thr
    s = torch.where(matched, scores, torch.zeros_like(scores))
    a = torch.softmax(T * s, 0) * s.sum()
    w = 1.0 * a + 0.1 * matched.float()
    e = embs * matched[:, None].float()
    return (e * w[:, None]).sum(0) / (s.sum() + 0.1 * matched.sum() + 1e-6)


def _view_from_overlap(Wsm: torch.Tensor, fp: torch.Tensor, counts: torch.Tensor, emb: torch.Tensor):
    """A view whose Gaussians are one per group (so per-Gaussian sums equal the group sums)."""
    return AssociationView(Wsm.clone(), fp.clone(), counts, emb)


def test_aggregation_formula_numbers() -> None:
    """Hand-built overlaps: soft IoU, best mask, threshold, softmax view weights and the final formula."""
    emb_a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    emb_b = torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    fp = torch.tensor([10.0, 8.0, 5.0])  # 3 groups, one Gaussian each
    # view 0: group 0 -> mask 0 IoU 8/(10+9-8)=0.727; group 1 -> mask 1 IoU 4/(8+8-4)=0.333; group 2 -> 0.1
    v0 = _view_from_overlap(torch.tensor([[8.0, 1.0], [0.0, 4.0], [1.0, 0.0]]), fp, torch.tensor([9.0, 8.0]), emb_a)
    # view 1: group 0 -> mask 1 IoU 5/(10+6-5)=0.4545; group 1 -> mask 0 IoU 2/(8+12-2)=0.111 (unmatched);
    # group 2 (the last group: the official loop would skip it) -> mask 1 IoU 4/(5+6-4)=0.571
    v1 = _view_from_overlap(torch.tensor([[0.0, 5.0], [2.0, 0.0], [0.0, 4.0]]), fp, torch.tensor([12.0, 6.0]), emb_b)
    res = associate_groups(torch.arange(3), 3, [v0, v1])
    iou = soft_iou(*group_mask_overlap(v0.contributions, v0.footprint, torch.arange(3), 3), v0.mask_pixel_counts)
    torch.testing.assert_close(iou[0, 0], torch.tensor(8.0 / 11.0))
    exp_scores = torch.tensor([[8 / 11, 5 / 11], [4 / 12, 0.0], [0.0, 4 / 7]])
    torch.testing.assert_close(res.scores, exp_scores)
    assert res.matched.tolist() == [[True, True], [True, False], [False, True]]
    assert res.best_mask.tolist() == [[0, 1], [1, 0], [0, 1]]
    raw = torch.tensor([[8 / 11, 5 / 11], [4 / 12, 2 / 18], [1 / 14, 4 / 7]])
    best = [[emb_a[0], emb_b[1]], [emb_a[1], emb_b[0]], [emb_a[0], emb_b[1]]]
    for s in range(3):
        expected = _reference_aggregate(raw[s], torch.stack(best[s]))
        torch.testing.assert_close(res.embeddings[s], expected, rtol=1e-5, atol=1e-6)
    assert res.unmatched_groups.numel() == 0
    # thresholds are parameters: with 0.5 group 1 is never matched and group 0 only in view 0
    strict = associate_groups(torch.arange(3), 3, [v0, v1], AssociationConfig(match_threshold=0.5))
    assert strict.unmatched_groups.tolist() == [1]
    expected0 = _reference_aggregate(raw[0], torch.stack(best[0]), thr=0.5)
    torch.testing.assert_close(strict.embeddings[0], expected0, rtol=1e-5, atol=1e-6)
    # one matched view out of two: its softmax weight is e^(10 s) / (e^(10 s) + 1), not 1
    s0 = 8 / 11
    w0 = math.exp(10 * s0) / (math.exp(10 * s0) + 1.0) * s0 + 0.1
    torch.testing.assert_close(strict.embeddings[0], emb_a[0] * w0 / (s0 + 0.1 + 1e-6))


def test_feature_consistency_term() -> None:
    """With per-Gaussian instance features, score = soft IoU x clamp(1 - |mu_F(group) - mu_F(mask)|_1, 0)."""
    # 2 Gaussians (groups 0, 1), 1 mask fully covered by Gaussian 0 with weight 0.5 per pixel over 10 px
    contrib = torch.tensor([[5.0], [0.0]])
    fp = torch.tensor([5.0, 3.0])
    view = AssociationView(contrib, fp, torch.tensor([10.0]), torch.tensor([[1.0, 0.0]]))
    feats = torch.tensor([[0.2, 0.0], [0.0, 1.0]])
    res = associate_groups(torch.tensor([0, 1]), 2, [view], instance_features=feats, keep_soft_iou=True)
    iou = 5.0 / (5.0 + 10.0 - 5.0)
    # mu_F(mask) = 5 * f_0 / 10 = (0.1, 0); mu_F(group 0) = f_0 = (0.2, 0): |diff|_1 = 0.1
    torch.testing.assert_close(res.soft_iou[0][0, 0], torch.tensor(iou))
    torch.testing.assert_close(res.scores[0, 0], torch.tensor(iou * 0.9))
    off = associate_groups(
        torch.tensor([0, 1]), 2, [view], AssociationConfig(use_feature_consistency=False), instance_features=feats
    )
    torch.testing.assert_close(off.scores[0, 0], torch.tensor(iou))
    # explicit per-view features override: far apart -> factor clamps to 0 -> unmatched
    view.group_features = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    view.mask_features = torch.tensor([[0.0, 0.0]])
    far = associate_groups(torch.tensor([0, 1]), 2, [view])
    assert far.unmatched_groups.tolist() == [0, 1]


def test_views_without_masks_and_bad_inputs() -> None:
    fp = torch.tensor([4.0, 0.0])
    empty = AssociationView(torch.zeros(2, 0), fp, torch.zeros(0), torch.zeros(0, 3))
    one = AssociationView(torch.tensor([[4.0], [0.0]]), fp, torch.tensor([4.0]), torch.tensor([[0.0, 0.0, 2.0]]))
    res = associate_groups(torch.tensor([0, -1]), 2, [empty, one])
    assert res.best_mask[0].tolist() == [-1, 0] and res.best_mask[1, 0] == -1
    assert res.unmatched_groups.tolist() == [1]
    s = 4.0 / (4.0 + 4.0 - 4.0)  # soft IoU 1 in view 1; view 0 (no masks) has score 0 but counts in the softmax
    w = math.exp(10 * s) / (math.exp(10 * s) + 1.0) * s + 0.1
    torch.testing.assert_close(res.embeddings[0], torch.tensor([0.0, 0.0, 2.0 * w / (s + 0.1 + 1e-6)]))
    assert torch.isfinite(res.embeddings).all()
    with pytest.raises(ValueError, match="group ids must be"):
        associate_groups(torch.tensor([0, 2]), 2, [one])
    with pytest.raises(ValueError, match="view 0"):
        associate_groups(torch.tensor([0, 1, 1]), 2, [one])
    with pytest.raises(ValueError, match="no views"):
        associate_groups(torch.tensor([0, 1]), 2, [])
