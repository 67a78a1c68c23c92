"""Super-anchor clustering: graph mean-shift, vectorised union-find, fragment merge (segmentation-methods.md §2.8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsstudio_ext.core.clustering import (
    SuperAnchors,
    cluster_super_anchors,
    graph_mean_shift,
    merge_fragments,
    union_find,
)
from gsstudio_ext.core.graph import radius_graph

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """ARI from the contingency table (Hubert and Arabie)."""
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a.cpu(), b.cpu()), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        return (x * (x - 1) / 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), a.numel() * (a.numel() - 1) / 2
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


def purity(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of nodes whose predicted cluster's majority true label equals their own."""
    hits = 0
    for c in torch.unique(pred):
        hits += int(torch.bincount(truth[pred == c]).max())
    return hits / truth.numel()


def canonical(labels: torch.Tensor) -> list[int]:
    """Relabel by order of first appearance, so two partitions compare with ==."""
    seen: dict[int, int] = {}
    return [seen.setdefault(v, len(seen)) for v in labels.tolist()]


def five_cluster_scene(device: str, noise: float = 0.002, seed: int = 0):
    """2500 points in five unit slabs along x; each slab's anchors share a unit feature in D=8, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(2500, 3, generator=gen) * torch.tensor([5.0, 1.0, 1.0])
    truth = points[:, 0].floor().long().clamp_max(4)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0][:5]  # 5 orthonormal directions
    feats = F.normalize(basis[truth] + noise * torch.randn(2500, 8, generator=gen), dim=-1)
    return points.to(device), feats.to(device), truth.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_shift_union_find_recovers_five_clusters(device: str) -> None:
    points, feats, truth = five_cluster_scene(device)
    edges = radius_graph(points, 0.2)
    unmerged = cluster_super_anchors(points, feats, edges, min_size=1)  # mean-shift + union-find alone
    assert adjusted_rand_index(unmerged.labels, truth) == pytest.approx(1.0)
    result = cluster_super_anchors(points, feats, edges)
    assert isinstance(result, SuperAnchors)
    assert result.labels.shape == truth.shape and result.labels.device == truth.device
    assert adjusted_rand_index(result.labels, truth) == pytest.approx(1.0)
    assert purity(result.labels.cpu(), truth.cpu()) == 1.0
    assert sorted(result.sizes.tolist()) == sorted(torch.bincount(truth).tolist())
    assert result.sizes.sum() == 2500 and result.centers.shape == (5, 3) and result.features.shape == (5, 8)
    for s in range(5):
        members = result.labels == s
        assert torch.allclose(result.centers[s], points[members].mean(0), atol=1e-5)
        assert torch.allclose(result.features[s], result.peaks[members].mean(0), atol=1e-5)
    # Peaks are unit vectors close to their slab's direction.
    assert torch.allclose(result.peaks.norm(dim=-1), torch.ones(2500, device=device), atol=1e-5)


def test_mean_shift_fixed_points_and_convergence() -> None:
    same = F.normalize(torch.ones(6, 3), dim=-1)
    edges = torch.tensor([[0, 1], [1, 2], [3, 4]])
    assert torch.allclose(graph_mean_shift(same, edges), same)
    # Two close features on one edge share one mode, the normalised midpoint; an isolated node stays put.
    f = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.02, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    peaks = graph_mean_shift(f, torch.tensor([[0, 1]]))
    mid = F.normalize(f[0] + f[1], dim=0)
    assert torch.allclose(peaks[0], mid, atol=1e-4) and torch.allclose(peaks[1], mid, atol=1e-4)
    assert torch.allclose(peaks[2], f[2])
    # A far neighbour (distance sqrt(2) >> bandwidth) has no pull.
    peaks = graph_mean_shift(f, torch.tensor([[0, 2]]))
    assert torch.allclose(peaks, f, atol=1e-6)
    # Without normalisation the peaks are plain weighted means.
    raw = graph_mean_shift(torch.tensor([[0.0], [0.01]]), torch.tensor([[0, 1]]), normalize=False)
    assert torch.allclose(raw, torch.full((2, 1), 0.005), atol=1e-4)


def test_union_find_matches_scipy_components() -> None:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    gen = torch.Generator().manual_seed(3)
    num = 3000
    edges = torch.randint(0, num, (2200, 2), generator=gen)
    labels = union_find(num, edges)
    adj = coo_matrix((torch.ones(len(edges)).numpy(), (edges[:, 0].numpy(), edges[:, 1].numpy())), shape=(num, num))
    count, ref = connected_components(adj, directed=False)
    assert int(labels.max()) + 1 == count
    assert canonical(labels) == canonical(torch.from_numpy(ref))
    assert labels.tolist() == canonical(labels)  # numbered by each component's smallest node id
    assert union_find(4, torch.zeros(0, 2, dtype=torch.long)).tolist() == [0, 1, 2, 3]


def test_union_find_long_shuffled_chain() -> None:
    """A 100k-node path with random ids (diameter 1e5) is one component: pointer jumping, not label diffusion."""
    num = 100_000
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(4))
    edges = torch.stack([perm[:-1], perm[1:]], dim=1)
    assert union_find(num, edges).max() == 0
    two = union_find(num, torch.cat([edges[: num // 2 - 1], edges[num // 2 :]]))
    assert torch.bincount(two).tolist() == [num // 2, num // 2]


def test_merge_fragments_absorbs_small_clusters() -> None:
    # A = 0..11 and B = 12..23 are large; C = {24, 25} touches both but its peaks are closer to B;
    # D = {26} has no edge but lies next to B; E = {27} has no edge and is far from everything.
    labels = torch.tensor([0] * 12 + [1] * 12 + [2, 2, 3, 4])
    peaks = torch.zeros(28, 2)
    peaks[:12] = torch.tensor([1.0, 0.0])
    peaks[12:24] = torch.tensor([0.0, 1.0])
    peaks[24:26] = torch.tensor([0.1, 0.9])
    points = torch.zeros(28, 3)
    points[:, 0] = torch.arange(28).float()
    points[26] = torch.tensor([12.0, 0.5, 0.0])  # nearest large node: 12 (B)
    points[27] = torch.tensor([100.0, 0.0, 0.0])
    edges = torch.cat([chain_edges(0, 12), chain_edges(12, 24), torch.tensor([[0, 24], [24, 25], [12, 25]])])
    merged = merge_fragments(labels, peaks, points, edges, min_size=10, max_dist=5.0)
    assert merged.tolist() == [0] * 12 + [1] * 12 + [1, 1, 1, 2]
    merged = merge_fragments(labels, peaks, points, edges, min_size=10, max_dist=None)  # no limit: E joins too
    assert merged.tolist() == [0] * 12 + [1] * 16
    # The edge of smallest peak distance decides, not the first edge: make C's peaks closer to A.
    peaks[24:26] = torch.tensor([0.9, 0.1])
    assert merge_fragments(labels, peaks, points, edges, max_dist=5.0)[24:26].tolist() == [0, 0]
    # Nothing to do when every cluster is large or none is.
    assert merge_fragments(labels, peaks, points, edges, min_size=1).tolist() == labels.tolist()
    assert merge_fragments(labels, peaks, points, edges, min_size=100).tolist() == labels.tolist()


def test_merge_fragments_keeps_dissimilar_fragments_apart() -> None:
    """With a peak-distance cap, a noisy region next to two objects stays out of both and joins up on its own."""
    # A = 0..11 and B = 12..23 are large objects; the "floor" 24..29 is six singletons with peaks far from both
    # objects, chained to each other and touching A and B.
    labels = torch.tensor([0] * 12 + [1] * 12 + [2, 3, 4, 5, 6, 7])
    peaks = torch.zeros(30, 3)
    peaks[:12, 0] = 1.0
    peaks[12:24, 1] = 1.0
    peaks[24:, 2] = 1.0
    peaks[24:, 0] = torch.linspace(0.0, 0.3, 6)  # the floor's features drift, but slowly
    points = torch.zeros(30, 3)
    points[:, 0] = torch.arange(30).float()
    edges = torch.cat([chain_edges(0, 12), chain_edges(12, 24), chain_edges(24, 30), torch.tensor([[0, 24], [12, 29]])])
    uncapped = merge_fragments(labels, peaks, points, edges, min_size=10)
    assert set(uncapped[24:].tolist()) <= {0, 1}  # the paper's rule splits the floor among the objects
    capped = merge_fragments(labels, peaks, points, edges, min_size=10, max_peak_dist=0.5)
    assert capped.tolist() == [0] * 12 + [1] * 12 + [2] * 6
    # A fragment similar to an object still joins it.
    peaks[29] = peaks[12]
    capped = merge_fragments(labels, peaks, points, edges, min_size=10, max_peak_dist=0.5)
    assert capped[29] == 1 and capped[24:29].tolist() == [2] * 5


def chain_edges(start: int, stop: int) -> torch.Tensor:
    return torch.stack([torch.arange(start, stop - 1), torch.arange(start + 1, stop)], dim=1)


def test_cluster_super_anchors_merges_noisy_fragments() -> None:
    """Anchors with off-peak features form fragments that the merge step returns to their slab's cluster."""
    points, feats, truth = five_cluster_scene("cpu", seed=5)
    gen = torch.Generator().manual_seed(6)
    noisy = torch.randperm(2500, generator=gen)[:40]
    feats = feats.clone()
    feats[noisy] = F.normalize(feats[noisy] + 0.3 * torch.randn(40, 8, generator=gen), dim=-1)
    edges = radius_graph(points, 0.2)
    assert len(cluster_super_anchors(points, feats, edges, min_size=1).sizes) > 20  # fragments without the merge
    result = cluster_super_anchors(points, feats, edges, max_dist=1.0)
    assert (result.sizes >= 10).all()
    assert int(result.labels.max()) + 1 == 5
    assert purity(result.labels, truth) > 0.99
    with pytest.raises(ValueError, match="disagree"):
        cluster_super_anchors(points[:10], feats, edges)
