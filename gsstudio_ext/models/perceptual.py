"""Perceptual image distance (LPIPS): ``distance(a, b) -> Float[B]`` for RGB images in [0, 1].

One formula (Zhang et al. 2018, LPIPS v0.1), two backends:

- :class:`LpipsVggConfig`: LPIPS-VGG, the distance RL3DEdit's anchor reward uses [I, spec §3.5]. The VGG16 ImageNet
  backbone is torchvision's file ``vgg16-397923af.pth`` (from the torch hub cache, a local file, or downloaded when
  allowed); the linear heads are the official LPIPS v0.1 weights, which ship inside pip packages (torchmetrics, a
  nerfstudio dependency, and ``lpips``), so only the backbone ever needs the network.
- :class:`TinyPerceptualConfig`: a seeded random small conv net with the same formula (unit weights), for tests.

Formula: inputs x in [0, 1] become 2x - 1, are shifted/scaled by LPIPS' ImageNet constants, and pass through the
feature stages; per stage l the features are unit-normalised over channels, ``d_l = mean_hw sum_c w_c (f0 - f1)^2``,
and the distance is ``sum_l d_l``. So d(x, x) = 0. Gradients flow to the inputs (the network is frozen).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.errors import MissingWeightsError, require_path
from gsstudio_ext.models.provider import LazyProvider

LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer: ImageNet statistics in [-1, 1] units
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision feature indices: relu1_2 ... relu5_3
NORM_EPS = 1e-8  # inside the square root of the channel norm, as torchmetrics' LPIPS


class LpipsNet(nn.Module):
    """Feature stages plus non-negative per-channel weights of each stage; ``forward(x, y) -> Float[B]``."""

    def __init__(self, stages: Sequence[nn.Module], weights: Sequence[Tensor]) -> None:
        super().__init__()
        if len(stages) != len(weights):
            raise ValueError(f"{len(stages)} feature stages but {len(weights)} weight vectors")
        self.stages = nn.ModuleList(stages)
        self.weights = nn.ParameterList([nn.Parameter(w.detach().reshape(-1).float().clone()) for w in weights])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def features(self, x: Tensor) -> List[Tensor]:
        """Outputs of every stage for images Float[B, 3, H, W] in [-1, 1]."""
        x = (x - self.shift) / self.scale
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance Float[B] of two image batches Float[B, 3, H, W] in [-1, 1]."""
        total = x.new_zeros(x.shape[0])
        for fx, fy, w in zip(self.features(x), self.features(y), self.weights):
            fx = fx / torch.sqrt(fx.square().sum(1, keepdim=True) + NORM_EPS)
            fy = fy / torch.sqrt(fy.square().sum(1, keepdim=True) + NORM_EPS)
            total = total + ((fx - fy).square() * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
        return total


# ======================================================================================================================
# provider
# ======================================================================================================================
@dataclass
class PerceptualConfig(InstantiateConfig):
    """Common settings of every perceptual-distance backend."""

    _target: Type = field(default_factory=lambda: PerceptualDistance)
    resize: Optional[int] = None
    """Resize both images to resize x resize (bilinear, antialiased) before the network; None = as given."""


class PerceptualDistance(LazyProvider):
    """Lazy frozen LPIPS-style network; ``model`` is an :class:`LpipsNet` once loaded."""

    config: PerceptualConfig

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Perceptual distance Float[B] between RGB images a, b Float[B, 3, H, W] (or [3, H, W]) in [0, 1].

        A batch of 1 broadcasts against the other. Differentiable with respect to the images; wrap in
        ``torch.no_grad()`` for rewards.
        """
        a, b = _as_batch(a, "a"), _as_batch(b, "b")
        if a.shape[1:] != b.shape[1:] or (a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0])):
            raise ValueError(f"images must have matching shapes [B, 3, H, W]: {tuple(a.shape)} vs {tuple(b.shape)}")
        batch = max(a.shape[0], b.shape[0])
        self.load()
        x = a.to(self.device, torch.float32).clamp(0, 1).expand(batch, -1, -1, -1)
        y = b.to(self.device, torch.float32).clamp(0, 1).expand(batch, -1, -1, -1)
        if self.config.resize is not None:
            size = (self.config.resize, self.config.resize)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.model(2 * x - 1, 2 * y - 1)

    def _load(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} is abstract; use LpipsVggConfig or TinyPerceptualConfig")


def _as_batch(x: Tensor, name: str) -> Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"{name} must be float RGB [B, 3, H, W] in [0, 1], got {tuple(x.shape)} {x.dtype}")
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{name} must be in [0, 1] (got values in [{float(x.min()):.3f}, {float(x.max()):.3f}])")
    return x


# ======================================================================================================================
# LPIPS-VGG with real weights
# ======================================================================================================================
@dataclass
class LpipsVggConfig(PerceptualConfig):
    """LPIPS v0.1 with the VGG16 ImageNet backbone (torchvision weights) and the official linear heads."""

    _target: Type = field(default_factory=lambda: LpipsVgg)
    backbone_weights: Optional[Path] = None
    """torchvision VGG16 ImageNet file (vgg16-397923af.pth); None = look in the torch hub cache (cache_dir)."""
    lin_weights: Optional[Path] = None
    """LPIPS v0.1 vgg.pth linear heads; None = the copy shipped by torchmetrics or the lpips package."""
    cache_dir: Optional[Path] = None
    """Folder searched for (and receiving) the backbone file; None = torch.hub.get_dir()/checkpoints."""
    allow_download: bool = False
    """Download the backbone from download.pytorch.org when missing (off: the GPU and test machines are offline)."""


class LpipsVgg(PerceptualDistance):
    config: LpipsVggConfig

    def _load(self) -> None:
        c = self.config
        backbone = resolve_vgg16_weights(c.backbone_weights, c.cache_dir, c.allow_download)
        stages = vgg16_stages(vgg16_features_state(backbone))
        heads = lpips_linear_weights(c.lin_weights or packaged_lpips_weights("vgg"))
        if [int(h.numel()) for h in heads] != [64, 128, 256, 512, 512]:
            raise ValueError(f"LPIPS heads do not match VGG16 (widths {[int(h.numel()) for h in heads]})")
        self.model = LpipsNet(stages, heads).to(self.device)


def _vgg_how() -> str:
    return (
        f"download {VGG16_URL} (torchvision's VGG16 ImageNet weights) on a machine with network and put it in the "
        "torch hub cache (~/.cache/torch/hub/checkpoints/) or set LpipsVggConfig.backbone_weights to the file; "
        "or set LpipsVggConfig.allow_download=True"
    )


def resolve_vgg16_weights(path: Optional[Path], cache_dir: Optional[Path], allow_download: bool) -> Path:
    """Local torchvision VGG16 file: ``path``, else the cache folder, else downloaded when allowed.

    Raises:
        MissingWeightsError: naming the file and how to get it.
    """
    if path is not None:
        return require_path(path, weight="VGG16 ImageNet weights (LPIPS backbone)", how=_vgg_how())
    folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / VGG16_URL.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    if not allow_download:
        raise MissingWeightsError(
            "VGG16 ImageNet weights (LPIPS backbone)", str(target), _vgg_how(), reason="not cached; downloads are off"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGG16_URL, str(target), progress=True)
    except Exception as err:  # network, proxy, disk: all mean "not available here"
        raise MissingWeightsError("VGG16 ImageNet weights (LPIPS backbone)", str(target), _vgg_how(), str(err)) from err
    return target


def vgg16_features_state(path: Path) -> Dict[str, Tensor]:
    """The convolution tensors of a VGG16 file as ``{"<index>.weight"|"<index>.bias": Tensor}`` (torchvision indices).

    Accepts a full torchvision state dict (``features.N.*``) or one of ``vgg.features`` alone (``N.*``).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:features\.)?(\d+)\.(weight|bias)", key)
        if m is not None:
            out[f"{m.group(1)}.{m.group(2)}"] = value
    return out


