"""One sub-package per registered nerfstudio method, plus the shared feature-splatting base model."""

from gsstudio_ext.compat import allow_numpy_scalars_in_checkpoints

allow_numpy_scalars_in_checkpoints()
