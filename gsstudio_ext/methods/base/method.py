"""``gsstudio-splatfacto``: the base model as a method of its own (splatfacto that also trains on CPU)."""

from nerfstudio.plugins.types import MethodSpecification

from gsstudio_ext.methods.base.model import FeatureSplatfactoModelConfig
from gsstudio_ext.methods.base.trainer_config import gaussian_trainer_config

gsstudio_splatfacto = MethodSpecification(
    config=gaussian_trainer_config("gsstudio-splatfacto", FeatureSplatfactoModelConfig()),
    description="Splatfacto with optional per-Gaussian feature channels; gsplat on GPU, pure-torch rasterizer on CPU.",
)
