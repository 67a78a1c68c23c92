"""Per-mask embeddings for preprocessing (``gs-preprocess``): CLIP on masked crops, or object names ("label").

An :class:`EmbeddingSource` maps one image's masks to ``Float16[K, D]`` L2-normalised rows (row k describes mask
k), stored in ``sidecars/embeddings`` with a provider string that names the embedding space:

- :class:`ClipCropEmbeddingConfig` -> ``"clip:<model>/<pretrained>"`` (``"clip:tiny"`` for the test model): an
  open_clip image encoder on each mask's crop. As AG2aussian (segmentation-methods.md §2.2): pixels outside the mask
  are blacked out, the crop is the mask's bounding box, and it is squashed to the model's square input without
  keeping the aspect ratio (``resize_mode="squash"``; "longest" pads instead and keeps it, §2.14 item 3).
- :class:`LabelEmbeddingConfig` -> ``"label:<encoder>"``: each mask's object name from ``sidecars/scene.json``
  through a text encoder (MiniLM by default, offline). It stands in for CLIP where no CLIP weights exist; it is
  only valid for masks whose ids are scene object ids, and the provider string marks it as label-derived.

:func:`text_query_encoder` returns the text encoder that lives in the same space as a provider's embeddings.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Literal, Sequence, Type

import numpy as np
import torch
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.data import layout
from gsstudio_ext.data.mask_sources import ImageItem, config_fingerprint
from gsstudio_ext.data.sidecars import SidecarError, read_scene_meta
from gsstudio_ext.models.errors import require_path
from gsstudio_ext.models.image_text import (
    ImageTextEncoderConfig,
    OpenCLIPImageTextConfig,
    TinyImageTextConfig,
    preprocess_images,
    resolve_openclip_weights,
)
from gsstudio_ext.models.provider import Device
from gsstudio_ext.models.registry import TEXT_ENCODERS
from gsstudio_ext.models.text import (
    BertTextConfig,
    MiniLMTextConfig,
    OpenCLIPTextConfig,
    TextEncoderConfig,
)


# ======================================================================================================================
# base
# ======================================================================================================================
@dataclass
class EmbeddingSourceConfig(InstantiateConfig):
    """Base config of an embedding source."""

    _target: Type = field(default_factory=lambda: EmbeddingSource)


class EmbeddingSource(ABC):
    """Embeds the masks of one image. Subclasses set the class attributes and implement :meth:`embed`."""

    name: ClassVar[str] = ""
    """Short name ("clip", "label"), recorded in the preprocessing manifest."""
    uses_image: ClassVar[bool] = True
    """Whether embeddings depend on the image pixels (the cache then hashes the image file)."""
    needs_object_ids: ClassVar[bool] = False
    """Whether mask ids must be scene object ids (label embeddings look names up by id)."""

    def __init__(self, config: EmbeddingSourceConfig, device: Device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    @property
    @abstractmethod
    def provider(self) -> str:
        """Provider string stored with the embeddings (names the embedding space)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding size D."""

    def check(self, root: Path) -> None:
        """Fail early (missing weights or files) before any file is touched."""

    def prepare(self, root: Path) -> None:
        """Read what the source needs from the dataset once (before :meth:`fingerprint`)."""

    def fingerprint(self) -> Dict[str, Any]:
        """Everything that determines the output (hashed into the cache key)."""
        return {"source": self.name, "provider": self.provider, "config": config_fingerprint(self.config)}

    @abstractmethod
    def embed(self, item: ImageItem, ids: np.ndarray, masks: np.ndarray) -> Tensor:
        """Float[K, D] embeddings (any norm) of masks Bool[K, H, W] with ids Int[K]."""

    def __call__(self, item: ImageItem, ids: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Float16[K, D] L2-normalised embeddings, row k for mask k."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float16)
        feats = self.embed(item, ids, masks)
        if tuple(feats.shape) != (len(ids), self.dim):
            expected = (len(ids), self.dim)
            raise RuntimeError(f"{type(self).__name__} returned {tuple(feats.shape)}, expected {expected}")
        return F.normalize(feats.detach().float(), dim=-1).cpu().numpy().astype(np.float16)


# ======================================================================================================================
# CLIP on masked crops
# ======================================================================================================================
@dataclass
class ClipCropEmbeddingConfig(EmbeddingSourceConfig):
    """open_clip image embeddings of masked bounding-box crops (AG2aussian: OpenAI ViT-B/32, squashed crops)."""

    _target: Type = field(default_factory=lambda: ClipCropEmbedding)
    encoder: ImageTextEncoderConfig = field(default_factory=OpenCLIPImageTextConfig)
    """Image-text encoder (default open_clip ViT-B-32 / openai, 512-d); tests pass TinyImageTextConfig()."""
    resize_mode: Literal["squash", "longest", "shortest"] = "squash"
    """Crop fitting (overrides encoder.resize_mode): squash = the paper's (no aspect), longest = pad and keep aspect
    (spec §2.14 item 3), shortest = centre crop."""


class ClipCropEmbedding(EmbeddingSource):
    config: ClipCropEmbeddingConfig
    name = "clip"

    def __init__(self, config: ClipCropEmbeddingConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        self.encoder = dataclasses.replace(config.encoder, resize_mode=config.resize_mode).setup(device=self.device)

    @property
    def provider(self) -> str:
        enc = self.config.encoder
        if isinstance(enc, TinyImageTextConfig):
            return "clip:tiny"
        if isinstance(enc, OpenCLIPImageTextConfig):
            return f"clip:{enc.model_name}/{enc.pretrained}"
        return f"clip:{type(enc).__name__}"

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def check(self, root: Path) -> None:
        """Resolve open_clip weights now (no load), so a missing file fails before any work."""
        enc = self.config.encoder
        if not isinstance(enc, OpenCLIPImageTextConfig):
            return
        if enc.checkpoint_path is not None:
            require_path(
                enc.checkpoint_path,
                weight=f"open_clip {enc.model_name} checkpoint",
                how="pass an existing file as --clip.encoder.checkpoint-path",
            )
        else:
            resolve_openclip_weights(enc.model_name, enc.pretrained, enc.cache_dir, enc.allow_download)

    def embed(self, item: ImageItem, ids: np.ndarray, masks: np.ndarray) -> Tensor:
        image = torch.tensor(item.rgb, device=self.device).permute(2, 0, 1).float() / 255.0  # [3, H, W]
        m = torch.from_numpy(np.asarray(masks, dtype=bool)).to(self.device)
        if tuple(m.shape[1:]) != tuple(image.shape[1:]):
            raise SidecarError(
                f"masks of {item.stem} are {tuple(m.shape[1:])} (HxW) but image {item.path} is "
                f"{tuple(image.shape[1:])}; masks must be at the image's full resolution"
            )
        self.encoder.load()
        cfg = self.encoder.preprocess_cfg
        fitted = torch.cat([self._fit(crop, cfg) for crop in masked_crops(image, m)])
        return self.encoder.encode_images(fitted)

    def _fit(self, crop: Tensor, cfg: Dict[str, Any]) -> Tensor:
        """Fit one crop to the model's input side with the chosen resize mode (values stay in 0..1)."""
        return preprocess_images(
            crop[None],
            size=cfg["size"],
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            resize_mode=self.config.resize_mode,
            interpolation=cfg.get("interpolation", "bicubic"),
        )


