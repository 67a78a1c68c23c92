"""Name -> config factories, for choosing a model provider on the command line (``--text-encoder minilm``)."""

from __future__ import annotations

from typing import Any, Callable, Dict

from gsstudio_ext.models.box_masks import BoxSegmenterConfig, SamBoxConfig, TinySamBoxConfig
from gsstudio_ext.models.detection import DetectorConfig, GroundingDinoConfig, TinyGroundingDinoConfig
from gsstudio_ext.models.flux_kontext import FluxKontextConfig, KontextEditorConfig
from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig
from gsstudio_ext.models.image_text import ImageTextEncoderConfig, OpenCLIPImageTextConfig, TinyImageTextConfig
from gsstudio_ext.models.masks import MaskGeneratorConfig, SamAutomaticConfig, TinySamConfig
from gsstudio_ext.models.perceptual import LpipsVggConfig, PerceptualConfig, TinyPerceptualConfig
from gsstudio_ext.models.text import (
    BertTextConfig,
    MiniLMTextConfig,
    OpenCLIPTextConfig,
    TextEncoderConfig,
    TinyTextConfig,
)


def _sam_coarse() -> SamAutomaticConfig:
    """AG2aussian's 'coarse' SAM level: 32 points/side, pred-IoU 0.88, stability 0.95, no crops, min region 100."""
    return SamAutomaticConfig(
        points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95, crop_n_layers=0, min_mask_region_area=100
    )


TEXT_ENCODERS: Dict[str, Callable[[], TextEncoderConfig]] = {
    "minilm": MiniLMTextConfig,
    "bert": BertTextConfig,
    "openclip": OpenCLIPTextConfig,
    "tiny": TinyTextConfig,
}
IMAGE_TEXT_ENCODERS: Dict[str, Callable[[], ImageTextEncoderConfig]] = {
    "openclip": OpenCLIPImageTextConfig,
    "tiny": TinyImageTextConfig,
}
MASK_GENERATORS: Dict[str, Callable[[], MaskGeneratorConfig]] = {
    "sam": SamAutomaticConfig,
    "sam-coarse": _sam_coarse,
    "tiny": TinySamConfig,
}
DETECTORS: Dict[str, Callable[[], DetectorConfig]] = {
    "grounding-dino": GroundingDinoConfig,
    "tiny": TinyGroundingDinoConfig,
}
BOX_SEGMENTERS: Dict[str, Callable[[], BoxSegmenterConfig]] = {
    "sam": SamBoxConfig,
    "tiny": TinySamBoxConfig,
}
KONTEXT_EDITORS: Dict[str, Callable[[], KontextEditorConfig]] = {
    "flux-kontext": FluxKontextConfig,
    "tiny": TinyFluxKontextConfig,
}
PERCEPTUAL_DISTANCES: Dict[str, Callable[[], PerceptualConfig]] = {
    "lpips-vgg": LpipsVggConfig,
    "tiny": TinyPerceptualConfig,
}


def _make(kind: str, table: Dict[str, Callable[[], Any]], name: str, overrides: Dict[str, Any]) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    config = table[name]()
    for key, value in overrides.items():
        if not hasattr(config, key) or key.startswith("_"):
            raise ValueError(f"{type(config).__name__} has no setting {key!r}")
        setattr(config, key, value)
    return config


def text_encoder_config(name: str = "minilm", **overrides: Any) -> TextEncoderConfig:
    """Config of a text encoder by name (minilm, bert, openclip, tiny), with field overrides."""
    return _make("text encoder", TEXT_ENCODERS, name, overrides)


def image_text_encoder_config(name: str = "openclip", **overrides: Any) -> ImageTextEncoderConfig:
    """Config of an image-text encoder by name (openclip, tiny), with field overrides."""
    return _make("image-text encoder", IMAGE_TEXT_ENCODERS, name, overrides)


def mask_generator_config(name: str = "sam", **overrides: Any) -> MaskGeneratorConfig:
    """Config of a mask generator by name (sam, sam-coarse, tiny), with field overrides."""
    return _make("mask generator", MASK_GENERATORS, name, overrides)


def detector_config(name: str = "grounding-dino", **overrides: Any) -> DetectorConfig:
    """Config of an open-vocabulary box detector by name (grounding-dino, tiny), with field overrides."""
    return _make("detector", DETECTORS, name, overrides)


def box_segmenter_config(name: str = "sam", **overrides: Any) -> BoxSegmenterConfig:
    """Config of a box-prompted segmenter by name (sam, tiny), with field overrides."""
    return _make("box segmenter", BOX_SEGMENTERS, name, overrides)


def kontext_editor_config(name: str = "flux-kontext", **overrides: Any) -> KontextEditorConfig:
    """Config of a FLUX.1-Kontext editor by name (flux-kontext, tiny), with field overrides."""
    return _make("Kontext editor", KONTEXT_EDITORS, name, overrides)


def perceptual_config(name: str = "lpips-vgg", **overrides: Any) -> PerceptualConfig:
    """Config of a perceptual distance by name (lpips-vgg, tiny), with field overrides."""
    return _make("perceptual distance", PERCEPTUAL_DISTANCES, name, overrides)
