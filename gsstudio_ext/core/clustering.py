"""Super-anchor clustering (AG2aussian, segmentation-methods.md §2.8): graph mean-shift, union-find, fragment merge.

Plain functions on tensors, device-agnostic, vectorised over nodes and edges (no Python loop over either).
Edges are ``Long[E, 2]`` undirected anchor-graph edges as produced by :func:`gsstudio_ext.core.graph.radius_graph`
(built at ``graph_merge_scale`` 4.0 for merging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.graph import knn


def _both_ways(edges: Tensor, num_nodes: int, self_loops: bool) -> tuple[Tensor, Tensor]:
    """(src, dst) Long[E'] listing every undirected edge in both directions, plus optional self loops."""
    src, dst = [edges[:, 0], edges[:, 1]], [edges[:, 1], edges[:, 0]]
    if self_loops:
        loop = torch.arange(num_nodes, device=edges.device)
        src, dst = src + [loop], dst + [loop]
    return torch.cat(src), torch.cat(dst)


def _group_argmin(group: Tensor, values: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per group: the smallest value (inf if empty) and the first position holding it (``len(values)`` if empty)."""
    best = torch.full((num_groups,), float("inf"), dtype=values.dtype, device=values.device)
    best = best.scatter_reduce(0, group, values, reduce="amin")
    hit = values == best[group]
    first = torch.full((num_groups,), values.numel(), dtype=torch.long, device=values.device)
    position = torch.arange(values.numel(), device=values.device)
    return best, first.scatter_reduce(0, group[hit], position[hit], reduce="amin")


def graph_mean_shift(
    features: Tensor,
    edges: Tensor,
    bandwidth: float = 0.05,
    iters: int = 50,
    tol: float = 1e-5,
    normalize: bool = True,
) -> Tensor:
    """Mean-shift of every node's feature over its graph neighbourhood (itself included).

    ``p_i <- normalize(sum_j K(||p_i - f_j||) f_j / sum_j K(...))`` over ``j in N(i) + {i}``, with the Gaussian
    kernel ``K(d) = exp(-d^2 / (2 bandwidth^2))``, starting at ``p_i = f_i``; stops after ``iters`` iterations or
    once the largest shift is below ``tol``.

    Args:
        features: Float[A, D] anchor features (unit vectors in AG2).
        edges: Long[E, 2] undirected edges.
        bandwidth: kernel width (AG2: 0.05).
        iters: maximum number of iterations (AG2: 50).
        tol: convergence threshold on max ``||p_new - p||`` (AG2: 1e-5).
        normalize: L2-normalise the peaks after each step (AG2 does; features live on the sphere).

    Returns:
        Float[A, D] peaks (no gradient).
    """
    feats = features.detach()
    num = feats.shape[0]
    src, dst = _both_ways(edges, num, self_loops=True)
    f_dst = feats[dst]
    peaks = F.normalize(feats, dim=-1) if normalize else feats.clone()
    for _ in range(iters):
        d2 = (peaks[src] - f_dst).square().sum(-1)
        # Subtract each node's smallest d2 before exp (log-sum-exp style), so no row of kernels underflows to 0.
        d2_min = torch.full((num,), float("inf"), dtype=d2.dtype, device=d2.device)
        d2_min = d2_min.scatter_reduce(0, src, d2, reduce="amin")
        weight = torch.exp(-(d2 - d2_min[src]) / (2.0 * bandwidth * bandwidth))
        num_ = torch.zeros_like(peaks).index_add_(0, src, weight[:, None] * f_dst)
        den = torch.zeros(num, dtype=weight.dtype, device=weight.device).index_add_(0, src, weight)
        new = num_ / den[:, None]
        if normalize:
            new = F.normalize(new, dim=-1)
        shift = (new - peaks).norm(dim=-1).max() if num else peaks.new_zeros(())
        peaks = new
        if float(shift) < tol:
            break
    return peaks


def union_find(num_nodes: int, edges: Tensor) -> Tensor:
    """Connected components by parallel hooking and pointer jumping (vectorised union-find).

    Each round hooks, for every edge, the larger root onto the smaller one, then compresses every path to its root;
    rounds repeat until both ends of every edge share a root. Each component's root is its smallest node id.

    Args:
        num_nodes: A.
        edges: Long[E, 2] undirected edges (already filtered to the ones that merge).

    Returns:
        Long[A] labels 0..C-1, numbered in order of each component's smallest node id.
    """
    device = edges.device
    parent = torch.arange(num_nodes, device=device)
    if edges.numel() == 0:
        return parent
    u, v = edges[:, 0], edges[:, 1]
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not bool(differ.any()):
            break
        lo, hi = torch.minimum(pu, pv)[differ], torch.maximum(pu, pv)[differ]
        parent = parent.scatter_reduce(0, hi, lo, reduce="amin")  # parent[x] <= x always: no cycles
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    return torch.unique(parent, return_inverse=True)[1]


def merge_fragments(
    labels: Tensor,
    peaks: Tensor,
    points: Tensor,
    edges: Tensor,
    min_size: int = 10,
    max_dist: Optional[float] = None,
    max_peak_dist: Optional[float] = None,
) -> Tensor:
    """Absorb clusters smaller than ``min_size`` into large ones (one pass; large clusters never move).

    A small cluster joins the large cluster reached by its edge of smallest peak distance ``||p_i - p_j||``.
    A small cluster with no edge to a large cluster joins the cluster of the spatially nearest large-cluster node,
    if that node is closer than ``max_dist`` (AG2: ``8 * 16 * s_v * graph_merge_scale``; None: no limit);
    otherwise it stays as it is.

    With ``max_peak_dist`` (not in AG2), only edges and nearest nodes whose peak distance is below it merge, and
    the fragments left over are joined with each other over such edges. Without it, an under-trained region whose
    features are still noisy (no large cluster of its own) is split among the neighbouring objects.

    Args:
        labels: Long[A] cluster ids (e.g. from :func:`union_find`).
        peaks: Float[A, D] mean-shift peaks.
        points: Float[A, 3] anchor positions.
        edges: Long[E, 2] undirected edges.
        min_size: clusters with fewer nodes are fragments (AG2: 10).
        max_dist: radius of the spatial fallback.

    Returns:
        Long[A] labels 0..C'-1, numbered in order of each cluster's smallest node id.
    """
    num_clusters = int(labels.max()) + 1 if labels.numel() else 0
    sizes = torch.bincount(labels, minlength=num_clusters)
    large = sizes >= min_size
    if not bool(large.any()) or bool(large.all()):
        return torch.unique(labels, return_inverse=True)[1]
    target = torch.arange(num_clusters, device=labels.device)  # new cluster of each old cluster
    assigned = large.clone()

    # 1. Edges from a small cluster (src) to a large one (dst): the one of smallest peak distance wins (first on ties).
    src, dst = _both_ways(edges, labels.numel(), self_loops=False)
    cross = ~large[labels[src]] & large[labels[dst]]
    if max_peak_dist is not None:
        cross &= (peaks[src] - peaks[dst]).norm(dim=-1) < max_peak_dist
    src, dst = src[cross], dst[cross]
    if src.numel():
        dist = (peaks[src] - peaks[dst]).norm(dim=-1)
        _, winner = _group_argmin(labels[src], dist, num_clusters)
        has = winner < dist.numel()
        target[has] = labels[dst[winner[has]]]
        assigned |= has

    # 2. Spatial fallback for fragments still unassigned: the nearest node of any large cluster.
    left = ~assigned[labels]
    if bool(left.any()):
        anchor_large = large[labels]
        dist, idx = knn(points[anchor_large], points[left], 1)
        near_node = torch.nonzero(anchor_large).flatten()[idx[:, 0]]
        dist, near = dist[:, 0], labels[near_node]
        if max_peak_dist is not None:
            similar = (peaks[left] - peaks[near_node]).norm(dim=-1) < max_peak_dist
            dist = torch.where(similar, dist, torch.full_like(dist, float("inf")))
        best, winner = _group_argmin(labels[left], dist, num_clusters)
        has = (winner < dist.numel()) & (best < (float("inf") if max_dist is None else max_dist))
        target[has] = near[winner[has]]
        assigned |= has
    if max_peak_dist is not None and not bool(assigned.all()):
        # 3. Leftover fragments join each other over similar edges (a region with no large cluster of its own).
        left_edge = ~assigned[labels[edges[:, 0]]] & ~assigned[labels[edges[:, 1]]]
        left_edge &= (peaks[edges[:, 0]] - peaks[edges[:, 1]]).norm(dim=-1) < max_peak_dist
        joined = union_find(num_clusters, labels[edges[left_edge]])
        target = torch.where(assigned, target, joined + num_clusters)
    return torch.unique(target[labels], return_inverse=True)[1]


@dataclass
class SuperAnchors:
    """Result of :func:`cluster_super_anchors` (S super-anchors over A anchors)."""

    labels: Tensor
    """Long[A] super-anchor id of each anchor, 0..S-1."""
    peaks: Tensor
    """Float[A, D] mean-shift peak of each anchor (AG2 overwrites the anchor features with these)."""
    centers: Tensor
    """Float[S, 3] mean anchor position per super-anchor."""
    features: Tensor
    """Float[S, D] mean peak per super-anchor (not re-normalised, as in AG2)."""
    sizes: Tensor
    """Long[S] number of anchors per super-anchor."""


def cluster_super_anchors(
    points: Tensor,
    features: Tensor,
    edges: Tensor,
    bandwidth: float = 0.05,
    iters: int = 50,
    tol: float = 1e-5,
    merge_tol: float = 0.01,
    min_size: int = 10,
    max_dist: Optional[float] = None,
    max_peak_dist: Optional[float] = None,
    normalize: bool = True,
) -> SuperAnchors:
    """AG2aussian's super-anchors: mean-shift peaks, union-find over edges with peak distance < ``merge_tol``,
    then fragment merge.

    Args:
        points: Float[A, 3] anchor positions.
        features: Float[A, D] anchor features.
        edges: Long[E, 2] anchor graph at ``graph_merge_scale`` (4.0).
        bandwidth, iters, tol, normalize: see :func:`graph_mean_shift` (AG2: 0.05, 50, 1e-5, True).
        merge_tol: edges whose peak distance is below this join their clusters (AG2: 0.01).
        min_size, max_dist, max_peak_dist: see :func:`merge_fragments` (AG2: 10, ``8 * 16 * s_v * 4.0``, None).

    Returns:
        :class:`SuperAnchors`.
    """
    if points.shape[0] != features.shape[0]:
        raise ValueError(f"points {tuple(points.shape)} and features {tuple(features.shape)} disagree on A")
    num = points.shape[0]
    peaks = graph_mean_shift(features, edges, bandwidth=bandwidth, iters=iters, tol=tol, normalize=normalize)
    if edges.numel():
        close = (peaks[edges[:, 0]] - peaks[edges[:, 1]]).norm(dim=-1) < merge_tol
        labels = union_find(num, edges[close])
    else:
        labels = torch.arange(num, device=points.device)
    labels = merge_fragments(
        labels, peaks, points, edges, min_size=min_size, max_dist=max_dist, max_peak_dist=max_peak_dist
    )
    count = int(labels.max()) + 1 if num else 0
    sizes = torch.bincount(labels, minlength=count)
    denom = sizes.clamp_min(1)[:, None].to(points.dtype)
    centers = torch.zeros(count, 3, dtype=points.dtype, device=points.device).index_add_(0, labels, points.detach())
    feats = torch.zeros(count, peaks.shape[1], dtype=peaks.dtype, device=peaks.device).index_add_(0, labels, peaks)
    return SuperAnchors(
        labels=labels, peaks=peaks, centers=centers / denom, features=feats / denom.to(peaks.dtype), sizes=sizes
    )
