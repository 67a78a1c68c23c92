"""rtgs2-ext model: a generalizable semantic segmenter of already-trained Gaussian scenes (RT-GS2, spec §4).

It owns two networks and no scene parameters: the point backbone (Stage A, per-Gaussian view-independent features,
baked once per scene) and the VDVI fusion net (Stage B, rendered RGB + splatted features -> classes). Scenes are
frozen Gaussian clouds registered by the pipeline; the viewer and ns-render show the active one. Per frame: one
rasterization of RGB + 32 feature channels, then the fusion net.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, NamedTuple, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.base_model import Model, ModelConfig
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.palette import id_colors
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.methods.rtgs2.backbone import PointBackbone, PointBackboneConfig
from gsstudio_ext.methods.rtgs2.fusion import FusionNet, FusionNetConfig
from gsstudio_ext.methods.rtgs2.pairs import PairMiningConfig
from gsstudio_ext.methods.rtgs2.scene_features import FeatureCache, bake_features
from gsstudio_ext.methods.rtgs2.ssl import SSLConfig
from gsstudio_ext.viewer.semantic_panel import SemanticActions, SemanticPanel


class PointBatch(NamedTuple):
    """Backbone input: coords [M, 3], feats [M, 10], batch Long[M]."""

    coords: Tensor
    feats: Tensor
    batch: Tensor


class FusionBatch(NamedTuple):
    """Fusion input: rgb [B, 3, H, W], features [B, F, H, W]."""

    rgb: Tensor
    features: Tensor


@dataclass
class RTGS2ModelConfig(ModelConfig):
    """RT-GS2: point-backbone features baked per scene + RGB/feature fusion segmentation."""

    _target: Type = field(default_factory=lambda: RTGS2Model)
    backbone: PointBackboneConfig = field(default_factory=PointBackboneConfig)
    """Stage-A point backbone (PTv3-style serialized attention)."""
    fusion: FusionNetConfig = field(default_factory=FusionNetConfig)
    """Stage-B fusion network (its class count is taken from the dataset)."""
    ssl: SSLConfig = field(default_factory=SSLConfig)
    """Stage-A self-supervision (PointInfoNCE on Gaussian correspondences)."""
    pairs: PairMiningConfig = field(default_factory=PairMiningConfig)
    """Stage-A view-pair mining."""
    ssl_steps: int = 2000
    """Stage-A steps before Stage B starts (skipped when `weights` gives a trained backbone)."""
    batch_size: int = 4
    """Views per Stage-B step (official: 4 on Replica, 8 on ScanNet++)."""
    use_gaussian_features: bool = True
    """False = the RGB-only ablation: the same network with the feature input zeroed."""
    weights: Optional[Path] = None
    """A trained rtgs2-ext run (config.yml, run folder or .ckpt) whose backbone and fusion net to start from."""
    finetune: bool = False
    """Per-scene fine-tuning (official FINETUNE): no label smoothing, CE + ceco_weight x CeCo, zoom-in only."""
    label_smoothing: float = 0.15
    """Cross-entropy label smoothing of cross-scene training (0 when finetune)."""
    ceco_weight: float = 0.4
    """Weight of the CeCo centre-collapse regulariser in fine-tuning."""
    feature_cache: Optional[Path] = None
    """Folder for baked per-scene features (keyed by scene and backbone hashes); None = memory only."""
    background_color: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """RGB render background (the official renders are on black)."""
    inference_precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Autocast dtype of the fusion net at inference on CUDA (training and CPU inference run in float32)."""
    compile_inference: bool = False
    """torch.compile the fusion net for inference on CUDA (the first frames compile; then fewer kernel launches)."""


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the backbone and fusion weights of a trained rtgs2-ext run into ``model``."""
    from gsstudio_ext.core.checkpoint import find_latest_checkpoint

    run = path.parent if path.suffix in (".yml", ".yaml") else path  # a run's config.yml, as ns-* commands take it
    ckpt = torch.load(find_latest_checkpoint(run), map_location="cpu", weights_only=False)
    state = ckpt["pipeline"] if "pipeline" in ckpt else ckpt
    prefix = "_model."
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in own.items()}
    wanted = {k: v for k, v in own.items() if k.startswith(("backbone.", "fusion."))}
    if not wanted:
        raise ValueError(f"{path} holds no rtgs2-ext backbone/fusion weights")
    missing, _ = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if k.startswith(("backbone.", "fusion."))]
    if missing:
        raise ValueError(f"{path} does not match this model: missing {missing[:5]}... ({len(missing)} tensors)")


class RTGS2Model(Model):
    config: RTGS2ModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.classes: List[str] = list(self.kwargs["metadata"]["classes"])
        fusion = self.config.fusion
        fusion.num_classes = len(self.classes)
        fusion.feature_channels = self.config.backbone.out_channels
        self.backbone = PointBackbone(self.config.backbone)
        self.fusion = FusionNet(fusion)
        if self.config.weights is not None:
            load_weights(self, Path(self.config.weights))
        self.scenes: Dict[str, GaussianScene] = {}
        self.active_scene: Optional[str] = None
        self.class_filter: Optional[int] = None
        self.colour_rgb = False
        self._features = FeatureCache(Path(self.config.feature_cache)) if self.config.feature_cache else None
        self._memory: Dict[str, Tensor] = {}
        self._compiled: Optional[torch.nn.Module] = None
        self._channels_last = False
        self.register_buffer("palette", id_colors(torch.arange(len(self.classes))), persistent=False)
        self.palette[0] = 0.0  # class 0 (background / unlabelled in most lists) is drawn black

    # -------------------------------------------------------------- scenes and their features

    def register_scene(self, name: str, gaussians: GaussianScene) -> None:
        self.scenes[name] = gaussians
        self._memory.pop(name, None)
        if self.active_scene is None:
            self.active_scene = name

    def scene_features(self, name: str) -> Tensor:
        """[N, F] baked features of scene ``name`` (cached; zeros for the RGB-only ablation)."""
        scene = self.scenes[name]
        if not self.config.use_gaussian_features:
            return torch.zeros(scene.num_gaussians, self.config.backbone.out_channels, device=scene.device)
        if name not in self._memory:
            feats = self._features.get(self.backbone, scene) if self._features else bake_features(self.backbone, scene)
            self._memory[name] = feats.to(scene.device)
        return self._memory[name]

    def forget_features(self) -> None:
        """Drop baked features (after the backbone changed)."""
        self._memory.clear()

    def render_view(self, name: str, camera: Cameras, depth: bool = False) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(rgb [1, 3, H, W], features [1, F, H, W], depth [H, W, 1] or None) of scene ``name`` from one camera, in
        one rasterization."""
        scene = self.scenes[name]
        viewmat = viewmat_from_c2w(camera.camera_to_worlds.to(self.device))
        K = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        background = torch.tensor(self.config.background_color, device=self.device)
        out = render_scene(scene, viewmat, K, width, height, self.scene_features(name).float(), background, depth=depth)
        return (
            out.rgb.permute(0, 3, 1, 2),
            out.features.permute(0, 3, 1, 2),
            None if out.depth is None else out.depth[0],
        )

    # -------------------------------------------------------------- viewer

    def attach_panel(self) -> None:
        """Add the viewer's Semantics panel (after the scenes are registered)."""
        actions = SemanticActions(self.show_scene, self.set_class_filter, self.set_colouring)
        palette = self.palette.cpu().numpy()
        self.semantic_panel = SemanticPanel(actions, self.classes, palette, list(self.scenes), self.active_scene or "")

    def show_scene(self, name: str) -> None:
        if name not in self.scenes:
            raise ValueError(f"unknown scene {name!r}; loaded: {sorted(self.scenes)}")
        self.active_scene = name

    def set_class_filter(self, index: Optional[int]) -> None:
        self.class_filter = index

    def set_colouring(self, on: bool) -> None:
        self.colour_rgb = on

    # -------------------------------------------------------------- nerfstudio Model interface

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "fusion": list(self.fusion.parameters())}

    def forward(self, batch: Union[Cameras, PointBatch, FusionBatch]):  # type: ignore[override]
        """One entry point for every computation with gradients, so DistributedDataParallel sees them all."""
        if isinstance(batch, PointBatch):
            return self.backbone(batch.coords, batch.feats, batch.batch)
        if isinstance(batch, FusionBatch):
            return self.fusion(batch.rgb, batch.features)
        return self.get_outputs(batch)

    def get_outputs(self, camera: Cameras) -> Dict[str, Tensor]:  # type: ignore[override]
        """rgb, semantics (class colours), semantics_overlay, semantic_logits [H, W, C], semantic_ids, a colour view
        of the splatted Gaussian features and depth, for the active scene."""
        if self.active_scene is None:
            raise RuntimeError("rtgs2-ext has no scene to render: the pipeline registers its scenes at start-up")
        rgb, feats, depth = self.render_view(self.active_scene, camera, depth=True)
        logits = self.fusion(rgb, feats).logits if self.training else self.segment_logits(rgb, feats)
        return {**self.semantic_outputs(rgb[0].permute(1, 2, 0), feats[0], logits[0].float()), "depth": depth}

    def segment_logits(self, rgb: Tensor, feats: Tensor) -> Tensor:
        """Inference logits [B, C, H, W] of the fusion net (autocast and compiled on CUDA as configured)."""
        cuda = rgb.is_cuda
        fusion = self.fusion
        if cuda:  # NHWC convolutions are the fast path of cuDNN for ConvNeXt-style depthwise + pointwise stacks
            if not self._channels_last:
                self.fusion.to(memory_format=torch.channels_last)
                self._channels_last = True
            rgb = rgb.contiguous(memory_format=torch.channels_last)
            feats = feats.contiguous(memory_format=torch.channels_last)
        if cuda and self.config.compile_inference:
            if self._compiled is None:
                self._compiled = torch.compile(self.fusion, mode="reduce-overhead")
            fusion = self._compiled
        dtype = getattr(torch, self.config.inference_precision)
        use_autocast = cuda and dtype != torch.float32
        with torch.autocast("cuda", dtype=dtype) if use_autocast else contextlib.nullcontext():
            return fusion(rgb, feats).logits

    def semantic_outputs(self, rgb: Tensor, feats: Tensor, logits: Tensor) -> Dict[str, Tensor]:
        ids = logits.argmax(dim=0)
        colours = self.palette[ids]
        shown = torch.ones_like(ids, dtype=torch.bool)
        if self.class_filter is not None:
            shown = ids == self.class_filter
            colours = torch.where(shown[..., None], colours, 0.25 * rgb)
        overlay = torch.where(shown[..., None], 0.5 * rgb + 0.5 * colours, rgb)
        return {
            "rgb": overlay if self.colour_rgb else rgb,
            "semantics": colours,
            "semantics_overlay": overlay,
            "semantic_logits": logits.permute(1, 2, 0),
            "semantic_ids": ids,
            "gaussian_features": torch.sigmoid(feats[:3].permute(1, 2, 0) * 2.0),
        }

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> Dict[str, Tensor]:  # type: ignore[override]
        return self.get_outputs(camera.to(self.device))

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        return {}

    def get_image_metrics_and_images(self, outputs, batch):  # the pipeline pools confusion matrices instead
        images = {"semantics": torch.cat([outputs["rgb"], outputs["semantics"]], dim=1)}
        labels = batch.get("semantics")
        if labels is not None:
            gt = self.palette[labels.clamp_min(0)]
            images["semantics"] = torch.cat([images["semantics"], gt], dim=1)
        return {}, images
