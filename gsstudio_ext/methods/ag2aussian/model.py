"""AG2aussian: anchor-structured Gaussians with one unit-norm instance feature per anchor (spec §2).

Children render RGB; the normalised feature of their anchor and the NDC-depth moments [m, m^2] of the distortion
loss are rendered in the same rasterization pass. Instance masks (dataset sidecars, or SAM masks written by
``gs-preprocess``) drive the mask smoothness and rank-weighted contrast losses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.graph import graph_laplacian_loss
from gsstudio_ext.methods.ag2aussian import losses
from gsstudio_ext.methods.ag2aussian.anchors import child_positions, init_anchor_params, scene_radius
from gsstudio_ext.methods.ag2aussian.index import AnchorIndex, GraphSettings, build_graph, build_index
from gsstudio_ext.methods.ag2aussian.strategy import AnchorStrategy
from gsstudio_ext.methods.base.model import FeatureSplatfactoModel, FeatureSplatfactoModelConfig


@dataclass
class AG2ModelConfig(FeatureSplatfactoModelConfig):
    """AG2aussian with the paper's hyper-parameters (schedule in training steps, one image per step)."""

    _target: Type = field(default_factory=lambda: AG2Model)
    instance_dim: int = 3
    """Channels of the per-anchor instance feature (the paper uses 3: a point on the unit sphere)."""
    children_per_anchor: int = 5
    """Child Gaussians per anchor (k)."""
    voxel_size: float = 0.0
    """Anchor voxel size s_v; 0 = automatic, R * 0.01 / 16 with R the seed cloud's extent (free-scale mode)."""
    child_init_opacity: float = 0.01
    """Initial opacity of child Gaussians."""
    child_offset_init_std: float = 0.1
    """Std of the initial child offsets in anchor radii (the paper starts at 0, which keeps the k children
    identical; a small spread breaks that symmetry)."""
    lambda_smooth: float = 3.0
    """Weight of the mask smoothness term (README default for new scenes)."""
    lambda_contrast: float = 0.5
    """Weight of the rank-weighted contrast term."""
    contrast_eps: float = 1.0
    """epsilon in the inverse distance 1 / (D + eps)."""
    mask_loss_weight: float = 0.1
    """Overall weight of the mask losses."""
    mask_loss_from: int = 5000
    """Step from which the mask losses apply."""
    background_mask: bool = False
    """Add the pixels outside every instance mask as one more mask (for object-only ground-truth masks; SAM's
    "everything" masks already cover the background)."""
    feature_alpha_min: float = 0.1
    """Feature maps are divided by alpha and zeroed where alpha is below this."""
    child_reg_weight: float = 0.5
    """Weight of the child-in-anchor regulariser."""
    distortion_weight: float = 20.0
    """Weight of the depth-distortion term."""
    distortion_from: int = 10000
    """Step from which the depth-distortion term applies."""
    distortion_near: float = 0.2
    """Near plane n of the NDC depth mapping (2DGS constant)."""
    distortion_far: float = 100.0
    """Far plane f of the NDC depth mapping (2DGS constant)."""
    alpha_weight: float = 0.1
    """Weight of mean(1 - alpha), which fills holes."""
    alpha_from: int = 3000
    """Step from which the alpha term applies."""
    graph_tau: float = 0.1
    """Bandwidth tau of the anchor-graph Laplacian weights."""
    graph_weight: float = 1e-2
    """Weight of the anchor-graph Laplacian term."""
    graph_from: int = 30000
    """Step at which the anchor graph is built and its term starts."""
    graph_scale: float = 2.0
    """Graph edge length in units of 16 voxels during training."""
    densify_from: int = 500
    """First step of anchor growth and pruning."""
    densify_until: int = 20000
    """Last step of anchor growth and pruning."""
    densify_every: int = 100
    """Steps between anchor growth/pruning rounds."""
    opacity_reset_every: int = 3000
    """Steps between child opacity resets."""
    growth_grad_threshold: float = 1.5e-4
    """Screen-gradient threshold for anchor growth (doubled per level)."""
    sh_degree_interval: int = 1000
    """Every this many steps one more SH degree is used."""
    graph_settings: GraphSettings = field(default_factory=GraphSettings)
    """Anchor-graph, super-anchor and selection-growth thresholds."""


