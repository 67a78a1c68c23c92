"""Trainer configs for gsstudio methods: splatfacto's schedule and optimizers plus one group per feature tensor."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Mapping, Optional

from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

from gsstudio_ext.data.datamanager import SidecarDataManagerConfig
from gsstudio_ext.methods.base.training import default_device


def adam_group(lr: float, scheduler: Optional[ExponentialDecaySchedulerConfig] = None) -> Dict[str, Any]:
    """One optimizer entry: Adam (eps 1e-15, as splatfacto) with an optional scheduler."""
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


def splat_optimizers(max_steps: int = 30000, extra_lrs: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """splatfacto's optimizer settings, plus an Adam group per extra ``gauss_params`` entry (name -> lr)."""
    optimizers = {
        "means": adam_group(1.6e-4, ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps)),
        "features_dc": adam_group(0.0025),
        "features_rest": adam_group(0.0025 / 20),
        "opacities": adam_group(0.05),
        "scales": adam_group(0.005),
        "quats": adam_group(0.001),
        "camera_opt": adam_group(
            1e-4,
            ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        ),
        "bilateral_grid": adam_group(
            2e-3,
            ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        ),
    }
    for name, lr in (extra_lrs or {}).items():
        optimizers[name] = adam_group(lr)
    return optimizers


def gaussian_trainer_config(
    method_name: str,
    model: ModelConfig,
    datamanager: Optional[SidecarDataManagerConfig] = None,
    max_steps: int = 30000,
    extra_lrs: Optional[Mapping[str, float]] = None,
    pipeline: Optional[VanillaPipelineConfig] = None,
) -> TrainerConfig:
    """A TrainerConfig shaped like nerfstudio's ``splatfacto`` method, on the sidecar-aware data manager (a
    ``pipeline`` config of a VanillaPipeline subclass is filled in with ``datamanager`` and ``model``).

    The device defaults to CUDA when one is visible and to the CPU otherwise, so ``ns-train`` works on both.
    """
    return TrainerConfig(
        method_name=method_name,
        machine=MachineConfig(device_type=default_device()),
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=max_steps,
        mixed_precision=False,
        pipeline=replace(
            pipeline or VanillaPipelineConfig(),
            datamanager=datamanager if datamanager is not None else SidecarDataManagerConfig(),
            model=model,
        ),
        optimizers=splat_optimizers(max_steps, extra_lrs),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


# splatfacto's schedule compressed for a few hundred steps on a ~100x100 scene (demo, CPU tests): densify from step
# 100 every 50 steps, full resolution from the start, SH degree 1, white background as gs-synth renders it.
SHORT_SCHEDULE: Dict[str, Any] = dict(
    warmup_length=100,
    refine_every=50,
    num_downscales=0,
    sh_degree=1,
    sh_degree_interval=100,
    cull_alpha_thresh=0.005,
    background_color="white",
)
