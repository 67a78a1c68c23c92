"""VGGT (Wang et al., CVPR 2025) as a frozen geometry predictor: depth, confidences and cameras of S views.

RL3DEdit's verifier [P §3.3; C vggt]: images ``[S, 3, H, W]`` in [0, 1] at width 518 and a height that is a multiple
of 14, bf16 autocast on CUDA (fp16 before Ampere, as VGGT's demo), outputs ``pose_enc [1, S, 9]`` (translation,
quaternion, field of view; turned into OpenCV world-to-camera extrinsics with the first frame as world, and
intrinsics, by VGGT's own ``pose_encoding_to_extri_intri``), ``depth [1, S, H, W, 1]``, ``depth_conf [1, S, H, W]``
and ``world_points_conf [1, S, H, W]``; both confidences come from a ``1 + exp`` activation, so they are >= 1.

The ``vggt`` package is not on PyPI: install it from GitHub (``pip install git+https://github.com/facebookresearch/vggt``).
Weights: ``facebook/VGGT-1B`` on the Hugging Face hub (about 1B parameters; check the model card's licence, the
original checkpoint carries non-commercial terms). Neither is available on the build and test machines, so only the
input sizing and the output post-processing are tested here (with stand-in modules); the network itself never ran.

Resizing follows VGGT's ``load_and_preprocess_images`` "crop" mode without the crop: width 518, height
``round(H * 518 / W / 14) * 14``; outputs are resized back to the input size (intrinsics scaled with them), so
depth and confidences line up with the caller's pixels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.models.errors import MissingWeightsError, hf_cache_dir, looks_like_path, require_path
from gsstudio_ext.models.provider import LazyProvider

VGGT_REPO = "facebook/VGGT-1B"
VGGT_INSTALL = "pip install git+https://github.com/facebookresearch/vggt"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GeometryPrediction(NamedTuple):
    """What a geometry verifier says about S views (all at the input resolution H x W)."""

    depth: Tensor
    """Float[S, H, W] z-depth (VGGT: up to an unknown global scale)."""
    depth_conf: Tensor
    """Float[S, H, W] depth confidence, >= 1 (VGGT's 1 + exp activation)."""
    point_conf: Tensor
    """Float[S, H, W] world-point confidence, >= 1."""
    extrinsics: Optional[Tensor] = None
    """Float[S, 4, 4] OpenCV world-to-camera with the first frame as world; None if the verifier estimates no poses."""
    intrinsics: Optional[Tensor] = None
    """Float[S, 3, 3] pinhole intrinsics at H x W; None if not estimated."""


def vggt_input_size(height: int, width: int, target_width: int = 518, patch: int = 14) -> Tuple[int, int]:
    """(H', W') VGGT runs an H x W image at: W' = target_width, H' the aspect-preserving multiple of ``patch``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad image size {height} x {width}")
    if target_width % patch:
        raise ValueError(f"target width {target_width} is not a multiple of the patch size {patch}")
    return max(patch, round(height * target_width / width / patch) * patch), target_width


def resize_for_vggt(images: Tensor, target_width: int = 518, patch: int = 14) -> Tensor:
    """Float[S, 3, H, W] in [0, 1] -> Float[S, 3, H', W'] (bicubic, antialiased, clamped to [0, 1])."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [S, 3, H, W], got {tuple(images.shape)}")
    size = vggt_input_size(images.shape[-2], images.shape[-1], target_width, patch)
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


@dataclass
class VGGTConfig(InstantiateConfig):
    """VGGT-1B from the Hugging Face hub (local cache only unless allowed) or a local folder / model.pt file."""

    _target: Type = field(default_factory=lambda: VGGTProvider)
    weights: str = VGGT_REPO
    """Hub id, a local folder saved by VGGT.save_pretrained (or a hub snapshot), or a state-dict file (model.pt)."""
    cache_dir: Optional[Path] = None
    """Hugging Face cache folder; None = the default (HF_HOME)."""
    allow_download: bool = False
    """Download missing weights from the hub (off: the GPU and test machines are offline)."""
    width: int = 518
    """Input width (VGGT was trained at 518)."""
    patch_size: int = 14
    """ViT patch size; the input height is rounded to a multiple of it."""
    autocast_dtype: str = "bfloat16"
    """Autocast dtype on CUDA (bfloat16 | float16 | float32); bfloat16 falls back to float16 before Ampere."""
    resize_outputs: bool = True
    """Resize depth and confidences back to the input size and scale the intrinsics with them."""


def _import_error(err: Exception) -> ImportError:
    return ImportError(
        f"The VGGT verifier needs the `vggt` package, which is not on PyPI: {VGGT_INSTALL} "
        f"(https://github.com/facebookresearch/vggt). Import failed with: {err}"
    )


