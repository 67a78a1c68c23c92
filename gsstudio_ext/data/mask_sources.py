"""Where per-image instance masks come from when a dataset is preprocessed (``gs-preprocess``).

A :class:`MaskSource` turns one dataset image into ``(ids Int[K], masks Bool[K, H, W])`` (masks may overlap):

- :class:`SamMaskSourceConfig`: segment_anything's automatic generator (released SAM checkpoint, or the tiny random
  SAM in tests) followed by AG2aussian's mask NMS and small-mask removal (segmentation-methods.md §2.2). Ids are
  mask numbers 1..K by descending score, *not* scene object ids; optionally only every k-th view (§2.14 item 5).
- :class:`SidecarMaskSourceConfig`: the dataset's existing ``sidecars/instances`` (synthetic ground truth, or masks
  precomputed by any tool), read as they are; ids are whatever the files hold (object ids for gs-synth scenes).

Sources also give a JSON ``fingerprint`` of every setting that changes their output: the preprocessing cache keys
on its hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, ContextManager, Dict, Iterable, Literal, Optional, Tuple, Type

import numpy as np
import torch
import tyro
from nerfstudio.configs.base_config import InstantiateConfig
from PIL import Image

from gsstudio_ext.core.masks import drop_small_masks, mask_nms
from gsstudio_ext.data import layout
from gsstudio_ext.data.sidecars import SidecarError, read_instances
from gsstudio_ext.models.errors import MissingWeightsError, require_path
from gsstudio_ext.models.masks import SAM_CHECKPOINTS, SAM_URL, MaskGeneratorConfig, SamAutomaticConfig
from gsstudio_ext.models.provider import Device
from gsstudio_ext.models.registry import mask_generator_config

RUNTIME_FIELDS = frozenset({"device", "batch_size", "points_per_batch", "cache_size", "cache_dir", "allow_download"})
"""Config fields that change speed or memory but not results; left out of fingerprints."""


# ======================================================================================================================
# one image of a dataset
# ======================================================================================================================
class ImageItem:
    """One dataset image handed to the sources; pixels are read on first access.

    Attributes:
        root: dataset root (holds ``sidecars/``). stem: sidecar key. path: image file. index: position in the
        dataset's image list (all images, not only the ones being processed).
    """

    def __init__(self, root: Path, stem: str, path: Path, index: int) -> None:
        self.root, self.stem, self.path, self.index = Path(root), stem, Path(path), int(index)
        self._rgb: Optional[np.ndarray] = None
        self._alpha: Optional[np.ndarray] = None

    def _read(self) -> None:
        try:
            with Image.open(self.path) as im:
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = np.asarray(im.convert("RGBA"))
                    self._rgb, self._alpha = np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
                else:
                    self._rgb = np.asarray(im.convert("RGB"))
        except OSError as err:
            raise ValueError(f"cannot read image {self.path}: {err}") from err

    @property
    def rgb(self) -> np.ndarray:
        """UInt8[H, W, 3]."""
        if self._rgb is None:
            self._read()
        assert self._rgb is not None
        return self._rgb

    @property
    def alpha(self) -> Optional[np.ndarray]:
        """UInt8[H, W] for images with transparency, else None."""
        if self._rgb is None:
            self._read()
        return self._alpha


# ======================================================================================================================
# fingerprints
# ======================================================================================================================
def config_fingerprint(value: Any, skip: Iterable[str] = RUNTIME_FIELDS) -> Any:
    """JSON-able description of a (nested) config: dataclass fields by name plus the class name; ``_target`` and
    ``skip`` fields left out; paths as strings."""
    skip = frozenset(skip)
    if is_dataclass(value) and not isinstance(value, type):
        out: Dict[str, Any] = {"type": type(value).__name__}
        for f in fields(value):
            if f.name.startswith("_") or f.name in skip:
                continue
            out[f.name] = config_fingerprint(getattr(value, f.name), skip)
        return out
    if isinstance(value, dict):
        return {str(k): config_fingerprint(v, skip) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [config_fingerprint(v, skip) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, type):
        return value.__name__
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def fingerprint_hash(fingerprint: Any) -> str:
    """sha256 (hex, 16 chars) of a fingerprint's canonical JSON."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ======================================================================================================================
# base
# ======================================================================================================================
@dataclass
class MaskSourceConfig(InstantiateConfig):
    """Base config of a mask source."""

    _target: Type = field(default_factory=lambda: MaskSource)


