"""Anchor graph (radius graph, k-NN), graph-Laplacian loss and graph diffusion (grow_selection)."""

from __future__ import annotations

import math

import pytest
import torch

from gsstudio_ext.core import graph as graph_module
from gsstudio_ext.core.graph import (
    anchor_graph_radius,
    edge_feature_distance,
    graph_laplacian_loss,
    knn,
    radius_graph,
)
from gsstudio_ext.core.selection import anchors_of, cut_edges, gaussians_of, grow_selection

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_radius_edges(points: torch.Tensor, radius: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    d2 = (points[:, None, :] - points[None, :, :]).square().sum(-1)
    adj = torch.triu(d2 < radius * radius, diagonal=1)
    if allowed is not None:
        adj &= allowed[:, None] & allowed[None, :]
    return torch.stack(torch.nonzero(adj, as_tuple=True), dim=1)


def boundary_points(radius: float, seed: int = 0) -> torch.Tensor:
    """Random points plus points on exact multiples of the cell size (cell boundaries, pairs at distance == r)."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.rand(700, 3, generator=gen) * 8 * radius
    lattice = torch.randint(0, 8, (250, 3), generator=gen).float() * radius
    half = (torch.randint(0, 16, (50, 3), generator=gen).float() * 0.5 + 0.25) * radius
    return torch.cat([torch.zeros(1, 3), rand, lattice, half])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("radius", [0.1, 0.37])
def test_radius_graph_equals_brute_force(device: str, radius: float, monkeypatch: pytest.MonkeyPatch) -> None:
    points = boundary_points(radius).to(device)
    expected = brute_radius_edges(points, radius)
    assert torch.equal(radius_graph(points, radius, max_neighbors=None), expected)
    # Tiny chunks and pair budget exercise the chunking paths; the answer must not change.
    monkeypatch.setattr(graph_module, "_PAIR_BUDGET", 4000)
    assert torch.equal(radius_graph(points, radius, max_neighbors=None, chunk=50), expected)
    assert expected.shape[0] > 1000 and (expected[:, 0] < expected[:, 1]).all()


def test_radius_graph_is_strict_and_handles_tiny_inputs() -> None:
    r = 0.5
    pts = torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0], [0.0, r - 1e-4, 0.0]])
    assert radius_graph(pts, r).tolist() == [[0, 2]]
    assert radius_graph(pts[:1], r).shape == (0, 2)
    assert radius_graph(torch.zeros(0, 3), r).shape == (0, 2)
    assert radius_graph(torch.tensor([[0.0, 0, 0], [5.0, 0, 0]]), r).shape == (0, 2)
    with pytest.raises(ValueError, match="shape"):
        radius_graph(torch.zeros(4, 2), r)
    with pytest.raises(ValueError, match="radius"):
        radius_graph(pts, 0.0)
    assert anchor_graph_radius(0.01, 2.0) == pytest.approx(0.3201)


def test_radius_graph_neighbor_cap_keeps_each_nodes_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    points, radius, k = torch.rand(600, 3, generator=torch.Generator().manual_seed(1)), 0.2, 5
    d2 = (points[:, None] - points[None]).square().sum(-1)
    d2.fill_diagonal_(float("inf"))
    expected = set()
    for i in range(len(points)):
        near = torch.nonzero(d2[i] < radius * radius).squeeze(1)
        for j in near[torch.argsort(d2[i, near])][:k].tolist():
            expected.add((min(i, j), max(i, j)))
    monkeypatch.setattr(graph_module, "_PAIR_BUDGET", 500)
    got = radius_graph(points, radius, max_neighbors=k, chunk=64)
    assert {tuple(e) for e in got.tolist()} == expected
    assert len(expected) < brute_radius_edges(points, radius).shape[0]  # the cap did bite


def test_radius_graph_node_radius_filter() -> None:
    points = torch.rand(400, 3, generator=torch.Generator().manual_seed(2))
    node_r = torch.rand(400, generator=torch.Generator().manual_seed(3)) * 0.3
    radius = 0.2
    got = radius_graph(points, radius, max_neighbors=None, node_radius=node_r)
    assert torch.equal(got, brute_radius_edges(points, radius, allowed=node_r < radius))
    got = radius_graph(points, radius, max_neighbors=None, node_radius=node_r, node_radius_max=0.1)
    assert torch.equal(got, brute_radius_edges(points, radius, allowed=node_r < 0.1))


def test_radius_graph_scale_edges_bounded() -> None:
    """50k points: no [A, A] work, and the edge count is bounded by A * max_neighbors (timing-free)."""
    num, k = 50_000, 8
    points = torch.rand(num, 3, generator=torch.Generator().manual_seed(4))
    radius = 0.04  # about 13 neighbours per point on average, so the cap binds
    edges = radius_graph(points, radius, max_neighbors=k)
    assert 0 < edges.shape[0] <= num * k
    assert (edge_len := (points[edges[:, 0]] - points[edges[:, 1]]).norm(dim=-1)).max() < radius
    assert edge_len.numel() == torch.unique(edges[:, 0] * num + edges[:, 1]).numel()  # deduplicated
    degree = torch.bincount(edges.reshape(-1), minlength=num)
    assert (degree >= 1).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_knn_equals_brute_force(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    points, queries = torch.randn(500, 5, generator=gen).to(device), torch.randn(37, 5, generator=gen).to(device)
    full = (queries[:, None] - points[None]).square().sum(-1).sqrt()
    ref_d, ref_i = torch.sort(full, dim=1)
    monkeypatch.setattr(graph_module, "_KNN_BUDGET", 300)  # many point blocks, merged by a running top-k
    dist, idx = knn(points, queries, 6, chunk=10)
    assert torch.equal(idx, ref_i[:, :6])
    assert torch.allclose(dist, ref_d[:, :6], atol=1e-5)
    dist, idx = knn(points[:4], queries, 10)  # k clamps to P
    assert idx.shape == (37, 4) and torch.equal(idx, torch.sort(full[:, :4], dim=1).indices)
    with pytest.raises(ValueError, match="agree"):
        knn(points, queries[:, :3], 2)


def test_laplacian_loss_hand_computed_four_nodes() -> None:
    f = torch.tensor([[0.0], [0.1], [0.3], [1.0]], requires_grad=True)
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 2]])
    tau = 0.1
    d2 = {(0, 1): 0.01, (1, 2): 0.04, (2, 3): 0.49, (0, 2): 0.09}
    w = {e: math.exp(-v / (2 * tau * tau)) for e, v in d2.items()}  # e^-0.5, e^-2, e^-24.5, e^-4.5
    deg = [w[0, 1] + w[0, 2], w[0, 1] + w[1, 2], w[1, 2] + w[2, 3] + w[0, 2], w[2, 3]]
    terms = {(i, j): w[i, j] / math.sqrt(deg[i] * deg[j]) * d2[i, j] for (i, j) in d2}
    loss = graph_laplacian_loss(f, edges, tau)
    assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    assert loss.item() == pytest.approx(0.0287146, rel=1e-4)
    # Mask {3}: only the edge (2, 3) is summed, still with whole-graph degrees.
    masked = graph_laplacian_loss(f, edges, tau, node_mask=torch.tensor([False, False, False, True]))
    assert masked.item() == pytest.approx(terms[2, 3], rel=1e-5)
    none = graph_laplacian_loss(f, edges, tau, node_mask=torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    assert torch.allclose(edge_feature_distance(f, edges), torch.tensor([0.1, 0.2, 0.7, 0.3]))


def test_laplacian_loss_zero_for_equal_features_and_pulls_neighbours_together() -> None:
    edges = radius_graph(torch.rand(200, 3, generator=torch.Generator().manual_seed(6)), 0.25)
    same = torch.nn.functional.normalize(torch.ones(200, 3), dim=-1).requires_grad_()
    loss = graph_laplacian_loss(same, edges, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and same.grad.abs().max() == 0.0

    feats = (same.detach() + 0.05 * torch.randn(200, 3, generator=torch.Generator().manual_seed(7))).requires_grad_()
    before = edge_feature_distance(feats.detach(), edges)
    loss = graph_laplacian_loss(feats, edges, 0.1)
    loss.backward()
    assert loss.item() > 0
    stepped = feats.detach() - 0.5 * feats.grad
    after = edge_feature_distance(stepped, edges)
    assert after.sum() < 0.8 * before.sum()
    assert graph_laplacian_loss(stepped, edges, 0.1) < loss
    # On a single edge the gradient of each end points away from the other (descent pulls them together).
    pair = torch.tensor([[0.0, 0.0], [0.3, 0.4]], requires_grad=True)
    graph_laplacian_loss(pair, torch.tensor([[0, 1]]), 0.5).backward()
    assert torch.dot(pair.grad[0], pair[1].detach() - pair[0].detach()) < 0
    assert torch.allclose(pair.grad[0], -pair.grad[1])


def chain(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)


def test_grow_selection_hops_and_weight_threshold() -> None:
    edges = chain(10)
    weight = torch.full((9,), 0.01)
    weight[5] = 0.2  # edge 5-6 is a feature boundary
    grown = grow_selection(torch.tensor([2]), edges, weight, max_weight=0.05, max_hops=2, num_nodes=10)
    assert torch.nonzero(grown).squeeze(1).tolist() == [0, 1, 2, 3, 4]
    grown = grow_selection(torch.tensor([2]), edges, weight, max_weight=0.05, max_hops=50, num_nodes=10)
    assert torch.nonzero(grown).squeeze(1).tolist() == [0, 1, 2, 3, 4, 5]
    grown = grow_selection(torch.tensor([2]), edges, weight, max_weight=0.5, max_hops=50, num_nodes=10)
    assert bool(grown.all())
    seeds = torch.zeros(10, dtype=torch.bool)
    seeds[9] = True
    assert grow_selection(seeds, edges, weight, 0.05, 0).tolist() == seeds.tolist()
    assert torch.nonzero(grow_selection(seeds, edges, None, 0.0, 3)).squeeze(1).tolist() == [6, 7, 8, 9]
    assert not grow_selection(torch.zeros(10, dtype=torch.bool), edges, weight, 0.05, 10).any()
    assert not grow_selection(torch.zeros(0, dtype=torch.long), edges, weight, 0.05, 10, num_nodes=10).any()
    with pytest.raises(ValueError, match="num_nodes"):
        grow_selection(torch.tensor([1]), edges, weight, 0.05, 3)
    with pytest.raises(ValueError, match="out of range"):
        grow_selection(torch.tensor([10]), edges, weight, 0.05, 3, num_nodes=10)


def test_selection_helpers() -> None:
    p2a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert gaussians_of(torch.tensor([True, False, True]), p2a).tolist() == [True, True, False, False, True, True]
    visible = torch.tensor([False, True, False, False, False, False])
    assert anchors_of(visible, p2a, 4).tolist() == [True, False, False, False]
    sel = torch.tensor([True, True, False, False])
    assert cut_edges(sel, chain(4)).tolist() == [False, True, False]
