"""Image-text encoders (CLIP): normalised image and text embeddings in one space.

Backends: :class:`OpenCLIPImageTextConfig` (an open_clip model with pretrained weights from a tag or a local file)
and :class:`TinyImageTextConfig` (open_clip's own ``CLIP`` class built from tiny tower configs with seeded random
weights and the offline BPE tokenizer, for tests). Images are preprocessed in torch, batched, on the provider's
device, with the model's size, mean, std and resize mode (AG2aussian squashes mask crops to 224 x 224: set
``resize_mode="squash"``).
"""

from __future__ import annotations

import functools
import inspect
import os
import zipfile
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.errors import MissingWeightsError, hf_cache_dir, require_path
from gsstudio_ext.models.provider import Device, LazyProvider

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass
class ImageTextEncoderConfig(InstantiateConfig):
    """Common settings of every image-text encoder backend."""

    _target: Type = field(default_factory=lambda: ImageTextEncoder)
    cache_size: int = 1024
    """How many distinct texts keep their embeddings in memory (least recently used are evicted)."""
    batch_size: int = 64
    """Images or texts per forward pass."""
    resize_mode: Optional[str] = None
    """Image fitting: shortest (resize, centre crop), longest (resize, pad), squash (no aspect); None = model's."""


class ImageTextEncoder(LazyProvider):
    """Lazy CLIP-style encoder; ``model`` stays None until first use. Runs an open_clip-compatible model."""

    config: ImageTextEncoderConfig

    def __init__(self, config: ImageTextEncoderConfig, device: Device = "cpu") -> None:
        if config.resize_mode is not None and config.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES} or None, got {config.resize_mode!r}")
        super().__init__(config, device)
        self.tokenizer: Any = None
        self.preprocess_cfg: Dict[str, Any] = {}
        self._texts: "OrderedDict[str, Tensor]" = OrderedDict()

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding size D (known without loading weights)."""

    @abstractmethod
    def _load(self) -> None:
        """Set ``self.model`` (on ``self.device``), ``self.tokenizer`` and ``self.preprocess_cfg``."""

    def to(self, device: Device) -> "ImageTextEncoder":
        """Move the model (if loaded) and the text cache to ``device``."""
        super().to(device)
        for key in self._texts:
            self._texts[key] = self._texts[key].to(self.device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """Float[B, 3, H, W] in 0..1 -> Float[B, 3, S, S] fitted to the model's input and normalised (mean/std)."""
        self.load()
        cfg = self.preprocess_cfg
        return preprocess_images(
            images.to(self.device),
            size=cfg["size"],
            mean=cfg["mean"],
            std=cfg["std"],
            resize_mode=self.config.resize_mode or cfg.get("resize_mode", "shortest"),
            interpolation=cfg.get("interpolation", "bicubic"),
        )

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings Float[B, D] of RGB images Float[B, 3, H, W] in 0..1 (any size)."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in 0..1, got dtype {images.dtype}")
        if images.numel() and (images.min() < -1e-3 or images.max() > 1.0 + 1e-3):
            raise ValueError("images must be float in 0..1 (got values outside; divide uint8 images by 255)")
        if images.shape[0] == 0:
            return torch.zeros(0, self.dim, device=self.device)
        self.load()
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], max(1, self.config.batch_size)):
                x = self.preprocess(images[start : start + self.config.batch_size])
                x = x.to(_param_dtype(self.model))
                out.append(F.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings Float[B, D], cached by string."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"every text must be a non-empty string, got {t!r}")
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        with self._lock:
            found: Dict[str, Tensor] = {}
            for t in texts:
                if t in self._texts:
                    self._texts.move_to_end(t)
                    found[t] = self._texts[t]
            missing = list(dict.fromkeys(t for t in texts if t not in found))
            if missing:
                self.load()
                with torch.no_grad():
                    for start in range(0, len(missing), max(1, self.config.batch_size)):
                        chunk = missing[start : start + self.config.batch_size]
                        emb = F.normalize(self.model.encode_text(self.tokenizer(chunk).to(self.device)).float(), dim=-1)
                        for t, e in zip(chunk, emb):
                            found[t] = self._texts[t] = e
                            self._texts.move_to_end(t)
                while len(self._texts) > max(1, self.config.cache_size):
                    self._texts.popitem(last=False)
        return torch.stack([found[t] for t in texts])


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def preprocess_images(
    images: Tensor,
    size: Union[int, Tuple[int, int], List[int]],
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> Tensor:
    """Batched torch version of open_clip's inference transform (resize, crop or pad, normalise).

    Args:
        images: Float[B, 3, H, W] in 0..1.
        size: output side S, or (h, w).

    Returns:
        Float[B, 3, h, w], normalised with ``mean``/``std``.
    """
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    _, _, h, w = images.shape
    mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(interpolation, "nearest")
    kw: Dict[str, Any] = {"mode": mode}
    if mode != "nearest":
        kw.update(align_corners=False, antialias=True)

    def resize(x: Tensor, nh: int, nw: int) -> Tensor:
        return x if (nh, nw) == (x.shape[-2], x.shape[-1]) else F.interpolate(x, size=(nh, nw), **kw)

    if resize_mode == "squash":
        x = resize(images, th, tw)
    elif resize_mode == "shortest":
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = resize(images, nh, nw)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw]
    elif resize_mode == "longest":
        scale = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
        x = resize(images, nh, nw)
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=0.0)
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ======================================================================================================================
# open_clip with pretrained weights
# ======================================================================================================================
@dataclass
class OpenCLIPWeightsConfig:
    """Which open_clip model and pretrained weights to load (shared by the image-text and text-only backends)."""

    model_name: str = "ViT-B-32"
    """open_clip architecture name (AG2aussian: OpenAI ViT-B/32, 512-d; LERF: ViT-B-16 laion2b_s34b_b88k)."""
    pretrained: str = "openai"
    """open_clip pretrained tag; also selects QuickGELU and preprocessing when checkpoint_path is set."""
    checkpoint_path: Optional[Path] = None
    """Local weights file; overrides the tag's download location."""
    cache_dir: Optional[Path] = None
    """Where downloaded weights are cached; None uses open_clip's defaults (HF cache, ~/.cache/clip)."""
    allow_download: bool = False
    """Download missing weights (off by default: the GPU and test machines have no network)."""
    precision: str = "fp32"
    """open_clip precision: fp32, fp16 or bf16 (half precisions only on CUDA)."""


