"""Pure-torch building blocks (no nerfstudio import): scenes, PLY I/O, rasterization, feature ops, metrics."""
