"""Class-agnostic mask generators ("segment everything"), driven through segment_anything's automatic generator.

Backends: :class:`SamAutomaticConfig` (a released SAM checkpoint, e.g. ``sam_vit_h_4b8939.pth``) and
:class:`TinySamConfig` (a real ``segment_anything.modeling.Sam`` with tiny dimensions and seeded random weights, run
through the very same ``SamAutomaticMaskGenerator`` path, for tests). Results are a :class:`MaskProposals` sorted by
score = predicted IoU x stability score (AG2aussian's ranking); clean them with
:func:`gsstudio_ext.core.masks.mask_nms`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Type

import numpy as np
import torch
from nerfstudio.configs.base_config import InstantiateConfig

from gsstudio_ext.core.masks import mask_nms  # noqa: F401  (re-exported: masks and their NMS live together)
from gsstudio_ext.models.errors import MissingWeightsError, require_path
from gsstudio_ext.models.provider import Device, LazyProvider

SAM_CHECKPOINTS: Dict[str, str] = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass
class MaskProposals:
    """Masks of one image, sorted by descending score."""

    masks: np.ndarray
    """Bool[M, H, W]."""
    scores: np.ndarray
    """Float32[M] = predicted_iou * stability_score."""
    predicted_iou: np.ndarray
    """Float32[M], SAM's own quality estimate."""
    stability_score: np.ndarray
    """Float32[M], IoU of the mask thresholded at +/- the stability offset."""

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def select(self, index: Any) -> "MaskProposals":
        """Subset (e.g. the indices returned by ``mask_nms``)."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        return MaskProposals(self.masks[idx], self.scores[idx], self.predicted_iou[idx], self.stability_score[idx])


@dataclass
class MaskGeneratorConfig(InstantiateConfig):
    """Knobs of segment_anything's SamAutomaticMaskGenerator (defaults are SAM's, tuned for ViT-H)."""

    _target: Type = field(default_factory=lambda: MaskGenerator)
    points_per_side: int = 32
    """Point prompts per image side (points_per_side**2 prompts)."""
    points_per_batch: int = 64
    """Prompts run through the decoder at once (memory vs speed)."""
    pred_iou_thresh: float = 0.88
    """Drop masks whose predicted IoU is at or below this."""
    stability_score_thresh: float = 0.95
    """Drop masks whose stability score is below this."""
    stability_score_offset: float = 1.0
    """Logit offset used by the stability score."""
    box_nms_thresh: float = 0.7
    """Box IoU above which SAM drops duplicate masks."""
    crop_n_layers: int = 0
    """Extra passes on image crops (0 = none; AG2aussian's 'coarse' level uses none)."""
    crop_nms_thresh: float = 0.7
    """Box IoU for duplicates between crops."""
    crop_overlap_ratio: float = 512 / 1500
    """Overlap of neighbouring crops, as a fraction of the image side."""
    crop_n_points_downscale_factor: int = 1
    """Points per side divide by this factor at each crop layer."""
    min_mask_region_area: int = 0
    """Remove holes and islands below this many pixels (needs OpenCV; AG2aussian's 'coarse' level uses 100)."""
    min_area: int = 1
    """Drop masks with fewer pixels than this after generation (1 drops empty masks)."""


class MaskGenerator(LazyProvider):
    """Lazy mask generator; ``model`` stays None until the first :meth:`generate` (or :meth:`load`)."""

    config: MaskGeneratorConfig

    def __init__(self, config: MaskGeneratorConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.generator: Any = None

    @abstractmethod
    def _build(self) -> torch.nn.Module:
        """Return the segment_anything ``Sam`` model with its weights (on CPU is fine)."""

    def _load(self) -> None:
        """Build the model and wrap it in segment_anything's automatic generator."""
        from segment_anything import SamAutomaticMaskGenerator

        model = self._build().to(self.device)
        c = self.config
        self.generator = SamAutomaticMaskGenerator(
            model,
            points_per_side=c.points_per_side,
            points_per_batch=c.points_per_batch,
            pred_iou_thresh=c.pred_iou_thresh,
            stability_score_thresh=c.stability_score_thresh,
            stability_score_offset=c.stability_score_offset,
            box_nms_thresh=c.box_nms_thresh,
            crop_n_layers=c.crop_n_layers,
            crop_nms_thresh=c.crop_nms_thresh,
            crop_overlap_ratio=c.crop_overlap_ratio,
            crop_n_points_downscale_factor=c.crop_n_points_downscale_factor,
            min_mask_region_area=c.min_mask_region_area,
            output_mode="binary_mask",
        )
        self.model = model  # set last: is_loaded means the generator is ready

    def generate(self, image: np.ndarray) -> MaskProposals:
        """Masks of one RGB image.

        Args:
            image: UInt8[H, W, 3] numpy array.

        Returns:
            MaskProposals with masks Bool[M, H, W] sorted by descending score.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an RGB array of shape [H, W, 3], got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 (0..255), got {image.dtype}")
        h, w = image.shape[:2]
        self.load()
        with torch.no_grad():
            records = self.generator.generate(np.ascontiguousarray(image))
        records = [r for r in records if int(r["area"]) >= self.config.min_area]
        if not records:
            z = np.zeros(0, dtype=np.float32)
            return MaskProposals(np.zeros((0, h, w), dtype=bool), z, z.copy(), z.copy())
        iou = np.array([r["predicted_iou"] for r in records], dtype=np.float32)
        stab = np.array([r["stability_score"] for r in records], dtype=np.float32)
        scores = iou * stab
        order = np.argsort(-scores, kind="stable")
        masks = np.stack([np.asarray(records[i]["segmentation"], dtype=bool) for i in order])
        return MaskProposals(masks, scores[order], iou[order], stab[order])


# ======================================================================================================================
# released SAM checkpoints
# ======================================================================================================================
@dataclass
class SamWeightsConfig:
    """Which released SAM checkpoint to load (shared by the automatic and the box-prompted backends)."""

    checkpoint: Optional[Path] = None
    """Path to the SAM checkpoint, e.g. sam_vit_h_4b8939.pth (required)."""
    model_type: str = "vit_h"
    """SAM backbone matching the checkpoint: vit_h, vit_l or vit_b."""


def sam_weights_how(config: SamWeightsConfig) -> str:
    """How to obtain the checkpoint named by ``config`` (for MissingWeightsError)."""
    name = SAM_CHECKPOINTS.get(config.model_type, SAM_CHECKPOINTS["vit_h"])
    return f"download {SAM_URL}{name} (2.4 GB for vit_h) and set {type(config).__name__}.checkpoint to its path"


def load_sam(config: SamWeightsConfig) -> torch.nn.Module:
    """The segment_anything ``Sam`` of ``config.model_type`` with the checkpoint's weights, on CPU.

    Raises:
        MissingWeightsError: no checkpoint set, or the file does not exist.
        ValueError: unknown model_type, or a checkpoint of another backbone.
    """
    from segment_anything import sam_model_registry

    c = config
    if c.model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM model_type {c.model_type!r}; choose one of {sorted(sam_model_registry)}")
    weight = SAM_CHECKPOINTS.get(c.model_type, f"SAM {c.model_type} checkpoint")
    how = sam_weights_how(c)
    if c.checkpoint is None:
        raise MissingWeightsError(weight, f"({type(c).__name__}.checkpoint is not set)", how)
    path = require_path(c.checkpoint, weight=weight, how=how)
    sam = sam_model_registry[c.model_type](checkpoint=None)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        sam.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not fit SAM model_type {c.model_type!r} "
            f"(expected {weight}); set model_type to the checkpoint's backbone"
        ) from err
    return sam


@dataclass
class SamAutomaticConfig(SamWeightsConfig, MaskGeneratorConfig):
    """Segment Anything (SAM 1) automatic mask generation from a local checkpoint (AG2aussian: ViT-H)."""

    _target: Type = field(default_factory=lambda: SamAutomaticGenerator)


class SamAutomaticGenerator(MaskGenerator):
    config: SamAutomaticConfig

    def _build(self) -> torch.nn.Module:
        return load_sam(self.config)


# ======================================================================================================================
# tiny random SAM (tests)
# ======================================================================================================================
@dataclass
class TinySamWeightsConfig:
    """Dimensions and seed of a real segment_anything Sam with tiny sizes and random weights (tests)."""

    image_size: int = 64
    """Side of SAM's padded square input (the long image side is resized to this)."""
    patch_size: int = 8
    """ViT patch size; image_size / patch_size is the embedding grid."""
    encoder_dim: int = 32
    """ViT width."""
    encoder_depth: int = 2
    """ViT blocks."""
    prompt_dim: int = 32
    """Prompt/decoder width (multiple of 8)."""
    num_heads: int = 2
    """Heads in the encoder and the decoder transformer."""
    seed: int = 0
    """Seed of the random weights."""


def build_tiny_sam(config: TinySamWeightsConfig) -> torch.nn.Module:
    """A segment_anything ``Sam`` with the dimensions of ``config`` and weights seeded by ``config.seed``."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = config
    if c.image_size % c.patch_size or c.prompt_dim % 8:
        raise ValueError("image_size must be a multiple of patch_size and prompt_dim a multiple of 8")
    grid = c.image_size // c.patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=c.image_size,
                patch_size=c.patch_size,
                embed_dim=c.encoder_dim,
                depth=c.encoder_depth,
                num_heads=c.num_heads,
                mlp_ratio=2.0,
                out_chans=c.prompt_dim,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                qkv_bias=True,
                use_rel_pos=True,
                window_size=0,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=c.prompt_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(c.image_size, c.image_size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=1, embedding_dim=c.prompt_dim, mlp_dim=2 * c.prompt_dim, num_heads=c.num_heads
                ),
                transformer_dim=c.prompt_dim,
                iou_head_depth=2,
                iou_head_hidden_dim=c.prompt_dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam


@dataclass
class TinySamConfig(TinySamWeightsConfig, MaskGeneratorConfig):
    """A real segment_anything Sam with tiny dimensions and seeded random weights; for tests (random masks)."""

    _target: Type = field(default_factory=lambda: TinySamGenerator)
    points_per_side: int = 4
    """Point prompts per image side (small: the tiny model runs in tests)."""
    pred_iou_thresh: float = 0.0
    """0 keeps every mask: random weights give random quality estimates."""
    stability_score_thresh: float = 0.0
    """0 keeps every mask: random weights give random stability."""


class TinySamGenerator(MaskGenerator):
    config: TinySamConfig

    def _build(self) -> torch.nn.Module:
        return build_tiny_sam(self.config)
