"""The ``rtgs2-ext`` method: RT-GS2's two stages and optimizers on the multi-scene data manager."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Type

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig, OptimizerConfig
from nerfstudio.engine.schedulers import Scheduler, SchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification
from torch.optim import Optimizer, lr_scheduler

from gsstudio_ext.methods.base.training import default_device
from gsstudio_ext.methods.rtgs2.backbone import PointBackboneConfig
from gsstudio_ext.methods.rtgs2.fusion import FusionNetConfig
from gsstudio_ext.methods.rtgs2.model import RTGS2ModelConfig
from gsstudio_ext.methods.rtgs2.pairs import PairMiningConfig
from gsstudio_ext.methods.rtgs2.pipeline import RTGS2PipelineConfig
from gsstudio_ext.methods.rtgs2.ssl import SSLConfig
from gsstudio_ext.models.image_backbones import EfficientNetLite0EncoderConfig

SSL_STEPS = 2000
MAX_STEPS = 12000
"""Stage A 2,000 pair steps, then Stage B 10,000 batches of 4 views (~100 epochs of six 70-view scenes)."""


@dataclass
class AdamWOptimizerConfig(OptimizerConfig):
    """AdamW (decoupled weight decay; nerfstudio 1.1.5 ships Adam and RAdam only)."""

    _target: Type = torch.optim.AdamW
    weight_decay: float = 1e-4
    """Decoupled weight decay."""


@dataclass
class PolyWarmupSchedulerConfig(SchedulerConfig):
    """Linear warm-up from ``warmup_factor`` x lr, then poly decay with ``power``; both counted from ``start``."""

    _target: Type = field(default_factory=lambda: PolyWarmupScheduler)
    start: int = 0
    """Step at which this optimizer's stage begins (constant lr before)."""
    max_steps: int = MAX_STEPS
    """Last step of the schedule."""
    warmup_steps: int = 400
    """Linear warm-up length (official: 4 epochs)."""
    warmup_factor: float = 1e-3
    """Initial lr factor of the warm-up."""
    power: float = 0.9
    """Poly decay power."""


class PolyWarmupScheduler(Scheduler):
    config: PolyWarmupSchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        cfg = self.config
        length = max(cfg.max_steps - cfg.start, 1)

        def factor(step: int) -> float:
            t = step - cfg.start
            if t < 0:
                return 1.0
            if t < cfg.warmup_steps:
                return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * t / cfg.warmup_steps
            return max(1.0 - t / length, 0.0) ** cfg.power

        return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


def small_model(
    voxel: float, use_gaussian_features: bool = True, ssl_steps: int = 150, **overrides
) -> RTGS2ModelConfig:
    """A CPU-sized preset for small scenes (demo, tests): tiny backbone and feature branch, the real offline
    EfficientNet-Lite0 RGB encoder, backbone grid ``voxel`` (about a pixel footprint). Stage A subsamples at twice
    that, matches 256 correspondences, rotates about the up axis and mines pairs among every 3rd view. Use
    ``fusion_lr=1e-3`` in the trainer config."""
    backbone = PointBackboneConfig.tiny()
    backbone.grid_size = voxel
    fusion = FusionNetConfig.tiny(num_classes=2)
    fusion.rgb_encoder = EfficientNetLite0EncoderConfig()
    return RTGS2ModelConfig(
        backbone=backbone,
        fusion=fusion,
        ssl=SSLConfig(voxel_size=2 * voxel, max_correspondences=256, lr=3e-3, rotation_axis="z"),
        pairs=PairMiningConfig(anchor_every=3, min_gap=2),
        ssl_steps=ssl_steps if use_gaussian_features else 0,
        use_gaussian_features=use_gaussian_features,
        **overrides,
    )


def rtgs2_optimizers(ssl_steps: int, max_steps: int, backbone_lr: float = 1e-3, fusion_lr: float = 1e-4) -> dict:
    """Stage A: Adam 1e-3, weight decay 1e-5; Stage B: AdamW 1e-4, weight decay 1e-4, poly + warm-up; clip 1.0."""
    warmup = min(400, max(1, (max_steps - ssl_steps) // 25))
    return {
        "backbone": {
            "optimizer": AdamOptimizerConfig(lr=backbone_lr, weight_decay=1e-5, max_norm=1.0),
            "scheduler": None,
        },
        "fusion": {
            "optimizer": AdamWOptimizerConfig(lr=fusion_lr, weight_decay=1e-4, max_norm=1.0),
            "scheduler": PolyWarmupSchedulerConfig(start=ssl_steps, max_steps=max_steps, warmup_steps=warmup),
        },
    }


def rtgs2_trainer_config(
    model: Optional[RTGS2ModelConfig] = None,
    max_steps: int = MAX_STEPS,
    fusion_lr: float = 1e-4,
    pipeline: Optional[RTGS2PipelineConfig] = None,
) -> TrainerConfig:
    model = model or RTGS2ModelConfig(ssl_steps=SSL_STEPS)
    pipeline = pipeline or RTGS2PipelineConfig()
    pipeline.model = model
    ssl_steps = 0 if model.weights is not None else model.ssl_steps
    return TrainerConfig(
        method_name="rtgs2-ext",
        machine=MachineConfig(device_type=default_device()),
        steps_per_eval_image=1000,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=max_steps,
        max_num_iterations=max_steps,
        mixed_precision=False,
        pipeline=pipeline,
        optimizers=rtgs2_optimizers(ssl_steps, max_steps, fusion_lr=fusion_lr),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


rtgs2_ext = MethodSpecification(
    config=rtgs2_trainer_config(),
    description="RT-GS2: generalizable real-time semantic segmentation of trained Gaussian scenes.",
)