class AG2Model(FeatureSplatfactoModel):
    """Anchor-graph structured Gaussian splatting with instance features (ag2aussian-ext)."""

    config: AG2ModelConfig
    frozen_params = ("anchor_xyz", "anchor_radius")

    # ------------------------------------------------------------------ layout

    def init_gaussian_params(self, points: Tensor, colors: Optional[Tensor], generator: torch.Generator):
        cfg = self.config
        self.scene_extent = scene_radius(points.float())
        self.voxel_size = cfg.voxel_size or self.scene_extent * 0.01 / 16
        return init_anchor_params(
            points, colors, self.voxel_size, cfg.children_per_anchor, cfg.instance_dim, cfg.sh_degree,
            cfg.child_offset_init_std, cfg.child_init_opacity, generator,
        )  # fmt: skip

    def make_strategy(self) -> AnchorStrategy:
        cfg = self.config
        return AnchorStrategy(
            voxel_size=self.voxel_size, scene_radius=self.scene_extent, children=cfg.children_per_anchor,
            sh_degree=cfg.sh_degree, refine_start=cfg.densify_from, refine_stop=cfg.densify_until,
            refine_every=cfg.densify_every, reset_every=cfg.opacity_reset_every,
            grad_threshold=cfg.growth_grad_threshold, new_opacity=cfg.child_init_opacity,
            offset_std=cfg.child_offset_init_std,
        )  # fmt: skip

    _train_edges: Optional[Tensor] = None
    _train_edges_count: int = -1
    _index: Optional[AnchorIndex] = None
    selection: Optional[Tensor] = None
    """Selected children [N] bool (from a click or text query); rendered as the "selection" output."""

    @property
    def means(self) -> Tensor:
        """Child positions (anchors are fixed; children move through their offsets)."""
        return child_positions(self.gauss_params)

    @property
    def num_points(self) -> int:
        return self.gauss_params["offsets"].shape[0]

    @property
    def num_anchors(self) -> int:
        return self.gauss_params["anchor_xyz"].shape[0]

    @property
    def graph_voxel(self) -> float:
        """Voxel unit of the graph radii (16 units x scale): the paper's s_v = 0.01 R / 16, raised so that the
        training-scale graph still links neighbouring anchors when anchors are coarser than the paper's."""
        return max(self.scene_extent * 0.01, 2 * self.voxel_size) / 16

    def train_edges(self) -> Tensor:
        """The training-scale anchor graph, rebuilt when the anchor count changed (the graph stage starts after
        densification has stopped, so anchors no longer change then)."""
        if self._train_edges is None or self._train_edges_count != self.num_anchors:
            self._train_edges_count = self.num_anchors
            self._train_edges = build_graph(
                self.gauss_params["anchor_xyz"].detach(), self.graph_voxel, self.config.graph_scale,
                self.config.graph_settings,
            )  # fmt: skip
        return self._train_edges

    def build_index(self) -> AnchorIndex:
        """Cluster the anchors into super-anchors (after training)."""
        self._index = build_index(
            self.gauss_params["anchor_xyz"].detach(), self.gauss_params["anchor_feat"].detach(), self.graph_voxel,
            self.config.graph_settings,
        )  # fmt: skip
        return self._index

    @property
    def anchor_index(self) -> AnchorIndex:
        """Super-anchors of the current anchors (built on first use)."""
        if self._index is None or self._index.labels.shape[0] != self.num_anchors:
            self.build_index()
        assert self._index is not None
        return self._index

    def instance_features(self) -> Tensor:
        """Unit-norm instance feature of every child [N, D] (its anchor's)."""
        return F.normalize(self.gauss_params["anchor_feat"], dim=-1)[self.gauss_params["point2anchor"]]

    # ------------------------------------------------------------------ rendering

    def feature_channels(self, crop_ids: Optional[Tensor], viewmat: Tensor) -> "OrderedDict[str, Tensor]":
        pick = (lambda t: t) if crop_ids is None else (lambda t: t[crop_ids])
        out: "OrderedDict[str, Tensor]" = OrderedDict(instance=pick(self.instance_features()))
        if not self.training and self.selection is not None and self.selection.shape[0] == self.num_points:
            out["selection"] = pick(self.selection.to(self.device).float()[:, None])
        if self.training and self.step >= self.config.distortion_from:
            z = (pick(self.means) @ viewmat[0, :3, :3].T + viewmat[0, :3, 3])[:, 2]
            m = losses.ndc_depth(z, self.config.distortion_near, self.config.distortion_far)
            out["depth_moments"] = torch.stack([m, m * m], dim=-1)
        return out

    def get_outputs(self, camera) -> Dict:
        outputs = super().get_outputs(camera)
        if "instance" in outputs:
            outputs["instance"] = losses.normalized_feature_map(
                outputs["instance"], outputs["accumulation"], self.config.feature_alpha_min
            )
        return outputs

    # ------------------------------------------------------------------ losses

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if not self.training:
            return loss_dict
        cfg = self.config
        params = self.gauss_params
        p2a = params["point2anchor"]
        visible = self.info["radii"][0] > 0
        loss_dict["child_reg"] = cfg.child_reg_weight * losses.child_in_anchor_loss(
            params["offsets"][visible], torch.exp(params["scales"][visible]), params["anchor_radius"][p2a[visible]]
        )
        if self.step >= cfg.graph_from:
            anchor_visible = torch.zeros(self.num_anchors, dtype=torch.bool, device=p2a.device)
            anchor_visible[p2a[visible]] = True
            loss_dict["graph"] = cfg.graph_weight * graph_laplacian_loss(
                F.normalize(params["anchor_feat"], dim=-1), self.train_edges(), cfg.graph_tau, anchor_visible
            )
        alpha = outputs["accumulation"]
        if self.step >= cfg.alpha_from:
            loss_dict["alpha"] = cfg.alpha_weight * (1.0 - alpha).mean()
        if "depth_moments" in outputs:
            distortion = losses.distortion_from_moments(outputs["depth_moments"], alpha)
            loss_dict["distortion"] = cfg.distortion_weight * distortion.mean()
        masks = batch.get("instance_masks")
        if self.step >= cfg.mask_loss_from and masks is not None and masks.shape[0] > 0:
            feats = outputs["instance"]
            masks = masks.to(feats.device)
            if masks.shape[1:] != feats.shape[:2]:
                masks = F.interpolate(masks[None].float(), size=feats.shape[:2], mode="nearest")[0] > 0.5
            if cfg.background_mask:
                covered = alpha[..., 0].detach() >= cfg.feature_alpha_min  # empty sky has no feature to smooth
                masks = torch.cat([masks, ~masks.any(dim=0, keepdim=True) & covered])
            smooth, contrast = losses.mask_losses(feats, masks, cfg.contrast_eps)
            loss_dict["mask"] = cfg.mask_loss_weight * (cfg.lambda_smooth * smooth + cfg.lambda_contrast * contrast)
        return loss_dict
