"""Box-prompted segmentation: SAM turns a detector's box into a mask (the "SAM" half of Grounded-SAM).

Backends: :class:`SamBoxConfig` (a released SAM checkpoint, ReferSplat: ViT-H) and :class:`TinySamBoxConfig` (the
tiny random ``Sam`` of :mod:`gsstudio_ext.models.masks`, for tests). Both run segment_anything's ``SamPredictor``;
the image embedding is computed once per image and reused for every box on it.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Type

import numpy as np
import torch
from nerfstudio.configs.base_config import InstantiateConfig

from gsstudio_ext.models.masks import SamWeightsConfig, TinySamWeightsConfig, build_tiny_sam, load_sam
from gsstudio_ext.models.provider import Device, LazyProvider


@dataclass
class BoxSegmenterConfig(InstantiateConfig):
    """Common settings of box-prompted SAM backends."""

    _target: Type = field(default_factory=lambda: BoxSegmenter)
    multimask_output: bool = False
    """False (Grounded-SAM): one mask per box. True: SAM's three candidates, the best predicted IoU wins."""


class BoxSegmenter(LazyProvider):
    """Lazy box-prompted SAM; ``model`` stays None until the first call (or :meth:`load`)."""

    config: BoxSegmenterConfig

    def __init__(self, config: BoxSegmenterConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.predictor: Any = None
        self._image_key: Optional[str] = None

    @abstractmethod
    def _build(self) -> torch.nn.Module:
        """Return the segment_anything ``Sam`` model with its weights (on CPU is fine)."""

    def _load(self) -> None:
        from segment_anything import SamPredictor

        model = self._build().to(self.device)
        self.predictor = SamPredictor(model)
        self._image_key = None
        self.model = model  # set last: is_loaded means the predictor is ready

    def to(self, device: Device) -> "BoxSegmenter":
        super().to(device)
        self._image_key = None  # the cached image embedding stays on the old device
        return self

    def _set_image(self, image: np.ndarray) -> None:
        """Embed ``image`` unless it is the one embedded last (keyed by its bytes)."""
        key = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + str(image.shape)
        if key != self._image_key:
            self._image_key = None
            self.predictor.set_image(image, image_format="RGB")
            self._image_key = key

    def segment_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Masks of several boxes on one image.

        Args:
            image: UInt8[H, W, 3] RGB.
            boxes: Float[K, 4] (x0, y0, x1, y1) in pixels.

        Returns:
            Bool[K, H, W].
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        h, w = image.shape[:2]
        if boxes.shape[0] == 0:
            return np.zeros((0, h, w), dtype=bool)
        with self._lock:
            self.load()
            with torch.no_grad():
                self._set_image(np.ascontiguousarray(image))
                prompt = torch.as_tensor(boxes, device=self.device)
                prompt = self.predictor.transform.apply_boxes_torch(prompt, (h, w))
                masks, iou, _ = self.predictor.predict_torch(
                    point_coords=None,
                    point_labels=None,
                    boxes=prompt,
                    multimask_output=self.config.multimask_output,
                )
        best = iou.argmax(dim=1)  # [K]; 0 when there is one mask per box
        picked = masks[torch.arange(masks.shape[0], device=masks.device), best]
        return picked.cpu().numpy().astype(bool)

    def segment_box(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Mask of one box (x0, y0, x1, y1) in pixels on a UInt8[H, W, 3] image: Bool[H, W]."""
        return self.segment_boxes(image, np.asarray(box, dtype=np.float32).reshape(1, 4))[0]


@dataclass
class SamBoxConfig(SamWeightsConfig, BoxSegmenterConfig):
    """Box-prompted SAM from a released checkpoint (Grounded-SAM and ReferSplat: ViT-H)."""

    _target: Type = field(default_factory=lambda: SamBoxSegmenter)


class SamBoxSegmenter(BoxSegmenter):
    config: SamBoxConfig

    def _build(self) -> torch.nn.Module:
        return load_sam(self.config)


@dataclass
class TinySamBoxConfig(TinySamWeightsConfig, BoxSegmenterConfig):
    """Box-prompted tiny random SAM (same model as TinySamConfig); for tests (random masks)."""

    _target: Type = field(default_factory=lambda: TinySamBoxSegmenter)


class TinySamBoxSegmenter(BoxSegmenter):
    config: TinySamBoxConfig

    def _build(self) -> torch.nn.Module:
        return build_tiny_sam(self.config)