def vgg16_stages(state: Optional[Dict[str, Tensor]] = None) -> List[nn.Sequential]:
    """VGG16 conv layers (torchvision indices kept as module names) cut after relu1_2, 2_2, 3_3, 4_3 and 5_3.

    Raises:
        ValueError: ``state`` lacks a layer or has the wrong shape.
    """
    layers: List[nn.Module] = []
    channels = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    stages = [nn.Sequential() for _ in VGG16_TAPS]
    for stage, (start, stop) in zip(stages, VGG16_TAPS):
        for i in range(start, stop):
            stage.add_module(str(i), layers[i])
    if state is not None:
        for stage in stages:
            own = {f"{name}.{p}": None for name, mod in stage.named_children() for p, _ in mod.named_parameters()}
            missing = sorted(set(own) - set(state))
            if missing:
                raise ValueError(f"not a VGG16 checkpoint: missing {missing[:3]}")
            stage.load_state_dict({k: state[k] for k in own}, strict=True)
    return stages


def packaged_lpips_weights(net: str = "vgg") -> Path:
    """LPIPS v0.1 linear heads shipped by the ``lpips`` package or by torchmetrics.

    Raises:
        MissingWeightsError: neither package is installed.
    """
    looked = []
    places = (("lpips", f"weights/v0.1/{net}.pth"), ("torchmetrics", f"functional/image/lpips_models/{net}.pth"))
    for module, rel in places:
        try:
            pkg = __import__(module)
        except ImportError:
            continue
        candidate = Path(pkg.__file__).parent / rel
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate
    how = "pip install torchmetrics (or lpips); or set LpipsVggConfig.lin_weights to LPIPS v0.1 vgg.pth"
    raise MissingWeightsError(f"LPIPS v0.1 {net} linear heads", looked, how)