def masked_crops(image: Tensor, masks: Tensor) -> List[Tensor]:
    """Per mask: ``image`` [3, H, W] with pixels outside the mask set to 0, cropped to the mask's bounding box.

    Returns:
        K tensors Float[3, h_k, w_k]; an empty mask gives a black 1 x 1 crop.
    """
    crops = []
    for mask in masks:
        rows = torch.nonzero(mask.any(dim=1)).reshape(-1)
        cols = torch.nonzero(mask.any(dim=0)).reshape(-1)
        if rows.numel() == 0:
            crops.append(image.new_zeros(3, 1, 1))
            continue
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        crops.append(image[:, y0:y1, x0:x1] * mask[y0:y1, x0:x1].to(image.dtype))
    return crops


# ======================================================================================================================
# object names through a text encoder
# ======================================================================================================================
@dataclass
class LabelEmbeddingConfig(EmbeddingSourceConfig):
    """Object names (sidecars/scene.json) through a text encoder; stands in for CLIP offline. Needs object-id masks."""

    _target: Type = field(default_factory=lambda: LabelEmbedding)
    encoder: TextEncoderConfig = field(default_factory=MiniLMTextConfig)
    """Text encoder (default: the bundled all-MiniLM-L6-v2, 384-d, offline)."""
    template: str = "{name}"
    """Text encoded per object; {name} is replaced by the object's name."""
    name_key: str = "name"
    """scene.json object field holding the name."""


