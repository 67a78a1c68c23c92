"""AG2aussian: anchor-structured Gaussians with one unit-norm instance feature per anchor (spec §2).

Children render RGB; the normalised feature of their anchor and the NDC-depth moments [m, m^2] of the distortion
loss are rendered in the same rasterization pass. Instance masks (dataset sidecars, or SAM masks written by
``gs-preprocess``) drive the mask smoothness and rank-weighted contrast losses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.viewer.viewer_elements import ViewerControl
from torch import Tensor

from gsstudio_ext.core.anchors import child_instance_features, child_positions
from gsstudio_ext.core.graph import graph_laplacian_loss
from gsstudio_ext.core.palette import id_colors
from gsstudio_ext.methods.ag2aussian import losses
from gsstudio_ext.methods.ag2aussian.anchors import init_anchor_params, scene_radius
from gsstudio_ext.methods.ag2aussian.index import (
    AnchorIndex,
    GraphSettings,
    build_graph,
    build_index,
    index_from_labels,
)
from gsstudio_ext.methods.ag2aussian.language import (
    GroupLanguage,
    TextQuerySettings,
    associate_language,
    encode_query,
    match_text,
)
from gsstudio_ext.methods.ag2aussian.queries import click_point, select_by_point
from gsstudio_ext.methods.ag2aussian.strategy import AnchorStrategy
from gsstudio_ext.methods.base.model import FeatureSplatfactoModel, FeatureSplatfactoModelConfig, View
from gsstudio_ext.methods.base.queries import QueryConfig, QueryState
from gsstudio_ext.methods.base.scene_export import export_selection
from gsstudio_ext.viewer.model_actions import model_actions
from gsstudio_ext.viewer.query_panel import QueryPanel


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
    growth_cell_voxels: float = 16.0
    """Grid cell of level-0 anchor growth in voxels (levels 1, 2 divide it by 4, 16); new anchors get the cell as
    radius. 16 with the paper's tiny voxels; coarse voxels need ~1, or growth adds huge anchors."""
    growth_grad_threshold: float = 1.5e-4
    """Screen-gradient threshold for anchor growth (doubled per level)."""
    sh_degree_interval: int = 1000
    """Every this many steps one more SH degree is used."""
    graph_settings: GraphSettings = field(default_factory=GraphSettings)
    """Anchor-graph, super-anchor and selection-growth thresholds."""
    text_query_settings: TextQuerySettings = field(default_factory=TextQuerySettings)
    """Text-query rule (softmax over super-anchors) and its default threshold."""
    query: QueryConfig = field(default_factory=QueryConfig)
    """Text query shown in renders (ns-render reproduces it: set it here or in the run's config.yml)."""
    index_after_training: bool = True
    """At the last training step, cluster super-anchors and attach the dataset's mask embeddings to them (saved in
    the checkpoint, so queries need no dataset)."""


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
            growth_cell_voxels=cfg.growth_cell_voxels,
            offset_std=cfg.child_offset_init_std,
        )  # fmt: skip

    _train_edges: Optional[Tensor] = None
    _train_edges_count: int = -1
    _index: Optional[AnchorIndex] = None
    _encoders: Dict[str, Callable[[Sequence[str]], Tensor]]
    query_state: QueryState
    """The live selection (a click or text query) with undo; rendered as "selection" and "relevancy"."""

    def populate_modules(self) -> None:
        super().populate_modules()
        # The language index lives in buffers so that checkpoints carry it (resized on load by the base class).
        self.register_buffer("index_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("language_embeddings", torch.zeros(0, 0))
        self.register_buffer("language_matched", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("language_provider", torch.zeros(0, dtype=torch.uint8))
        self.query_state = QueryState()
        self._encoders = {}
        self._config_query_applied = False
        # Viewer: nerfstudio finds these attributes (names without a leading underscore) and sets them up.
        self.viewer_control = ViewerControl()
        query = self.config.query
        threshold = query.threshold if query.threshold is not None else self.config.text_query_settings.threshold
        self.query_panel = QueryPanel(
            model_actions(self, export=lambda path: export_selection(self, path)), self.viewer_control,
            text=query.text, negatives=", ".join(query.negatives), threshold=threshold, mode=query.mode,
        )  # fmt: skip

    @property
    def selection(self) -> Optional[Tensor]:
        """Selected children [N] bool, or None."""
        return self.query_state.selection

    @selection.setter
    def selection(self, value: Optional[Tensor]) -> None:
        self.query_state.push(value)

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
        """Cluster the anchors into super-anchors (after training); the labels are kept in the checkpoint."""
        self._index = build_index(
            self.gauss_params["anchor_xyz"].detach(), self.gauss_params["anchor_feat"].detach(), self.graph_voxel,
            self.config.graph_settings,
        )  # fmt: skip
        self.index_labels = self._index.labels.clone()
        return self._index

    @property
    def anchor_index(self) -> AnchorIndex:
        """Super-anchors of the current anchors: the saved ones, else clustered on first use."""
        if self._index is None or self._index.labels.shape[0] != self.num_anchors:
            if self.index_labels.shape[0] == self.num_anchors:
                self._index = index_from_labels(
                    self.gauss_params["anchor_xyz"].detach(), self.gauss_params["anchor_feat"].detach(),
                    self.index_labels, self.graph_voxel, self.config.graph_settings,
                )  # fmt: skip
            else:
                self.build_index()
        assert self._index is not None
        return self._index

    def instance_ids(self) -> Tensor:
        """Super-anchor id of every child [N] (the instance a Gaussian belongs to)."""
        return self.anchor_index.labels[self.gauss_params["point2anchor"]]

    # ------------------------------------------------------------------ language

    @property
    def language(self) -> Optional[GroupLanguage]:
        """The super-anchors' language embeddings, or None if the model has none (no embeddings in the dataset)."""
        if self.language_embeddings.numel() == 0 or self.index_labels.shape[0] != self.num_anchors:
            return None
        provider = bytes(self.language_provider.cpu().tolist()).decode()
        return GroupLanguage(self.index_labels, self.language_embeddings, self.language_matched, provider)

    def set_language(self, language: GroupLanguage) -> None:
        """Keep ``language`` (and its super-anchor labels) in the model's buffers, hence in checkpoints."""
        self.index_labels = language.labels.to(self.device).clone()
        self.language_embeddings = language.embeddings.float().to(self.device)
        self.language_matched = language.matched.to(self.device)
        self.language_provider = torch.tensor(list(language.provider.encode()), dtype=torch.uint8, device=self.device)
        self._index = None

    @torch.no_grad()
    def build_language(self, datamanager) -> Optional[GroupLanguage]:
        """Super-anchors, plus their language when the training views carry mask embeddings (one render per view)."""
        self.build_index()
        cached = getattr(datamanager, "cached_train", None) or []
        if not any(data.get("embeddings") is not None for data in cached):
            return None
        language = associate_language(self, datamanager)
        self.set_language(language)
        return language

    def text_encoder(self, provider: str) -> Callable[[Sequence[str]], Tensor]:
        """The query text encoder of an embedding provider (loaded once per model; never saved)."""
        from gsstudio_ext.data.embedding_sources import text_query_encoder

        if provider not in self._encoders:
            self._encoders[provider] = text_query_encoder(provider, device=self.device)
        return self._encoders[provider]

    @torch.no_grad()
    def text_query(self, text: str, negatives: Sequence[str] = (), threshold: Optional[float] = None) -> Tensor:
        """Select the children matching ``text`` (see :func:`match_text`); becomes the live selection (undoable)."""
        language = self.language
        if language is None:
            raise RuntimeError(
                "this ag2aussian-ext model has no language index: train it on a dataset with mask embeddings "
                "(run gs-preprocess on the dataset first, then ns-train ag2aussian-ext)"
            )
        positive, negative = encode_query(self.text_encoder(language.provider), text, negatives)
        settings = self.config.text_query_settings
        if threshold is not None:
            settings = TextQuerySettings(**{**vars(settings), "threshold": threshold})
        selected, relevancy = match_text(self, language, positive, negative, settings)
        self.query_state.push(selected, relevancy[self.instance_ids()].float())
        return selected

    @torch.no_grad()
    def click_query(self, camera, x: int, y: int, add: bool = False) -> Tensor:
        """Select the instance under pixel (x, y) of ``camera`` (added to the current selection with ``add``)."""
        return self.point_query(click_point(self, camera, x, y), add)

    @torch.no_grad()
    def point_query(self, point: Optional[Tensor], add: bool = False) -> Tensor:
        """Select the instance at a clicked 3D ``point`` (None, a click on nothing, selects nothing)."""
        if point is None:
            selected = torch.zeros(self.num_points, dtype=torch.bool, device=self.device)
        else:
            selected = select_by_point(self, point)
        if add and self.selection is not None and self.selection.shape == selected.shape:
            selected = selected | self.selection.to(selected.device)
        self.query_state.push(selected)
        return selected

    def _apply_config_query(self) -> None:
        """Run ``config.query.text`` once, on the first render after loading (ns-render, viewer start-up)."""
        self._config_query_applied = True
        if self.config.query.text and self.selection is None:
            query = self.config.query
            self.text_query(query.text, query.negatives, query.threshold)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        trainer, pipeline = training_callback_attributes.trainer, training_callback_attributes.pipeline
        if not self.config.index_after_training or trainer is None or pipeline is None:
            return callbacks
        last = getattr(trainer, "_start_step", 0) + trainer.config.max_num_iterations - 1

        def index_at_the_end(step: int) -> None:
            if step == last:  # before the final checkpoint is written
                self.build_language(pipeline.datamanager)

        callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], index_at_the_end))
        return callbacks

    def instance_features(self) -> Tensor:
        """Unit-norm instance feature of every child [N, D] (its anchor's)."""
        return child_instance_features(self.gauss_params)

    # ------------------------------------------------------------------ rendering

    def _live(self, value: Optional[Tensor]) -> Optional[Tensor]:
        """A per-child query tensor if it matches the current children (not while training)."""
        if self.training or value is None or value.shape[0] != self.num_points:
            return None
        return value.to(self.device)

    def render_filter(self) -> Optional[Tensor]:
        if not self.training and not self._config_query_applied:
            self._apply_config_query()
        selection = self._live(self.selection)
        if selection is None or self.config.query.mode == "highlight":
            return None
        return selection if self.config.query.mode == "isolate" else ~selection

    def feature_channels(self, crop_ids: Optional[Tensor], view: View) -> "OrderedDict[str, Tensor]":
        pick = (lambda t: t) if crop_ids is None else (lambda t: t[crop_ids])
        out: "OrderedDict[str, Tensor]" = OrderedDict(instance_feature=pick(self.instance_features()))
        if not self.training:
            out["instance"] = pick(id_colors(self.instance_ids()))
            for name, value in (("selection", self.selection), ("relevancy", self.query_state.relevancy)):
                live = self._live(value)
                if live is not None:
                    out[name] = pick(live.float()[:, None])
        if self.training and self.step >= self.config.distortion_from:
            viewmat = view.viewmat[0]
            z = (pick(self.means) @ viewmat[:3, :3].T + viewmat[:3, 3])[:, 2]
            m = losses.ndc_depth(z, self.config.distortion_near, self.config.distortion_far)
            out["depth_moments"] = torch.stack([m, m * m], dim=-1)
        return out

    def get_outputs(self, camera) -> Dict:
        outputs = super().get_outputs(camera)
        alpha = outputs.get("accumulation")
        for name in ("instance_feature", "instance", "relevancy"):
            if name in outputs:
                outputs[name] = losses.normalized_feature_map(outputs[name], alpha, self.config.feature_alpha_min)
        if "selection" in outputs and self.config.query.mode == "highlight":
            tint = torch.tensor(self.config.query.highlight_color, device=self.device)
            weight = 0.6 * outputs["selection"].clamp(0, 1)
            outputs["rgb"] = outputs["rgb"] * (1 - weight) + tint * weight
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
            params["offsets"], torch.exp(params["scales"]), params["anchor_radius"].index_select(0, p2a), visible
        )
        if self.step >= cfg.graph_from:
            anchor_visible = torch.zeros(self.num_anchors, device=p2a.device).index_add_(0, p2a, visible.float()) > 0
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
            feats = outputs["instance_feature"]
            masks = masks.to(feats.device)
            if masks.shape[1:] != feats.shape[:2]:
                masks = F.interpolate(masks[None].float(), size=feats.shape[:2], mode="nearest")[0] > 0.5
            if cfg.background_mask:
                covered = alpha[..., 0].detach() >= cfg.feature_alpha_min  # empty sky has no feature to smooth
                masks = torch.cat([masks, ~masks.any(dim=0, keepdim=True) & covered])
            smooth, contrast = losses.mask_losses(feats, masks, cfg.contrast_eps)
            loss_dict["mask"] = cfg.mask_loss_weight * (cfg.lambda_smooth * smooth + cfg.lambda_contrast * contrast)
        return loss_dict
