"""The ``ag2aussian-ext`` method: trainer config with AG2aussian's schedule and learning rates."""

from __future__ import annotations

from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from gsstudio_ext.data.datamanager import SidecarDataManagerConfig
from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig
from gsstudio_ext.methods.ag2aussian.pipeline import AG2PipelineConfig
from gsstudio_ext.methods.base.trainer_config import adam_group, gaussian_trainer_config

MAX_STEPS = 35000

# AG2aussian's 35k-step schedule compressed for a few hundred steps on a ~100x100 scene (demo, CPU tests): coarser
# anchors (grown at the voxel size, not 16 voxels), the mask loss from the start, densification and distortion
# early, object GT masks plus a background mask.
SHORT_SCHEDULE = dict(
    num_downscales=0,
    sh_degree=1,
    sh_degree_interval=100,
    background_color="white",
    voxel_size=0.04,
    growth_cell_voxels=1.0,
    child_init_opacity=0.1,
    densify_from=100,
    densify_every=50,
    opacity_reset_every=100000,
    mask_loss_from=50,
    distortion_from=150,
    alpha_from=100,
    background_mask=True,
)


def ag2_optimizers(max_steps: int = MAX_STEPS) -> dict:
    """Children: offsets 1e-3 -> 1e-4 (exponential decay), SH DC 2.5e-3, rest 1.25e-4, opacity 0.05, scale 5e-3,
    rotation 1e-3; anchors: instance feature 0.05. Anchor positions and radii are fixed (not optimised)."""

    return {
        "offsets": adam_group(1e-3, ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps)),
        "features_dc": adam_group(2.5e-3),
        "features_rest": adam_group(1.25e-4),
        "opacities": adam_group(0.05),
        "scales": adam_group(5e-3),
        "quats": adam_group(1e-3),
        "anchor_feat": adam_group(0.05),
        "camera_opt": adam_group(1e-4, ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=max_steps)),
    }


def ag2_trainer_config(model: AG2ModelConfig | None = None, max_steps: int = MAX_STEPS):
    config = gaussian_trainer_config(
        "ag2aussian-ext",
        model or AG2ModelConfig(),
        datamanager=SidecarDataManagerConfig(sidecars=("instances",)),
        max_steps=max_steps,
        pipeline=AG2PipelineConfig(),
    )
    config.optimizers = ag2_optimizers(max_steps)
    return config


ag2aussian_ext = MethodSpecification(
    config=ag2_trainer_config(),
    description="AG2aussian: anchor-graph instance + language features; click and text queries select Gaussians.",
)
