"""The ``romap-ext`` method: 3D-GALP label fitting on a trained scene (RoMaP's Stage A schedule), then an optional
part edit."""

from __future__ import annotations

from nerfstudio.plugins.types import MethodSpecification

from gsstudio_ext.data.datamanager import SidecarDataManagerConfig
from gsstudio_ext.methods.base.trainer_config import adam_group, gaussian_trainer_config
from gsstudio_ext.methods.romap.galp import GALPConfig
from gsstudio_ext.methods.romap.model import RoMaPModelConfig
from gsstudio_ext.methods.romap.pipeline import RoMaPPipelineConfig


def romap_optimizers(galp: GALPConfig) -> dict:
    """Adam (eps 1e-15) on the label SH: DC at ``lr_dc`` (0.0125), the rest at lr_dc / 20."""
    return {
        "part_labels_dc": adam_group(galp.lr_dc),
        "part_labels_rest": adam_group(galp.lr_dc / galp.lr_rest_factor),
    }


def romap_trainer_config(model: RoMaPModelConfig | None = None, max_steps: int | None = None):
    """One training step = one 3D-GALP step (600 for reconstructed scenes)."""
    model = model or RoMaPModelConfig()
    steps = max_steps if max_steps is not None else model.editor.galp.steps
    config = gaussian_trainer_config(
        "romap-ext",
        model,
        datamanager=SidecarDataManagerConfig(),
        max_steps=steps,
        pipeline=RoMaPPipelineConfig(),
    )
    config.optimizers = romap_optimizers(model.editor.galp)
    config.steps_per_eval_image = steps + 1  # RGB is frozen: nothing new to show
    config.steps_per_eval_all_images = steps + 1
    return config


romap_ext = MethodSpecification(
    config=romap_trainer_config(),
    description="RoMaP: 3D part segmentation (3D-GALP) and part-level editing of a trained scene.",
)
