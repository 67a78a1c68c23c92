"""RoMaP Stage A, 3D-GALP: fit the per-Gaussian label field to 2D part targets (editing-methods.md §2.3).

Per step one random training view is rendered as a label map R^phi (label colours splatted on black with the frozen
scene's opacities and covariances) and pulled toward its part target A(C^phi):
``L_A = lambda_seg * mean|R^phi - A| + 1[step > start] * w * L_GALP``, where L_GALP (anchor-based neighbour loss,
paper Eq. 2) ties the label DC of the most and least certain Gaussians to their k nearest neighbours, the certainty
being the label softness (paper Eq. 1) recomputed every ``softness_every`` steps. Only the label SH is optimised.

The loss pieces are public for the nerfstudio model (:func:`seg_loss`, :class:`NeighbourTerm`);
:func:`fit_part_labels` is the stand-alone loop. Also here: :func:`naive_label_average`, the per-view majority-vote
baseline that 3D-GALP is compared against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import SH_C0
from gsstudio_ext.methods.romap.labels import init_label_sh, label_colors
from gsstudio_ext.methods.romap.part_targets import PartTargetSource

Progress = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)`` after each optimisation step."""


def softness(
    means: Tensor,
    label_sh: Tensor,
    viewmats: Tensor,
    prototypes: Tensor,
    degree: int,
    clamp_entropy: bool = False,
    mean_source: Literal["views", "dc"] = "views",
) -> Tensor:
    """Label softness S Float[N] in [0, 1] (paper Eq. 1): S_i = H_i * v_i, min-max normalised.

    v_i: variance over the views ``viewmats`` Float[C, 4, 4] of the label colour max(SH(r_i, d) + 0.5, 0), averaged
    over the 3 channels. H_i: entropy of p_ij = softmax_j cos(r_bar_i, l_j) over prototypes Float[P+1, 3]
    (background included; cos with black is 0), where r_bar_i is the mean colour over the views (paper,
    ``mean_source="views"``) or the DC colour SH_C0 * r_i0 + 0.5 (code, ``"dc"``). ``clamp_entropy`` applies the
    code's clamp of H from above at its 10th percentile.
    """
    with torch.no_grad():
        colors = label_colors(means, label_sh.detach(), viewmats, degree)  # [C, N, 3]
        var = colors.var(dim=0, correction=0).mean(dim=-1) if colors.shape[0] > 1 else colors.new_zeros(means.shape[0])
        if mean_source == "views":
            mean = colors.mean(dim=0)
        elif mean_source == "dc":
            mean = label_sh[:, 0, :].detach() * SH_C0 + 0.5
        else:
            raise ValueError(f"mean_source must be 'views' or 'dc', got {mean_source!r}")
        cos = F.cosine_similarity(mean[:, None, :], prototypes.to(mean)[None, :, :], dim=-1, eps=1e-8)  # [N, P+1]
        logp = torch.log_softmax(cos, dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        if clamp_entropy and entropy.numel():
            entropy = entropy.clamp(max=torch.quantile(entropy, 0.1))
        score = entropy * var
        if not score.numel():
            return score
        lo, hi = score.min(), score.max()
        return (score - lo) / (hi - lo).clamp_min(1e-12)


def knn_indices(points: Tensor, queries: Tensor, k: int, query_chunk: int = 256, point_chunk: int = 65536) -> Tensor:
    """Indices Long[A, k] of the k nearest ``points`` Float[M, 3] (Euclidean) to each point ``points[queries]``
    (queries: Long[A]), the query itself excluded; chunked so memory stays O(query_chunk * point_chunk)."""
    m = points.shape[0]
    k = min(int(k), m - 1)
    out = []
    with torch.no_grad():
        for start in range(0, queries.shape[0], query_chunk):
            q = queries[start : start + query_chunk]
            best_d = points.new_full((q.shape[0], 0), math.inf)
            best_i = torch.zeros(q.shape[0], 0, dtype=torch.long, device=points.device)
            for p0 in range(0, m, point_chunk):
                d = torch.cdist(points[q], points[p0 : p0 + point_chunk])  # [a, m_chunk]
                idx = torch.arange(p0, p0 + d.shape[1], device=points.device)
                d = torch.where(idx[None, :] == q[:, None], torch.full_like(d, math.inf), d)
                d = torch.cat([best_d, d], dim=1)
                i = torch.cat([best_i, idx[None, :].expand(q.shape[0], -1)], dim=1)
                best_d, pos = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
                best_i = torch.gather(i, 1, pos)
            out.append(best_i)
    return torch.cat(out) if out else torch.zeros(0, max(k, 0), dtype=torch.long, device=points.device)


def neighbour_pairs(
    means: Tensor,
    softness: Tensor,
    num_anchors: int = 1000,
    k: int = 50,
    max_points: int = 300_000,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Anchors Long[A] and their k nearest neighbours Long[A, k] (indices into the N Gaussians) for L_GALP.

    Above ``max_points`` Gaussians a random subset (``generator``) is searched. Anchors: the num_anchors // 2 lowest
    and the num_anchors // 2 highest ``softness`` Float[N] values; neighbours by centre distance (means Float[N, 3]).
    """
    n = means.shape[0]
    subset = None
    if n > max_points:
        subset = torch.randperm(n, generator=generator)[:max_points].to(means.device)
        means, softness = means[subset], softness[subset]
        n = max_points
    half = min(num_anchors // 2, n // 2)
    if half == 0:
        empty = torch.zeros(0, dtype=torch.long, device=means.device)
        return empty, empty.view(0, 0)
    order = torch.argsort(softness.detach())
    anchors = torch.cat([order[:half], order[-half:]])
    nbrs = knn_indices(means.detach(), anchors, k)
    if subset is not None:
        anchors, nbrs = subset[anchors], subset[nbrs]
    return anchors, nbrs


def pair_l1(label_dc: Tensor, anchors: Tensor, nbrs: Tensor) -> Tensor:
    """Mean over anchors Long[A] and neighbours Long[A, k] of |dc_anchor - dc_neighbour|_1 (summed over channels)
    for label DC Float[N, 3] or [N, 1, 3]; 0 (with a graph) when there are no pairs."""
    label_dc = label_dc.reshape(label_dc.shape[0], 3)
    if nbrs.numel() == 0:
        return label_dc.sum() * 0.0
    return (label_dc[anchors][:, None, :] - label_dc[nbrs]).abs().sum(dim=-1).mean()


def neighbour_loss(
    means: Tensor,
    label_dc: Tensor,
    softness: Tensor,
    num_anchors: int = 1000,
    k: int = 50,
    max_points: int = 300_000,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Anchor-based neighbour loss L_GALP (paper Eq. 2, code): mean over anchors and their k nearest neighbours of
    the L1 distance (summed over channels) between label DC coefficients Float[N, 3] (or [N, 1, 3]); anchors and
    neighbours as :func:`neighbour_pairs`. Gradients flow into ``label_dc`` only (means and softness are constants).
    """
    anchors, nbrs = neighbour_pairs(means, softness, num_anchors, k, max_points, generator)
    return pair_l1(label_dc, anchors, nbrs)


@dataclass
class GALPConfig:
    """3D-GALP label fitting (Stage A). [C] = official code, [P] = paper, [I] = implementation choice."""

    steps: int = 600
    """Optimisation steps, one training view each [C: 600 for reconstructed scenes, 500 for assets]. Views are drawn
    as 3DGS's viewpoint stack does, each once per pass in random order [I: drawing with replacement was clearly less
    robust to swapped-part views in tests]."""
    lambda_seg: float = 30.0
    """Weight of the L1 alignment term L_seg [C]."""
    neighbour_weight: float = 60.0
    """Weight of the anchor neighbour loss L_GALP, 2 x 30 [C]."""
    neighbour_start: int = 50
    """L_GALP is active for steps > this [C]."""
    softness_every: int = 50
    """Recompute the label softness every this many steps [C]."""
    num_anchors: int = 1000
    """Anchors K: K/2 lowest- plus K/2 highest-softness Gaussians [C]. Made for scenes of 1e5+ Gaussians: on a
    scene of a few thousand, K = 1000 with k = 50 ties most Gaussians together and smears parts; scale both down."""
    k: int = 50
    """Nearest neighbours per anchor [C]."""
    max_points: int = 300_000
    """Random subsample for the neighbour search above this many Gaussians [C]."""
    lr_dc: float = 0.0125
    """Adam learning rate of the label DC, = 3DGS feature_lr [C]."""
    lr_rest_factor: float = 20.0
    """Label rest learning rate = lr_dc / this [C]."""
    adam_eps: float = 1e-15
    """Adam epsilon [C]."""
    lr_final_factor: float = 1.0
    """Learning rates decay log-linearly to this fraction of their start over the steps; 1 = constant, as the code
    [I: an option; no gain measured on the synthetic acceptance scene]."""
    sh_degree: int = 3
    """Label SH degree L [P ablation: best at 3; the code defaults to 1 for new fields]."""
    init_color: float = 0.5
    """Initial label colour per channel (DC coefficient RGB2SH(0.5) = 0, rest 0) [C, read as the colour; I]."""
    clamp_entropy: bool = False
    """Clamp the softness entropy from above at its 10th percentile, as the code does [C; the paper does not, I]."""
    softness_mean: Literal["views", "dc"] = "views"
    """Colour compared with the prototypes in the softness: mean over views [P] or the DC colour [C]."""
    target_min_sum: Optional[float] = None
    """Count only pixels whose target colour sum is >= this (the code uses 0.5 for generated assets); None = all
    pixels, as for reconstructed scenes [C]."""
    outlier_factor: Optional[float] = 1.5
    """A view whose latest L_seg exceeds this multiple of the median over the training views is left out of L_seg
    while it stays so, e.g. a view whose attention swapped two parts [I: robust to view-inconsistent targets; None =
    every view counts, as the code]. See :class:`OutlierViews`."""
    seed: int = 0
    """Seed of the view order and the neighbour subsampling [I]."""
    backend: Literal["auto", "gsplat", "torch"] = "auto"
    """Rasterizer backend (auto: gsplat on CUDA, the torch rasterizer elsewhere)."""


def seg_loss(render: Tensor, target: Tensor, config: GALPConfig) -> Tensor:
    """L_seg = lambda_seg * mean |R^phi - A| of a label map and its target, both Float[H, W, 3] (with
    ``target_min_sum``, only pixels whose target colour sum reaches it count)."""
    if target.shape != render.shape:
        raise ValueError(f"part target is {list(target.shape)}; the label render is {list(render.shape)}")
    diff = (render - target.to(render)).abs()
    if config.target_min_sum is None:
        return config.lambda_seg * diff.mean()
    keep = (target.sum(dim=-1, keepdim=True) >= config.target_min_sum).to(diff)
    return config.lambda_seg * (diff * keep).sum() / (keep.sum() * 3).clamp_min(1.0)


class NeighbourTerm:
    """The weighted anchor neighbour loss of one Stage-A run: ``term(label_sh, step)`` is None up to
    ``neighbour_start`` (or with zero weight), else ``neighbour_weight * L_GALP`` on the label DC. The softness (over
    the training cameras) and the anchor / neighbour pairs are recomputed every ``softness_every`` steps; geometry is
    frozen, so the neighbour search runs once per refresh."""

    def __init__(self, means: Tensor, viewmats: Tensor, prototypes: Tensor, config: GALPConfig) -> None:
        self.means, self.viewmats, self.config = means.detach(), viewmats, config
        self.prototypes = prototypes.to(device=means.device, dtype=means.dtype)
        self.generator = torch.Generator().manual_seed(int(config.seed) + 1)
        self.pairs: Optional[Tuple[Tensor, Tensor]] = None

    def __call__(self, label_sh: Tensor, step: int) -> Optional[Tensor]:
        cfg = self.config
        if step <= cfg.neighbour_start or cfg.neighbour_weight <= 0:
            return None
        if self.pairs is None or step % cfg.softness_every == 0:
            degree = int(round(label_sh.shape[1] ** 0.5)) - 1
            soft = softness(
                self.means, label_sh, self.viewmats, self.prototypes, degree, cfg.clamp_entropy, cfg.softness_mean
            )
            self.pairs = neighbour_pairs(self.means, soft, cfg.num_anchors, cfg.k, cfg.max_points, self.generator)
        return cfg.neighbour_weight * pair_l1(label_sh[:, 0], *self.pairs)


class OutlierViews:
    """Trims view-inconsistent part targets from L_seg [I]: ``trim(view, seg)`` records the view's latest loss and
    returns ``seg``, or ``0 * seg`` once every view has been seen and this one's loss exceeds ``factor`` x the median
    over the views. The field then follows the views that agree; an outlier view comes back when the field explains
    it again. ``factor`` None keeps every view."""

    def __init__(self, num_views: int, factor: Optional[float]) -> None:
        self.factor = factor
        self.losses = torch.full((int(num_views),), math.nan)

    def __call__(self, view: int, seg: Tensor) -> Tensor:
        self.losses[view] = float(seg.detach())
        if self.factor is None or bool(self.losses.isnan().any()):
            return seg
        return seg * 0.0 if bool(self.losses[view] > self.factor * self.losses.median()) else seg

    @property
    def outliers(self) -> List[int]:
        """Views currently left out."""
        if self.factor is None or bool(self.losses.isnan().any()):
            return []
        return torch.nonzero(self.losses > self.factor * self.losses.median()).flatten().tolist()


def _adam(groups: list, eps: float) -> torch.optim.Adam:
    """Adam, fused where this torch build supports it (much faster on CPU for large sparse-gradient tensors)."""
    try:
        return torch.optim.Adam(groups, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, eps=eps)


def fit_part_labels(
    scene: GaussianScene,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    targets: PartTargetSource,
    config: Optional[GALPConfig] = None,
    progress: Optional[Progress] = None,
) -> Tensor:
    """Fit label SH Float[N, (L+1)^2, 3] (DC first) of ``scene`` to ``targets`` over training cameras
    viewmats Float[V, 4, 4] (OpenCV world-to-camera), Ks Float[V, 3, 3] at width x height; the target of camera v is
    ``targets.targets(v)`` Float[3, height, width]. Geometry and appearance stay frozen. Deterministic for a seed.
    """
    config = config or GALPConfig()
    num_views = viewmats.shape[0]
    if num_views == 0 or Ks.shape[0] != num_views:
        raise ValueError(f"need V >= 1 viewmats and as many Ks; got {viewmats.shape[0]} and {Ks.shape[0]}")
    if targets.num_views < num_views:
        raise ValueError(f"the target source has {targets.num_views} views but {num_views} cameras were given")
    device, dtype = scene.means.device, scene.means.dtype
    frozen = scene.detach()
    means, quats, scales, opacities = frozen.means, frozen.quats, frozen.scales(), frozen.opacities()
    prototypes = targets.prototypes.to(device=device, dtype=dtype)
    degree = config.sh_degree
    init = init_label_sh(scene.num_gaussians, degree, config.init_color, device=device, dtype=dtype)
    dc = init[:, :1].clone().requires_grad_(True)
    rest = init[:, 1:].clone().requires_grad_(True)
    optim = _adam(
        [
            {"params": [dc], "lr": config.lr_dc},
            {"params": [rest], "lr": config.lr_dc / config.lr_rest_factor},
        ],
        config.adam_eps,
    )
    gen = torch.Generator().manual_seed(int(config.seed))
    base_lrs = [group["lr"] for group in optim.param_groups]
    order: List[int] = []
    neighbours = NeighbourTerm(means, viewmats, prototypes, config)
    trim = OutlierViews(num_views, config.outlier_factor)
    for step in range(config.steps):
        decay = config.lr_final_factor ** (step / max(config.steps - 1, 1))
        for group, base in zip(optim.param_groups, base_lrs):
            group["lr"] = base * decay
        label_sh = torch.cat([dc, rest], dim=1)
        if not order:  # 3DGS's viewpoint stack: every view once per pass, in a random order
            order = torch.randperm(num_views, generator=gen).tolist()
        v = order.pop()
        colors = label_colors(means, label_sh, viewmats[v : v + 1], degree)
        render, _, _ = rasterize(
            means, quats, scales, opacities, colors, viewmats[v : v + 1], Ks[v : v + 1], int(width), int(height),
            backend=config.backend,
        )  # fmt: skip
        target = targets.targets(v).to(device=device, dtype=dtype).permute(1, 2, 0)  # [H, W, 3]
        loss = trim(v, seg_loss(render[0], target, config))
        neighbour = neighbours(label_sh, step)
        if neighbour is not None:
            loss = loss + neighbour
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if progress is not None:
            progress(step + 1, config.steps, float(loss.detach()))
    return torch.cat([dc, rest], dim=1).detach()


@torch.no_grad()
def naive_label_average(
    scene: GaussianScene,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    label_maps: Tensor,
    num_parts: int,
    depth_tolerance: float = 0.02,
    near: float = 0.01,
    backend: Literal["auto", "gsplat", "torch"] = "auto",
) -> Tensor:
    """Baseline hard labels Long[N]: each Gaussian takes the majority of label_maps Long[V, H, W] (0..P) at the pixel
    its centre projects to, over the views where it is visible: in front of the camera (z > near), inside the image,
    and within ``depth_tolerance`` (relative) of the rendered expected depth there. Ties go to the lower label;
    never-visible Gaussians get 0. Render the result with :func:`labels.labels_to_sh`."""
    n = scene.num_gaussians
    device = scene.means.device
    votes = torch.zeros(n, num_parts + 1, device=device)
    means, quats, scales, opacities = scene.means, scene.quats, scene.scales(), scene.opacities()
    ones = means.new_ones(n, 1)
    for v in range(viewmats.shape[0]):
        depth, _, _ = rasterize(
            means, quats, scales, opacities, ones, viewmats[v : v + 1], Ks[v : v + 1], int(width), int(height),
            render_mode="ED", backend=backend,
        )  # fmt: skip
        depth = depth[0, ..., 0]
        cam = means @ viewmats[v, :3, :3].T + viewmats[v, :3, 3]
        z = cam[:, 2]
        zs = z.clamp_min(near)
        u = Ks[v, 0, 0] * cam[:, 0] / zs + Ks[v, 0, 2]
        w = Ks[v, 1, 1] * cam[:, 1] / zs + Ks[v, 1, 2]
        px, py = torch.floor(u).long(), torch.floor(w).long()
        inside = (z > near) & (px >= 0) & (px < width) & (py >= 0) & (py < height)
        idx = torch.nonzero(inside, as_tuple=True)[0]
        rendered = depth[py[idx], px[idx]]
        seen = (rendered > 0) & ((z[idx] - rendered).abs() <= depth_tolerance * rendered)
        idx = idx[seen]
        labels = label_maps[v].to(device)[py[idx], px[idx]].long()
        votes.index_put_((idx, labels), torch.ones_like(idx, dtype=votes.dtype), accumulate=True)
    labels = votes.argmax(dim=1)
    return torch.where(votes.sum(dim=1) > 0, labels, torch.zeros_like(labels))