@dataclass
class OpenCLIPImageTextConfig(OpenCLIPWeightsConfig, ImageTextEncoderConfig):
    """An open_clip model with pretrained weights (tag resolved in the local cache, or a local file)."""

    _target: Type = field(default_factory=lambda: OpenCLIPImageTextEncoder)


class OpenCLIPImageTextEncoder(ImageTextEncoder):
    config: OpenCLIPImageTextConfig

    @property
    def dim(self) -> int:
        return openclip_embed_dim(self.config.model_name)

    def _load(self) -> None:
        self.model, self.tokenizer, self.preprocess_cfg = load_openclip(self.config, self.device)


def openclip_embed_dim(model_name: str) -> int:
    """Embedding size of a built-in (or registered) open_clip architecture, without building it."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; choose one of open_clip.list_models()")
    return int(cfg["embed_dim"])


def _how_openclip(model_name: str, tag: str, source: str) -> str:
    cls = "OpenCLIPImageTextConfig/OpenCLIPTextConfig"
    return (
        f"download {source} on a machine with network and set {cls}.checkpoint_path to the file, "
        f"or copy the cache folder here, or set {cls}.allow_download=True "
        f"(open_clip: create_model('{model_name}', pretrained='{tag}'))"
    )


def resolve_openclip_weights(
    model_name: str, tag: str, cache_dir: Optional[Path] = None, allow_download: bool = False
) -> str:
    """Local file of an open_clip pretrained tag: from the caches, else downloaded if allowed.

    Raises:
        ValueError: unknown tag for this model.
        MissingWeightsError: not cached (and downloads off or failing).
    """
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    pcfg = get_pretrained_cfg(model_name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip model {model_name!r} has no pretrained tag {tag!r}; known tags: {tags}")
    if pcfg.get("file"):
        return str(pcfg["file"])
    cache = str(cache_dir) if cache_dir is not None else None
    looked: List[str] = []
    hub, url = pcfg.get("hf_hub", ""), pcfg.get("url", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        looked.append(f"{cache or hf_cache_dir()} (hub repo {repo}: {', '.join(names)})")
    if url:
        target = os.path.join(cache or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
        looked.append(target)
    source = f"https://huggingface.co/{hub.rstrip('/')}" if hub else url
    weight = f"open_clip {model_name} pretrained={tag}"
    if allow_download:
        try:
            path = download_pretrained(pcfg, cache_dir=cache)
        except Exception as err:  # network, offline mode, checksum: all mean "not available here"
            raise MissingWeightsError(weight, looked, _how_openclip(model_name, tag, source), str(err)) from err
        if path and os.path.isfile(path):
            return path
    raise MissingWeightsError(
        weight, looked, _how_openclip(model_name, tag, source), reason="not in the local cache; downloads are off"
    )


def load_openclip(config: OpenCLIPWeightsConfig, device: torch.device) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """Build the open_clip model named by ``config`` with resolved local weights.

    Returns:
        (model on ``device`` in eval mode, tokenizer, preprocess config dict with size/mean/std/resize_mode).
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    name, tag = config.model_name, config.pretrained or ""
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model {name!r}; choose one of open_clip.list_models()")
    pcfg = get_pretrained_cfg(name, tag) if tag else {}
    if config.checkpoint_path is not None:
        how = _how_openclip(name, tag, open_clip.pretrained.get_pretrained_url(name, tag) or "the weights")
        path = str(require_path(config.checkpoint_path, weight=f"open_clip {name} checkpoint", how=how))
    else:
        path = resolve_openclip_weights(name, tag, config.cache_dir, config.allow_download)
    extra = {
        k: pcfg[src]
        for k, src in (
            ("image_mean", "mean"),
            ("image_std", "std"),
            ("image_interpolation", "interpolation"),
            ("image_resize_mode", "resize_mode"),
        )
        if pcfg.get(src)
    }
    if _is_torchscript(path):  # OpenAI's original .pt files are TorchScript archives: need a full torch.load
        params = inspect.signature(open_clip.create_model).parameters
        extra.update({k: False for k in ("weights_only", "load_weights_only") if k in params})
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            name,
            pretrained=path,
            device=device,
            precision=config.precision,
            force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
            cache_dir=str(config.cache_dir) if config.cache_dir is not None else None,
            **extra,
        )
    except RuntimeError as err:
        if "state_dict" in str(err) or "size mismatch" in str(err):
            raise ValueError(f"weights {path} do not match open_clip model {name!r}: {str(err)[:300]}") from err
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer, _preprocess_cfg_of(model, pcfg)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _preprocess_cfg_of(model: torch.nn.Module, pcfg: Dict[str, Any]) -> Dict[str, Any]:
    try:
        import open_clip

        cfg = dict(open_clip.get_model_preprocess_cfg(model))
    except (AttributeError, KeyError):  # older open_clip
        visual = model.visual
        cfg = {
            "size": getattr(visual, "image_size", 224),
            "mean": getattr(visual, "image_mean", None) or OPENAI_MEAN,
            "std": getattr(visual, "image_std", None) or OPENAI_STD,
        }
    cfg.setdefault("resize_mode", pcfg.get("resize_mode", "shortest"))
    cfg.setdefault("interpolation", pcfg.get("interpolation", "bicubic"))
    return cfg


