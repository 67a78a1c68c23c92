"""``gsstudio-splatfacto``: the base model as a method of its own (splatfacto that also trains on CPU)."""

from nerfstudio.plugins.types import MethodSpecification

from gsstudio_ext.methods.base.model import FeatureSplatfactoModelConfig
from gsstudio_ext.methods.base.trainer_config import gaussian_trainer_config

gsstudio_splatfacto = MethodSpecification(
    # RGB only by default; `--pipeline.model.feature-dims feature 13` adds channels, trained by the "feature" group.
    config=gaussian_trainer_config(
        "gsstudio-splatfacto", FeatureSplatfactoModelConfig(), extra_lrs={"feature": 0.0025}
    ),
    description="Splatfacto with optional per-Gaussian feature channels; gsplat on GPU, pure-torch rasterizer on CPU.",
)
