"""Anchor graphs: radius graph by voxel hashing, chunked k-NN, and AG2aussian's graph-Laplacian feature loss.

Plain functions on tensors, device-agnostic (CPU and CUDA), no compiled extensions
(segmentation-methods.md §2.5, §2.7). Edges are ``Long[E, 2]`` with ``i < j`` in every row, deduplicated and
sorted; every consumer treats them as undirected.
"""

from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch
from torch import Tensor

# Candidate pairs handled per chunk of radius_graph (bounds peak memory whatever the point density).
_PAIR_BUDGET = 1 << 22
# Entries of the [queries, points, dim] difference block handled at once by knn.
_KNN_BUDGET = 1 << 24


def anchor_graph_radius(voxel_size: float, scale: float) -> float:
    """AG2aussian's edge radius ``16 * s_v * scale + 1e-4`` (scale 2.0 while training, 4.0 for merging/queries)."""
    return 16.0 * voxel_size * scale + 1e-4


def _check_points(points: Tensor, name: str = "points") -> None:
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {tuple(points.shape)}")


def radius_graph(
    points: Tensor,
    radius: float,
    max_neighbors: Optional[int] = 64,
    chunk: int = 4096,
    node_radius: Optional[Tensor] = None,
    node_radius_max: Optional[float] = None,
) -> Tensor:
    """Undirected edges between points closer than ``radius`` (strict ``<``), by voxel hashing.

    Points are hashed into cubic cells of side ``radius`` (a hair larger, against rounding), so every neighbour of
    a point lies in its 3x3x3 block of cells. Queries are processed in chunks of at most ``chunk`` points and a
    bounded number of candidate pairs, so memory stays O(A + E) and no [A, A] matrix is ever built.

    Args:
        points: Float[A, 3] positions (anchor centres).
        radius: edge length threshold (see :func:`anchor_graph_radius`).
        max_neighbors: each point keeps at most this many of its nearest neighbours (AG2's k-NN cap, K <= 128);
            the edge set is the union over both endpoints, so E <= A * max_neighbors. None keeps all.
        chunk: maximum number of query points per chunk.
        node_radius: optional Float[A] per-node radius (AG2's anchor radius r_a). When given, a node takes part
            in edges only if its radius is below ``node_radius_max`` (both endpoints must pass; AG2 tests r_i of
            the query node, we apply the test symmetrically so the graph does not depend on index order).
        node_radius_max: threshold for ``node_radius``; defaults to ``radius`` (AG2 uses the same threshold).

    Returns:
        Long[E, 2] edges with ``edges[:, 0] < edges[:, 1]``, unique, sorted lexicographically.
    """
    _check_points(points)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if max_neighbors is not None and max_neighbors < 1:
        raise ValueError(f"max_neighbors must be >= 1 or None, got {max_neighbors}")
    device, num = points.device, points.shape[0]
    empty = torch.zeros(0, 2, dtype=torch.long, device=device)
    if num < 2:
        return empty
    pts = points.detach()
    if not bool(torch.isfinite(pts).all()):
        raise ValueError("radius_graph: points contain NaN or infinite values")
    ok = None
    if node_radius is not None:
        if node_radius.shape != (num,):
            raise ValueError(f"node_radius must have shape [{num}], got {tuple(node_radius.shape)}")
        ok = node_radius.reshape(-1).to(device) < (radius if node_radius_max is None else node_radius_max)

    # Integer cells (shifted by one so the -1 neighbour offsets stay >= 0), hashed to a linear key.
    p64 = pts.double()
    cells = torch.floor((p64 - p64.min(0).values) / (radius * (1.0 + 1e-6))).long() + 1
    dims = (cells.max(0).values + 2).tolist()
    if dims[0] * dims[1] * dims[2] >= 2**62:
        raise ValueError(f"radius {radius} is too small for the extent of the points (grid {dims} overflows)")
    key = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    # Work in cell-sorted order (points of a cell are contiguous); map back to input ids at the end.
    order = torch.argsort(key)
    key, spts = key[order], pts[order]
    sok = ok[order] if ok is not None else None
    cell_keys, counts = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.tensor(
        [(dx * dims[1] + dy) * dims[2] + dz for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3)],
        device=device,
    )

    def neighbour_cells(a: int, b: int) -> Tuple[Tensor, Tensor]:
        # For sorted queries a..b-1: start and size of each of the 27 neighbouring cells (size 0 if empty).
        nkeys = key[a:b, None] + offsets[None, :]
        pos = torch.searchsorted(cell_keys, nkeys).clamp_max(len(cell_keys) - 1)
        count = torch.where(cell_keys[pos] == nkeys, counts[pos], torch.zeros_like(pos))
        return starts[pos], count

    step = max(chunk, 1 << 16)
    totals = torch.cat([neighbour_cells(a, min(a + step, num))[1].sum(1) for a in range(0, num, step)])
    per_query = torch.cumsum(totals, 0)

    r2 = radius * radius
    out = []
    q0 = 0
    while q0 < num:
        # Next chunk: at most `chunk` queries and about _PAIR_BUDGET candidate pairs (at least one query).
        done = per_query[q0 - 1] if q0 > 0 else per_query.new_zeros(())
        q1 = int(torch.searchsorted(per_query, done + _PAIR_BUDGET, right=True))
        q1 = min(max(q1, q0 + 1), q0 + chunk, num)
        cell_start, cell_count = neighbour_cells(q0, q1)
        cnt, total = cell_count.reshape(-1), int(per_query[q1 - 1] - done)
        # Candidate pairs (q, j): every point of every neighbouring cell, in sorted positions.
        shift = cell_start.reshape(-1) - (torch.cumsum(cnt, 0) - cnt)
        j = torch.arange(total, device=device) + torch.repeat_interleave(shift, cnt, output_size=total)
        q = torch.repeat_interleave(torch.arange(q0, q1, device=device), totals[q0:q1], output_size=total)
        d2 = (spts[q] - spts[j]).square().sum(-1)
        keep = (d2 < r2) & (j > q if max_neighbors is None else j != q)
        if sok is not None:
            keep &= sok[q] & sok[j]
        idx = keep.nonzero().squeeze(1)
        q, j, d2 = q[idx], j[idx], d2[idx]
        if max_neighbors is not None and q.numel() > 0:
            # Cap: among queries with too many neighbours, keep the nearest (one sort on a query-major key).
            over = torch.bincount(q - q0, minlength=q1 - q0)[q - q0] > max_neighbors
            if bool(over.any()):
                qo, jo, do = q[over], j[over], d2[over]
                by = torch.argsort((qo - q0).double() + do.double() / (r2 * 1.001), stable=True)
                qo, jo = qo[by], jo[by]
                keep = torch.arange(qo.numel(), device=device) - torch.searchsorted(qo, qo) < max_neighbors
                q, j = torch.cat([q[~over], qo[keep]]), torch.cat([j[~over], jo[keep]])
        q, j = order[q], order[j]
        out.append(torch.minimum(q, j) * num + torch.maximum(q, j))
        q0 = q1
    flat = torch.unique(torch.cat(out))
    if flat.numel() == 0:
        return empty
    return torch.stack([flat // num, flat % num], dim=1)


def _exact_distance(a: Tensor, b: Tensor) -> Tensor:
    """Float[Qa, Pb] Euclidean distances without the |a|^2 + |b|^2 - 2ab expansion (no cancellation)."""
    if a.device.type == "cpu":  # cdist's non-matmul kernel is the fastest exact path on CPU, but slow on CUDA
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return (a[:, None, :] - b[None, :, :]).square().sum(-1).sqrt()


def knn(points: Tensor, queries: Tensor, k: int, chunk: int = 4096) -> Tuple[Tensor, Tensor]:
    """Exact k nearest ``points`` of each query (brute force in blocks; O(Q * P) time, bounded memory).

    Args:
        points: Float[P, D] reference set (anchor centres, optionally with scaled features appended).
        queries: Float[Q, D].
        k: neighbours per query; clamped to P.
        chunk: maximum number of queries per block.

    Returns:
        (distances Float[Q, k'] ascending, indices Long[Q, k'] into ``points``) with k' = min(k, P).
    """
    if points.ndim != 2 or queries.ndim != 2 or points.shape[1] != queries.shape[1]:
        raise ValueError(
            f"points [P, D] and queries [Q, D] must agree, got {tuple(points.shape)}, {tuple(queries.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if points.shape[0] == 0:
        raise ValueError("knn needs at least one reference point")
    k = min(k, points.shape[0])
    pts, qry = points.detach(), queries.detach().to(points.device, points.dtype)
    dists, idxs = [], []
    for a in range(0, qry.shape[0], chunk):
        q = qry[a : a + chunk]
        block = max(k, _KNN_BUDGET // (q.shape[0] * max(qry.shape[1], 1)))
        best_d = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for b in range(0, pts.shape[0], block):
            d = _exact_distance(q, pts[b : b + block])
            cand_d = torch.cat([best_d, d], 1)
            cand_i = torch.cat([best_i, torch.arange(b, b + d.shape[1], device=q.device).expand_as(d)], 1)
            best_d, sel = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = torch.gather(cand_i, 1, sel)
        dists.append(best_d)
        idxs.append(best_i)
    if not dists:
        return points.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=points.device)
    return torch.cat(dists), torch.cat(idxs)


def edge_feature_distance(features: Tensor, edges: Tensor) -> Tensor:
    """Float[E] Euclidean distance ``||f_i - f_j||`` along each edge (AG2's diffusion edge "weight")."""
    if edges.numel() == 0:
        return features.new_zeros(0)
    return (features.index_select(0, edges[:, 0]) - features.index_select(0, edges[:, 1])).norm(dim=-1)


def graph_laplacian_loss(features: Tensor, edges: Tensor, tau: float, node_mask: Optional[Tensor] = None) -> Tensor:
    """AG2aussian's normalised bilateral graph-Laplacian smoothness (segmentation-methods.md §2.5).

    ``L = sum_(i,j) w_ij / sqrt(deg_i * deg_j) * ||f_i - f_j||^2`` with ``w_ij = exp(-||f_i - f_j||^2 / (2 tau^2))``
    computed on detached features and ``deg_i = sum_j w_ij``. It is a SUM over edges, not a mean. Degrees come
    from the whole graph; ``node_mask`` only selects which edge terms are summed (the normalised Laplacian stays a
    property of the graph, not of the current view).

    Args:
        features: Float[A, D] anchor features, as compared (AG2 passes L2-normalised features).
        edges: Long[E, 2] undirected anchor-graph edges.
        tau: bilateral bandwidth (``graph_tau``, 0.05 or 0.1 per scene).
        node_mask: optional Bool[A]; only edges touching a masked node count. Pass anchor visibility
            ``any(child visible)`` (see :func:`gsstudio_ext.core.selection.anchors_of`); this replaces the official
            code's child-indexed visibility vector, which has the wrong length.

    Returns:
        Scalar loss (zero, still attached to ``features``, when no edge is selected).
    """
    if edges.ndim != 2 or (edges.numel() and edges.shape[1] != 2):
        raise ValueError(f"edges must have shape [E, 2], got {tuple(edges.shape)}")
    if edges.numel() == 0:
        return features.sum() * 0.0
    i, j = edges[:, 0], edges[:, 1]
    # index_select: its backward is an atomic index_add (tensor[i] backpropagates through a slow sorting index_put)
    diff2 = (features.index_select(0, i) - features.index_select(0, j)).square().sum(-1)
    w = torch.exp(-diff2.detach() / (2.0 * tau * tau))
    deg = torch.zeros(features.shape[0], dtype=w.dtype, device=w.device)
    deg.index_add_(0, i, w).index_add_(0, j, w)
    norm_w = w / torch.sqrt(deg[i] * deg[j]).clamp_min(1e-12)
    if node_mask is not None:
        if node_mask.shape != (features.shape[0],):
            raise ValueError(f"node_mask must have shape [{features.shape[0]}], got {tuple(node_mask.shape)}")
        touch = node_mask[i] | node_mask[j]
        return (norm_w * diff2 * touch.to(diff2.dtype)).sum()
    return (norm_w * diff2).sum()
