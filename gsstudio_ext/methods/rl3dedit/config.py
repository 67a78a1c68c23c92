"""The ``rl3dedit-ext`` method: one single-pass edit of a trained scene; ns-train's steps are the refit steps."""

from __future__ import annotations

from nerfstudio.plugins.types import MethodSpecification

from gsstudio_ext.data.datamanager import SidecarDataManagerConfig
from gsstudio_ext.methods.base.trainer_config import gaussian_trainer_config
from gsstudio_ext.methods.rl3dedit.model import RL3DEditModelConfig
from gsstudio_ext.methods.rl3dedit.pipeline import RL3DEditPipelineConfig


def rl3dedit_trainer_config(model: RL3DEditModelConfig | None = None, max_steps: int | None = None):
    """3,000 refit steps [P] by default (``--max-num-iterations`` sets the refit length)."""
    model = model or RL3DEditModelConfig()
    steps = max_steps if max_steps is not None else model.edit.refit.steps
    config = gaussian_trainer_config(
        "rl3dedit-ext",
        model,
        datamanager=SidecarDataManagerConfig(),
        max_steps=steps,
        pipeline=RL3DEditPipelineConfig(),
    )
    config.optimizers = {}  # the refit owns its optimiser
    config.steps_per_eval_image = steps + 1  # eval images would compare the edit with the unedited photos
    config.steps_per_eval_all_images = steps + 1
    return config


rl3dedit_ext = MethodSpecification(
    config=rl3dedit_trainer_config(),
    description="RL3DEdit: single-pass multi-view-consistent editing of a trained scene (FLUX-Kontext grid + refit).",
)
