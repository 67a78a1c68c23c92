"""One sub-package per registered nerfstudio method, plus the shared feature-splatting base model."""