class MaskSource(ABC):
    """Gives the instance masks of one image. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    """Short name ("sam", "sidecar"), recorded in the preprocessing manifest."""
    writes_instances: ClassVar[bool] = True
    """Whether preprocessing writes the masks to ``sidecars/instances`` (False: they are already there)."""
    object_ids: ClassVar[bool] = False
    """Whether the returned ids are scene object ids (scene.json) rather than per-image mask numbers."""
    uses_image: ClassVar[bool] = True
    """Whether the masks depend on the image pixels (the cache then hashes the image file)."""

    def __init__(self, config: MaskSourceConfig, device: Device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    def check(self, root: Path) -> None:
        """Fail early (missing weights, bad settings) before any file is touched."""

    def fingerprint(self) -> Dict[str, Any]:
        """Everything that determines the output (hashed into the cache key)."""
        return {"source": self.name, "config": config_fingerprint(self.config)}

    @abstractmethod
    def __call__(self, item: ImageItem) -> Tuple[np.ndarray, np.ndarray]:
        """Masks of one image: ``(ids Int64[K], masks Bool[K, H, W])``, H, W = the image size."""


def _empty(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros((0, h, w), dtype=bool)


# ======================================================================================================================
# SAM + mask NMS
# ======================================================================================================================
def _sam_coarse() -> MaskGeneratorConfig:
    return mask_generator_config("sam-coarse")


@dataclass
class SamMaskSourceConfig(MaskSourceConfig):
    """SAM automatic masks + AG2aussian's mask NMS (spec §2.2). Generator fields are flattened: --sam.checkpoint."""

    _target: tyro.conf.Suppress[Type] = field(default_factory=lambda: SamMaskSource)
    generator: Annotated[MaskGeneratorConfig, tyro.conf.arg(name="")] = field(default_factory=_sam_coarse)
    """SAM generator (default: AG2aussian's 'coarse' level with ViT-H; for SAM's own defaults set
    min_mask_region_area 0). Tests pass models.masks.TinySamConfig()."""
    nms: bool = True
    """Apply the mask NMS below after SAM's own filtering."""
    nms_iou_thresh: float = 0.8
    """Drop a mask whose IoU with a higher-scored mask exceeds this."""
    nms_score_thresh: float = 0.7
    """Drop a mask whose score (predicted IoU x stability) is <= this."""
    nms_inner_thresh: Optional[float] = 0.5
    """Drop a contained mask when its containment penalty exceeds 1 - this; None disables the containment test."""
    nms_inner_cover: float = 0.85
    """Containment: share of the inner mask lying inside the outer one (>=)."""
    nms_outer_cover: float = 0.5
    """Containment: share of the outer mask covered by the inner one stays below this."""
    small_mask_area: int = 25
    """After NMS, drop masks with at most this many pixels."""
    alpha_thresh: float = 0.1
    """RGBA images: clear mask pixels whose alpha is below this (0..1) before the area test."""
    every_kth_view: int = 1
    """Run SAM on views 0, k, 2k, ... only (spec §2.14 item 5); other views get an empty mask set (no mask
    supervision). 1 = every view."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """SAM compute precision via autocast (spec §2.14 item 5). CUDA only: CPU always runs fp32."""


class SamMaskSource(MaskSource):
    config: SamMaskSourceConfig
    name = "sam"

    def __init__(self, config: SamMaskSourceConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        if config.every_kth_view < 1:
            raise ValueError(f"every_kth_view must be >= 1, got {config.every_kth_view}")
        if not 0.0 <= config.alpha_thresh <= 1.0:
            raise ValueError(f"alpha_thresh must be in [0, 1], got {config.alpha_thresh}")
        self.generator = config.generator.setup(device=self.device)

    def check(self, root: Path) -> None:
        """A released SAM checkpoint must be set and exist (resolved here, loaded on first use)."""
        c = self.config.generator
        if not isinstance(c, SamAutomaticConfig):
            return
        weight = SAM_CHECKPOINTS.get(c.model_type, f"SAM {c.model_type} checkpoint")
        how = f"download {SAM_URL}{weight} (vit_h: 2.4 GB) and pass its path as --sam.checkpoint"
        if c.checkpoint is None:
            raise MissingWeightsError(weight, "(no checkpoint given: --sam.checkpoint is not set)", how)
        require_path(c.checkpoint, weight=weight, how=how)

    def _autocast(self) -> ContextManager:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.config.precision)
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def __call__(self, item: ImageItem) -> Tuple[np.ndarray, np.ndarray]:
        c = self.config
        if item.index % c.every_kth_view:
            with Image.open(item.path) as im:
                return _empty(im.height, im.width)
        rgb = item.rgb
        with self._autocast():
            proposals = self.generator.generate(rgb)
        if c.nms and len(proposals):
            keep = mask_nms(
                proposals.masks,
                proposals.scores,
                iou_thresh=c.nms_iou_thresh,
                score_thresh=c.nms_score_thresh,
                inner_thresh=c.nms_inner_thresh,
                inner_cover=c.nms_inner_cover,
                outer_cover=c.nms_outer_cover,
            )
            proposals = proposals.select(keep)
        if not len(proposals):
            return _empty(*rgb.shape[:2])
        masks, _ = drop_small_masks(proposals.masks, c.small_mask_area, alpha=item.alpha, alpha_thresh=c.alpha_thresh)
        masks_np = masks.cpu().numpy().astype(bool)
        return np.arange(1, masks_np.shape[0] + 1, dtype=np.int64), masks_np


# ======================================================================================================================
# existing sidecars
# ======================================================================================================================
@dataclass
class SidecarMaskSourceConfig(MaskSourceConfig):
    """Use the dataset's own sidecars/instances (synthetic ground truth, or masks precomputed by any tool)."""

    _target: Type = field(default_factory=lambda: SidecarMaskSource)


class SidecarMaskSource(MaskSource):
    config: SidecarMaskSourceConfig
    name = "sidecar"
    writes_instances = False
    object_ids = True
    uses_image = False

    def __call__(self, item: ImageItem) -> Tuple[np.ndarray, np.ndarray]:
        path = layout.instance_path(item.root, item.stem)
        if not path.exists():
            raise SidecarError(
                f"missing instance sidecar {path}: --masks sidecar needs one per image (formats: data/layout.py); "
                "use --masks sam to compute them"
            )
        return read_instances(path)
