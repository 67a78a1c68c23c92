"""Graph diffusion of a selection over the anchor graph, and anchor <-> Gaussian mask helpers.

AG2aussian's queries (segmentation-methods.md §2.10) pick seed anchors, then grow the selection breadth-first over
anchor-graph edges whose feature distance is small: text queries use threshold 0.05 and 10 hops on the scale-4
graph, click queries 0.10 and 50 hops on the scale-2 graph. Plain, vectorised, device-agnostic functions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def as_node_mask(nodes: Tensor, num_nodes: int) -> Tensor:
    """Bool[A] from either a Bool[A] mask or a Long[k] index tensor (indices may repeat)."""
    if nodes.dtype == torch.bool:
        if nodes.shape != (num_nodes,):
            raise ValueError(f"a node mask must have shape [{num_nodes}], got {tuple(nodes.shape)}")
        return nodes.clone()
    if nodes.is_floating_point() or nodes.ndim != 1:
        raise ValueError(f"node indices must be a 1-D integer tensor, got {nodes.dtype} {tuple(nodes.shape)}")
    if nodes.numel() and (int(nodes.min()) < 0 or int(nodes.max()) >= num_nodes):
        raise ValueError(f"node indices out of range [0, {num_nodes})")
    mask = torch.zeros(num_nodes, dtype=torch.bool, device=nodes.device)
    mask[nodes.long()] = True
    return mask


def grow_selection(
    seeds: Tensor,
    edges: Tensor,
    edge_weight: Optional[Tensor],
    max_weight: float,
    max_hops: int,
    num_nodes: Optional[int] = None,
) -> Tensor:
    """Breadth-first growth of ``seeds`` through edges with ``edge_weight < max_weight``, for at most ``max_hops``.

    Each hop adds every not-yet-selected neighbour of the current frontier (no node is visited twice); growth stops
    early when the frontier is empty. Empty seeds give an empty selection.

    Args:
        seeds: Bool[A] mask or Long[k] anchor indices.
        edges: Long[E, 2] undirected anchor-graph edges.
        edge_weight: Float[E] per-edge weight, e.g. :func:`gsstudio_ext.core.graph.edge_feature_distance`;
            None lets every edge pass.
        max_weight: edges at or above this weight are not crossed (AG2: 0.05 text, 0.10 click).
        max_hops: number of BFS steps (AG2: 10 text, 50 click); 0 returns the seeds.
        num_nodes: A; required when ``seeds`` is an index tensor.

    Returns:
        Bool[A] selected anchors (seeds included).
    """
    if seeds.dtype != torch.bool and num_nodes is None:
        raise ValueError("grow_selection needs num_nodes when seeds are given as indices")
    num = seeds.shape[0] if seeds.dtype == torch.bool else int(num_nodes)
    selected = as_node_mask(seeds, num)
    if edges.numel() == 0 or max_hops <= 0 or not bool(selected.any()):
        return selected
    if edge_weight is not None:
        if edge_weight.shape != (edges.shape[0],):
            raise ValueError(f"edge_weight must have shape [{edges.shape[0]}], got {tuple(edge_weight.shape)}")
        edges = edges[edge_weight < max_weight]
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    frontier = selected.clone()
    for _ in range(max_hops):
        reached = torch.zeros_like(selected)
        reached[dst[frontier[src]]] = True
        frontier = reached & ~selected
        if not bool(frontier.any()):
            break
        selected |= frontier
    return selected


def gaussians_of(anchor_mask: Tensor, point2anchor: Tensor) -> Tensor:
    """Bool[N] Gaussians whose anchor is selected, from ``anchor_mask`` Bool[A] and ``point2anchor`` Long[N]."""
    return anchor_mask[point2anchor]


def anchors_of(gaussian_mask: Tensor, point2anchor: Tensor, num_anchors: int) -> Tensor:
    """Bool[A] anchors with at least one selected child, from ``gaussian_mask`` Bool[N] and ``point2anchor``
    Long[N]. With per-child visibility this is the anchor visibility that the graph loss takes as ``node_mask``."""
    out = torch.zeros(num_anchors, dtype=torch.bool, device=gaussian_mask.device)
    out[point2anchor[gaussian_mask]] = True
    return out


def cut_edges(selected: Tensor, edges: Tensor) -> Tensor:
    """Bool[E] edges with exactly one selected end: the selection's boundary (AG2 click-query display)."""
    if edges.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=edges.device)
    return selected[edges[:, 0]] != selected[edges[:, 1]]
