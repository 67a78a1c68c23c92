"""The CPU preset of rtgs2-ext for the generated ``rtgs2_scenes`` set (64x64 tabletop scenes, white sky)."""

from __future__ import annotations

from gsstudio_ext.methods.rtgs2.config import small_model
from gsstudio_ext.methods.rtgs2.model import RTGS2ModelConfig

VOXEL = 0.01
"""About one pixel footprint of these scenes (metres)."""


def tiny_model(use_features: bool = True, ssl_steps: int = 0, **overrides) -> RTGS2ModelConfig:
    return small_model(VOXEL, use_features, ssl_steps, background_color=(1.0, 1.0, 1.0), **overrides)