# ======================================================================================================================
# tiny random CLIP (tests)
# ======================================================================================================================
def _tiny_vision() -> Dict[str, Any]:
    return {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}


def _tiny_text() -> Dict[str, Any]:
    return {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}


@dataclass
class TinyImageTextConfig(ImageTextEncoderConfig):
    """open_clip ``CLIP`` from tiny tower configs, seeded random weights, offline BPE tokenizer; for tests only."""

    _target: Type = field(default_factory=lambda: TinyImageTextEncoder)
    embed_dim: int = 32
    """Joint embedding size D."""
    vision_cfg: Dict[str, Any] = field(default_factory=_tiny_vision)
    """open_clip CLIPVisionCfg fields (image_size, patch_size, width, layers, head_width, ...)."""
    text_cfg: Dict[str, Any] = field(default_factory=_tiny_text)
    """open_clip CLIPTextCfg fields; vocab_size must stay 49408 for the bundled BPE tokenizer."""
    seed: int = 0
    """Seed of the random weights."""


class TinyImageTextEncoder(ImageTextEncoder):
    config: TinyImageTextConfig

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def _load(self) -> None:
        import open_clip
        from open_clip.model import CLIP

        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = CLIP(embed_dim=c.embed_dim, vision_cfg=dict(c.vision_cfg), text_cfg=dict(c.text_cfg))
        self.model = model.to(self.device)
        self.tokenizer = functools.partial(open_clip.tokenize, context_length=int(c.text_cfg.get("context_length", 77)))
        self.preprocess_cfg = {
            "size": c.vision_cfg.get("image_size", 224),
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
            "resize_mode": "shortest",
            "interpolation": "bicubic",
        }
