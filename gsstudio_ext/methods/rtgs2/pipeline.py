"""rtgs2-ext pipeline: Stage A (self-supervised backbone on view pairs) then Stage B (fusion net on cached renders of
the train scenes), cross-scene evaluation with pooled confusion matrices, DistributedDataParallel when launched on
several devices."""

from __future__ import annotations

import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.distributed as dist
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes
from nerfstudio.pipelines.base_pipeline import Pipeline, VanillaPipelineConfig
from nerfstudio.utils import profiler
from torch import Tensor
from torch.nn import Parameter
from torch.nn.parallel import DistributedDataParallel as DDP

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.eval.semantic_segmentation import (
    ConfusionMatrix,
    pooled_metrics,
    semantic_result,
    write_semantic_report,
)
from gsstudio_ext.methods.rtgs2.augment import AugmentConfig, augment_batch
from gsstudio_ext.methods.rtgs2.datamanager import MultiSceneDataManager, MultiSceneDataManagerConfig
from gsstudio_ext.methods.rtgs2.losses import ceco_loss, etf_classifier, segmentation_loss
from gsstudio_ext.methods.rtgs2.model import FusionBatch, PointBatch, RTGS2Model, RTGS2ModelConfig
from gsstudio_ext.methods.rtgs2.pairs import ViewCamera, ViewPair, mine_pairs
from gsstudio_ext.methods.rtgs2.ssl import ssl_loss


