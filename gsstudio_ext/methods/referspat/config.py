"""The ``referspat-ext`` method: ReferSplat's optimizers on the sidecar data manager (instances + expressions)."""

from __future__ import annotations

from nerfstudio.plugins.types import MethodSpecification

from gsstudio_ext.data.datamanager import SidecarDataManagerConfig
from gsstudio_ext.methods.base.trainer_config import adam_group, gaussian_trainer_config
from gsstudio_ext.methods.referspat.model import ReferModelConfig
from gsstudio_ext.methods.referspat.pipeline import ReferPipelineConfig

MAX_STEPS = 1000
"""5 epochs of a Ref-LERF scene (about 200 views): one step renders one view with all of its expressions."""

# For ~150 CPU steps on the ~100x100 default scene (demo, tests): 4x / 10x the learning rates, white background as
# gs-synth renders it.
SHORT_SCHEDULE = dict(background_color="white")
SHORT_LRS = dict(referring=0.01, referring_fields=1e-3)


def refer_optimizers(referring: float = 2.5e-3, referring_fields: float = 1e-4) -> dict:
    """ReferSplat's Adam settings: referring features 2.5e-3, attention and MLPs 1e-4 (no schedule)."""
    return {"referring": adam_group(referring), "referring_fields": adam_group(referring_fields)}


def refer_trainer_config(model: ReferModelConfig | None = None, max_steps: int = MAX_STEPS, **lrs: float):
    config = gaussian_trainer_config(
        "referspat-ext",
        model or ReferModelConfig(),
        datamanager=SidecarDataManagerConfig(sidecars=("instances", "expressions")),
        max_steps=max_steps,
        pipeline=ReferPipelineConfig(),
    )
    config.optimizers = refer_optimizers(**lrs)
    config.steps_per_eval_image = max_steps + 1  # RGB is frozen: nothing new to show
    return config


referspat_ext = MethodSpecification(
    config=refer_trainer_config(),
    description="ReferSplat: referring segmentation of a trained scene from natural-language expressions.",
)