def text_encoder_name(config: TextEncoderConfig) -> str:
    """Registry-style name of a text encoder config: minilm, bert:<model>, openclip:<model>/<tag>, tiny."""
    if isinstance(config, BertTextConfig):
        return f"bert:{config.model_name_or_path}"
    if isinstance(config, OpenCLIPTextConfig):
        return f"openclip:{config.model_name}/{config.pretrained}"
    for name, factory in TEXT_ENCODERS.items():
        if isinstance(factory, type) and type(config) is factory:
            return name
    return type(config).__name__


class LabelEmbedding(EmbeddingSource):
    config: LabelEmbeddingConfig
    name = "label"
    uses_image = False
    needs_object_ids = True

    def __init__(self, config: LabelEmbeddingConfig, device: Device = "cpu") -> None:
        super().__init__(config, device)
        if "{name}" not in config.template:
            raise ValueError(f"label template must contain {{name}}, got {config.template!r}")
        self.encoder = config.encoder.setup(device=self.device)
        self.labels: Dict[int, str] = {}

    @property
    def provider(self) -> str:
        return f"label:{text_encoder_name(self.config.encoder)}"

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def check(self, root: Path) -> None:
        _ = self.dim  # resolves the weights folder (MissingWeightsError) without loading the model

    def prepare(self, root: Path) -> None:
        """Read object names from scene.json."""
        path = layout.sidecar_root(root) / layout.SCENE_FILE
        if not path.exists():
            raise SidecarError(f"label embeddings need object names from {path}, which is missing")
        objects = read_scene_meta(root).get("objects", [])
        labels: Dict[int, str] = {}
        for obj in objects if isinstance(objects, list) else []:
            name = obj.get(self.config.name_key) if isinstance(obj, dict) else None
            if not isinstance(name, str) or not name.strip() or "id" not in obj:
                raise SidecarError(f"{path}: every object needs an 'id' and a non-empty '{self.config.name_key}'")
            labels[int(obj["id"])] = self.config.template.format(name=name.strip())
        if not labels:
            raise SidecarError(f"{path} lists no objects: label embeddings need named objects")
        self.labels = labels

    def fingerprint(self) -> Dict[str, Any]:
        return {**super().fingerprint(), "labels": {str(k): v for k, v in sorted(self.labels.items())}}

    def embed(self, item: ImageItem, ids: np.ndarray, masks: np.ndarray) -> Tensor:
        unknown = [int(i) for i in ids if int(i) not in self.labels]
        if unknown:
            raise SidecarError(
                f"{layout.instance_path(item.root, item.stem)}: mask id(s) {unknown} are not scene.json object ids; "
                "label embeddings need masks whose ids are object ids"
            )
        return self.encoder.encode([self.labels[int(i)] for i in ids])


# ======================================================================================================================
# query side
# ======================================================================================================================
def text_query_encoder(provider: str, device: Device = "cpu") -> Callable[[Sequence[str]], Tensor]:
    """Text encoder in the embedding space named by ``provider`` (as stored in the embedding sidecars).

    Returns:
        ``encode(texts) -> Float[B, D]`` L2-normalised. Weights are loaded on first call (MissingWeightsError if
        absent). "clip:tiny" and "label:tiny" rebuild the default tiny test models.
    """
    kind, _, rest = provider.partition(":")
    if kind == "label":
        name, _, detail = rest.partition(":")
        if name == "bert":
            return BertTextConfig(model_name_or_path=detail).setup(device=device).encode
        if name == "openclip":
            model, _, tag = detail.partition("/")
            return OpenCLIPTextConfig(model_name=model, pretrained=tag).setup(device=device).encode
        if name in TEXT_ENCODERS:
            return TEXT_ENCODERS[name]().setup(device=device).encode
    elif kind == "clip":
        if rest == "tiny":
            return TinyImageTextConfig().setup(device=device).encode_text
        model, sep, tag = rest.partition("/")
        if sep:
            return OpenCLIPImageTextConfig(model_name=model, pretrained=tag).setup(device=device).encode_text
    raise ValueError(f"unknown embedding provider {provider!r}; expected label:<encoder> or clip:<model>/<tag>")