@dataclass
class RTGS2PipelineConfig(VanillaPipelineConfig):
    """Cross-scene RT-GS2 training and evaluation."""

    _target: Type = field(default_factory=lambda: RTGS2Pipeline)
    datamanager: MultiSceneDataManagerConfig = field(default_factory=MultiSceneDataManagerConfig)
    model: RTGS2ModelConfig = field(default_factory=RTGS2ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Stage-B augmentation (fine-tuning uses zoom-in only)."""
    cache_renders: bool = True
    """Render every train view (RGB + features) once when Stage B starts, as the official code trains on saved
    renders; False renders each sampled view anew (less memory for very large scene sets)."""
    seed: int = 0
    """Seed of pair and view sampling and augmentation (offset by the process rank)."""


class ViewRender(typing.NamedTuple):
    rgb: Tensor
    features: Tensor
    labels: Tensor


def view_cameras(cameras) -> List[ViewCamera]:
    viewmats = viewmat_from_c2w(cameras.camera_to_worlds)
    Ks = cameras.get_intrinsics_matrices()
    sizes = zip(cameras.width.view(-1).tolist(), cameras.height.view(-1).tolist())
    return [ViewCamera(v, k, int(w), int(h)) for v, k, (w, h) in zip(viewmats, Ks, sizes)]


class RTGS2Pipeline(Pipeline):
    config: RTGS2PipelineConfig
    datamanager: MultiSceneDataManager

    def __init__(
        self,
        config: RTGS2PipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Optional[torch.cuda.amp.GradScaler] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.test_mode = test_mode
        self.datamanager = config.datamanager.setup(
            device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank
        )
        self.datamanager.to(device)
        self._model = config.model.setup(
            scene_box=self.datamanager.train_dataset.scene_box,
            num_train_data=len(self.datamanager.train_dataset),
            metadata={"classes": self.datamanager.classes},
            device=device,
            grad_scaler=grad_scaler,
        )
        self.model.to(device)
        for name, loaded in self.datamanager.scenes.items():
            self.model.register_scene(name, loaded.gaussians)
        self.model.active_scene = (self.datamanager.unseen_names or self.datamanager.train_names)[0]
        self.model.attach_panel()
        self.world_size = world_size
        if world_size > 1:
            ids = [local_rank] if torch.device(device).type == "cuda" else None
            self._model = typing.cast(RTGS2Model, DDP(self._model, device_ids=ids, find_unused_parameters=True))
        self.rng = random.Random(config.seed + local_rank)
        self.generator = torch.Generator().manual_seed(config.seed + local_rank)
        self._pairs: Optional[Dict[str, List[ViewPair]]] = None
        self._renders: Dict[Tuple[str, int], ViewRender] = {}
        self._etf: Optional[Tensor] = None
        self.stage_b_started = False
        self.last_confusion: Dict[str, Dict[str, ConfusionMatrix]] = {}
        """Protocol -> scene -> confusion matrix of the last get_average_eval_image_metrics."""

    @property
    def model(self) -> RTGS2Model:
        return self._model.module if isinstance(self._model, DDP) else self._model  # type: ignore[return-value]

    def load_pipeline(self, loaded_state: Dict[str, Tensor], step: int) -> None:
        """Load a checkpoint's pipeline state (nerfstudio's base Pipeline leaves this to subclasses)."""
        state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in loaded_state.items()}
        self.model.update_to_step(step)
        self.load_state_dict(state)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return self.model.get_param_groups()

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        return self.model.get_training_callbacks(training_callback_attributes)

    # -------------------------------------------------------------- Stage A

    def ssl_active(self, step: int) -> bool:
        cfg = self.model.config
        return cfg.weights is None and cfg.use_gaussian_features and step < cfg.ssl_steps

    def view_pairs(self) -> Dict[str, List[ViewPair]]:
        """Mined once: the view pairs of every train scene that has any."""
        if self._pairs is None:
            self._pairs = {}
            for name in self.datamanager.train_names:
                loaded = self.datamanager.scenes[name]
                cams = view_cameras(loaded.train.cameras.to(self.device))
                pairs = mine_pairs(loaded.gaussians, cams, self.model.config.pairs)
                if pairs:
                    self._pairs[name] = pairs
            if not self._pairs:
                raise RuntimeError(
                    "Stage A found no view pair in any train scene; loosen pipeline.model.pairs (jaccard_range, "
                    "anchor_every, min_gap) for this camera density"
                )
        return self._pairs

    def ssl_step(self) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        pairs = self.view_pairs()
        name = self.rng.choice(sorted(pairs))
        pair = self.rng.choice(pairs[name])
        scene = self.datamanager.scenes[name].gaussians

        def backbone(coords: Tensor, feats: Tensor, batch: Optional[Tensor] = None) -> Tensor:
            return self._model(PointBatch(coords, feats, batch))

        out = ssl_loss(backbone, scene, pair, self.model.config.ssl, self.generator)
        return {"contrastive": out["contrastive"]}, {"match_accuracy": out["match_accuracy"].detach()}

    # -------------------------------------------------------------- Stage B

    def start_stage_b(self) -> None:
        """Bake every scene's features with the final backbone and (optionally) render every train view once."""
        self.model.forget_features()
        self.model.backbone.requires_grad_(False)
        if self.config.cache_renders:
            with torch.no_grad():
                for name in self.datamanager.train_names:
                    for index in range(len(self.datamanager.scenes[name].train.stems)):
                        self._renders[(name, index)] = self.render_train_view(name, index)
        self.stage_b_started = True

    def render_train_view(self, name: str, index: int) -> ViewRender:
        camera = self.datamanager.camera(name, index, "train")
        rgb, feats, _ = self.model.render_view(name, camera)
        labels = self.datamanager.labels(name, index, "train")
        if labels is None:
            raise ValueError(f"scene {name!r} has no semantic maps (sidecars/semantics) for its train views")
        return ViewRender(rgb[0], feats[0], labels)

    def fusion_step(self) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        cfg = self.model.config
        views = []
        for key in self.datamanager.sample_train_views(cfg.batch_size):
            view = self._renders.get(key)
            if view is None:
                with torch.no_grad():
                    view = self.render_train_view(*key)
            views.append(view)
        rgb = torch.stack([v.rgb for v in views])
        feats = torch.stack([v.features for v in views])
        labels = torch.stack([v.labels for v in views])
        augment = AugmentConfig.finetune() if cfg.finetune else self.config.augment
        rgb, feats, labels = augment_batch(rgb, feats, labels, augment, self.generator)
        out = self._model(FusionBatch(rgb, feats))
        smoothing = 0.0 if cfg.finetune else cfg.label_smoothing
        losses = {"semantic": segmentation_loss(out.logits, labels, label_smoothing=smoothing)}
        if cfg.finetune and cfg.ceco_weight > 0:
            if self._etf is None:
                gen = torch.Generator().manual_seed(self.config.seed)
                self._etf = etf_classifier(out.embedding.shape[1], len(self.model.classes), generator=gen)
            losses["ceco"] = cfg.ceco_weight * ceco_loss(out.embedding, labels, self._etf.to(out.embedding.device))
        valid = labels >= 0
        accuracy = (out.logits.argmax(1) == labels)[valid].float().mean() if bool(valid.any()) else labels.new_zeros(())
        return losses, {"pixel_accuracy": accuracy.detach()}

    @profiler.time_function
    def get_train_loss_dict(self, step: int):
        if self.ssl_active(step):
            losses, metrics = self.ssl_step()
        else:
            if not self.stage_b_started:
                self.start_stage_b()
            losses, metrics = self.fusion_step()
        return {}, losses, metrics

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def segment(self, name: str, index: int) -> Tensor:
        """Long [H, W] predicted classes of test view ``index`` of scene ``name``."""
        rgb, feats, _ = self.model.render_view(name, self.datamanager.camera(name, index))
        return self.model.segment_logits(rgb, feats)[0].argmax(dim=0)

    def confusion(self, names: List[str]) -> Dict[str, ConfusionMatrix]:
        matrices = {}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for name in names:
            cm = ConfusionMatrix(len(self.model.classes), device=self.device)
            for scene, index in self.datamanager.eval_views([name])[rank::world]:  # summed over ranks by reduce()
                labels = self.datamanager.labels(scene, index)
                if labels is not None:
                    cm.update(self.segment(scene, index), labels)
            matrices[name] = cm
        return matrices

    @profiler.time_function
    def get_eval_loss_dict(self, step: int):
        return {}, {}, {}

    @profiler.time_function
    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        camera, batch = self.datamanager.next_eval_image(step)
        previous, self.model.active_scene = self.model.active_scene, batch["scene"]
        try:
            outputs = self.model.get_outputs_for_camera(camera)
        finally:
            self.model.active_scene = previous
        _, images = self.model.get_image_metrics_and_images(outputs, batch)
        metrics: Dict[str, float] = {}
        if batch["semantics"] is not None:
            cm = ConfusionMatrix(len(self.model.classes), device=self.device)
            cm.update(outputs["semantic_ids"], batch["semantics"])
            metrics = {"miou": cm.miou(), "oacc": cm.oacc()}
        self.train()
        return metrics, images

    @profiler.time_function
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        """Pooled-confusion mIoU / mAcc / oAcc (spec §4.6): cross-scene over the unseen scenes' test views and
        novel-view over the train scenes' test views, plus each scene's numbers. With ``output_path``, also the
        per-class tables and confusion-matrix PNGs."""
        self.eval()
        metrics: Dict[str, float] = {}
        classes = self.model.classes
        self.last_confusion = {}
        for protocol, names in (
            ("cross_scene", self.datamanager.unseen_names),
            ("novel_view", self.datamanager.train_names),
        ):
            if not names:
                continue
            matrices = {name: cm.reduce() for name, cm in self.confusion(names).items()}
            self.last_confusion[protocol] = matrices
            result = semantic_result(matrices, classes, protocol=protocol)
            for key, value in pooled_metrics(result).items():
                metrics[f"{protocol}/{key}"] = value
            for scene in result.scenes:
                metrics[f"{protocol}/{scene.scene}/miou"] = scene.metrics["miou"]
            if output_path is not None:
                write_semantic_report(Path(output_path), matrices, classes, protocol=protocol)
        main = "cross_scene" if self.datamanager.unseen_names else "novel_view"
        for key in ("miou", "macc", "oacc"):
            metrics[key] = metrics[f"{main}/{key}"]
        self.train()
        return metrics
