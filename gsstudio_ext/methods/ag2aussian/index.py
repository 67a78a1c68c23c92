"""After training: the anchor graph, super-anchors, and graph-grown selections (spec §2.7, §2.8, §2.10)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.clustering import cluster_super_anchors
from gsstudio_ext.core.graph import anchor_graph_radius, edge_feature_distance, knn, radius_graph
from gsstudio_ext.core.selection import grow_selection


@dataclass
class GraphSettings:
    """Graph and growth thresholds; defaults are the paper's (distances are between unit instance features)."""

    train_scale: float = 2.0
    """Edge length during training and for click growth, in units of 16 voxels."""
    merge_scale: float = 4.0
    """Edge length for super-anchor clustering and text-query growth."""
    mean_shift_bandwidth: float = 0.05
    """Gaussian kernel width of the graph mean-shift."""
    merge_tol: float = 0.01
    """Union-find joins neighbouring anchors whose mean-shift peaks are closer than this."""
    min_cluster_size: int = 10
    """Clusters with fewer anchors are merged into a neighbouring large cluster..."""
    fragment_max_peak_distance: float = 0.5
    """...only over edges whose mean-shift peaks are closer than this (not in the paper, which merges regardless:
    then the still-noisy anchors of a short schedule are split among neighbouring objects); 2.0 = no limit."""
    text_grow_threshold: float = 0.05
    """Text queries grow over edges whose feature distance is below this..."""
    text_grow_hops: int = 10
    """...for at most this many hops."""
    click_grow_threshold: float = 0.10
    """Click queries grow over edges whose feature distance is below this..."""
    click_grow_hops: int = 50
    """...for at most this many hops."""
    click_neighbors: int = 3
    """A click seeds the selection with this many anchors nearest to the clicked 3D point."""
    max_neighbors: int = 64
    """Neighbours kept per anchor in the radius graph."""


def anchor_centers(anchor_xyz: Tensor, child_xyz: Tensor, point2anchor: Tensor) -> Tensor:
    """Mean position of each anchor's children [A, 3] (anchors without children keep their own position)."""
    A = anchor_xyz.shape[0]
    sums = torch.zeros_like(anchor_xyz).index_add_(0, point2anchor, child_xyz)
    counts = torch.bincount(point2anchor, minlength=A)[:, None]
    return torch.where(counts > 0, sums / counts.clamp_min(1), anchor_xyz)


def build_graph(anchor_xyz: Tensor, voxel_size: float, scale: float, settings: GraphSettings) -> Tensor:
    """Anchor graph edges [E, 2] at ``scale`` (x 16 voxels)."""
    return radius_graph(anchor_xyz, anchor_graph_radius(voxel_size, scale), max_neighbors=settings.max_neighbors)


@dataclass
class AnchorIndex:
    """Super-anchors of a trained scene plus the graphs the queries grow over."""

    labels: Tensor
    """Super-anchor id of every anchor [A]."""
    features: Tensor
    """Unit mean-shifted instance feature of every super-anchor [S, D]."""
    sizes: Tensor
    """Anchors per super-anchor [S]."""
    merge_edges: Tensor
    """Graph at the merge scale [E, 2] (text queries)."""
    click_edges: Tensor
    """Graph at the training scale [E', 2] (click queries)."""
    _passable: Dict[Tuple[str, float], Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_groups(self) -> int:
        return int(self.features.shape[0])

    def passable_edges(self, graph: str, anchor_feat: Tensor, max_distance: float) -> Tensor:
        """Edges [E'', 2] of the "merge" or "click" graph whose feature distance is below ``max_distance``; computed
        once per index (features are those of a trained scene), so a query only walks them."""
        key = (graph, max_distance)
        if key not in self._passable:
            edges = self.merge_edges if graph == "merge" else self.click_edges
            weight = edge_feature_distance(F.normalize(anchor_feat, dim=-1), edges)
            self._passable[key] = edges[weight < max_distance]
        return self._passable[key]


@torch.no_grad()
def build_index(
    anchor_xyz: Tensor, anchor_feat: Tensor, voxel_size: float, settings: Optional[GraphSettings] = None
) -> AnchorIndex:
    """Cluster anchors into super-anchors by graph mean-shift + union-find on their unit instance features."""
    settings = settings or GraphSettings()
    features = F.normalize(anchor_feat, dim=-1)
    merge_edges = build_graph(anchor_xyz, voxel_size, settings.merge_scale, settings)
    clusters = cluster_super_anchors(
        anchor_xyz, features, merge_edges, bandwidth=settings.mean_shift_bandwidth, merge_tol=settings.merge_tol,
        min_size=settings.min_cluster_size, max_dist=8 * anchor_graph_radius(voxel_size, settings.merge_scale),
        max_peak_dist=settings.fragment_max_peak_distance,
    )  # fmt: skip
    return index_from_labels(anchor_xyz, clusters.peaks, clusters.labels, voxel_size, settings, merge_edges)


@torch.no_grad()
def index_from_labels(
    anchor_xyz: Tensor,
    anchor_feat: Tensor,
    labels: Tensor,
    voxel_size: float,
    settings: Optional[GraphSettings] = None,
    merge_edges: Optional[Tensor] = None,
) -> AnchorIndex:
    """The index of known super-anchor ``labels`` [A] (e.g. saved in a checkpoint): group features and graphs."""
    settings = settings or GraphSettings()
    count = int(labels.max()) + 1 if labels.numel() else 0
    sums = torch.zeros(count, anchor_feat.shape[1], dtype=anchor_feat.dtype, device=anchor_feat.device)
    sums.index_add_(0, labels, F.normalize(anchor_feat, dim=-1))
    if merge_edges is None:
        merge_edges = build_graph(anchor_xyz, voxel_size, settings.merge_scale, settings)
    return AnchorIndex(
        labels=labels,
        features=F.normalize(sums, dim=-1),
        sizes=torch.bincount(labels, minlength=count),
        merge_edges=merge_edges,
        click_edges=build_graph(anchor_xyz, voxel_size, settings.train_scale, settings),
    )


@torch.no_grad()
def grow_from_groups(
    index: AnchorIndex, anchor_feat: Tensor, groups: Tensor, settings: Optional[GraphSettings] = None
) -> Tensor:
    """Anchors [A] bool of the super-anchors ``groups`` (ids), grown over the merge-scale graph (text queries)."""
    settings = settings or GraphSettings()
    seeds = torch.isin(index.labels, groups.to(index.labels.device))
    edges = index.passable_edges("merge", anchor_feat, settings.text_grow_threshold)
    return grow_selection(seeds, edges, None, 0.0, settings.text_grow_hops, anchor_feat.shape[0])


@torch.no_grad()
def grow_from_point(
    index: AnchorIndex,
    centers: Tensor,
    anchor_feat: Tensor,
    point: Tensor,
    settings: Optional[GraphSettings] = None,
) -> Tensor:
    """Anchors [A] bool selected by a 3D point (a click back-projected with the rendered depth): its nearest anchors
    by child-mean centre, grown over the training-scale graph."""
    settings = settings or GraphSettings()
    _, nearest = knn(centers, point.reshape(1, 3).to(centers), settings.click_neighbors)
    edges = index.passable_edges("click", anchor_feat, settings.click_grow_threshold)
    return grow_selection(nearest[0], edges, None, 0.0, settings.click_grow_hops, centers.shape[0])