def _how(name: str) -> str:
    return (
        f"run `huggingface-cli download {name}` (https://huggingface.co/{name}) on a machine with network and copy "
        f"the HF cache here, or download https://huggingface.co/{name}/resolve/main/model.pt and set "
        f"VGGTConfig.weights to the file, or set VGGTConfig.allow_download=True; check the model card's licence"
    )


class VGGTProvider(LazyProvider):
    """Lazy frozen VGGT; :meth:`predict` returns a :class:`GeometryPrediction` per view set."""

    config: VGGTConfig

    def _load(self) -> None:
        try:
            from vggt.models.vggt import VGGT
        except ImportError as err:
            raise _import_error(err) from err
        c = self.config
        if looks_like_path(c.weights):
            path = Path(c.weights).expanduser()
            if path.is_file():
                model = VGGT()
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                require_path(path, weight=f"VGGT weights {c.weights}", how=_how(VGGT_REPO), is_dir=True)
                model = VGGT.from_pretrained(str(path))
        else:
            cache = str(c.cache_dir) if c.cache_dir is not None else None
            try:
                model = VGGT.from_pretrained(c.weights, local_files_only=not c.allow_download, cache_dir=cache)
            except (OSError, ValueError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise MissingWeightsError(c.weights, cache or hf_cache_dir(), _how(c.weights), reason) from err
        self.model = model.to(self.device)

    def _autocast(self) -> Any:
        dtype = _DTYPES.get(self.config.autocast_dtype)
        if dtype is None:
            raise ValueError(f"autocast_dtype must be one of {sorted(_DTYPES)}, got {self.config.autocast_dtype!r}")
        if self.device.type != "cuda" or dtype == torch.float32:
            return contextlib.nullcontext()
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(self.device)[0] < 8:
            dtype = torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.no_grad()
    def predict(self, images: Tensor) -> GeometryPrediction:
        """Depth, confidences and cameras of one view set Float[S, 3, H, W] in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [S, 3, H, W], got {tuple(images.shape)}")
        self.load()
        try:
            from vggt.utils.pose_enc import pose_encoding_to_extri_intri
        except ImportError as err:
            raise _import_error(err) from err
        h, w = images.shape[-2:]
        x = resize_for_vggt(images.to(self.device, torch.float32), self.config.width, self.config.patch_size)
        with self._autocast():
            out = self.model(x)
        hv, wv = x.shape[-2:]
        extrinsics, intrinsics = pose_encoding_to_extri_intri(out["pose_enc"].float(), (hv, wv))
        return postprocess_vggt(out, extrinsics, intrinsics, (h, w) if self.config.resize_outputs else (hv, wv))


def homogeneous(extrinsics: Tensor) -> Tensor:
    """Float[..., 3, 4] camera matrices -> Float[..., 4, 4] with the row (0, 0, 0, 1); [..., 4, 4] passes through."""
    if extrinsics.shape[-2:] == (4, 4):
        return extrinsics
    if extrinsics.shape[-2:] != (3, 4):
        raise ValueError(f"extrinsics must be [..., 3, 4] or [..., 4, 4], got {tuple(extrinsics.shape)}")
    bottom = torch.zeros(*extrinsics.shape[:-2], 1, 4, dtype=extrinsics.dtype, device=extrinsics.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([extrinsics, bottom], dim=-2)


def postprocess_vggt(out: dict, extrinsics: Tensor, intrinsics: Tensor, size: Tuple[int, int]) -> GeometryPrediction:
    """VGGT's batch-1 outputs -> :class:`GeometryPrediction` at ``size`` = (H, W).

    Args:
        out: VGGT's dict (``depth [1, S, h, w, 1]``, ``depth_conf`` and ``world_points_conf`` ``[1, S, h, w]``).
        extrinsics: Float[1, S, 3, 4] world-to-camera; intrinsics: Float[1, S, 3, 3] at (h, w).
    """
    depth = out["depth"][0, ..., 0].float()
    depth_conf = out["depth_conf"][0].float()
    point_conf = out["world_points_conf"][0].float()
    hv, wv = depth.shape[-2:]
    K = intrinsics[0].float().clone()
    if tuple(size) != (hv, wv):
        maps = torch.stack([depth, depth_conf, point_conf], dim=1)
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
        depth, depth_conf, point_conf = maps.unbind(1)
        K[:, 0] *= size[1] / wv
        K[:, 1] *= size[0] / hv
    return GeometryPrediction(depth, depth_conf, point_conf, homogeneous(extrinsics[0].float()), K)