def lpips_linear_weights(path: Path) -> List[Tensor]:
    """Per-stage channel weights Float[C_l] from an LPIPS heads file (``lin{l}.model.{0|1}.weight`` [1, C, 1, 1])."""
    path = require_path(path, weight="LPIPS linear heads", how="set LpipsVggConfig.lin_weights to LPIPS v0.1 vgg.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads: Dict[int, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key)
        if m is not None:
            heads[int(m.group(1))] = value.reshape(-1)
    if not heads or sorted(heads) != list(range(len(heads))):
        raise ValueError(f"{path} is not an LPIPS heads file (keys {sorted(state)[:4]})")
    return [heads[i] for i in range(len(heads))]


# ======================================================================================================================
# tiny random backend
# ======================================================================================================================
@dataclass
class TinyPerceptualConfig(PerceptualConfig):
    """Seeded random conv stages (conv3x3 + ReLU, 2x max-pool between stages) with unit weights; tests only."""

    _target: Type = field(default_factory=lambda: TinyPerceptual)
    channels: Tuple[int, ...] = (8, 16, 32)
    """Width of each stage (one distance term per stage)."""
    seed: int = 0
    """Seed of the random weights."""


class TinyPerceptual(PerceptualDistance):
    config: TinyPerceptualConfig

    def _load(self) -> None:
        c = self.config
        stages: List[nn.Module] = []
        width = 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            for i, out in enumerate(c.channels):
                conv = nn.Conv2d(width, out, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.normal_(conv.bias, std=0.1)
                pool = [nn.MaxPool2d(2)] if i > 0 else []
                stages.append(nn.Sequential(*pool, conv, nn.ReLU()))
                width = out
        self.model = LpipsNet(stages, [torch.ones(w) for w in c.channels]).to(self.device)
