"""The SD3-backed providers of RoMaP: part targets from joint-attention maps (Stage A) and SLaMP edit targets
(Stage C). Both render nothing themselves: they receive the views' RGB renders from the caller."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.methods.romap.edit_targets import EditTarget, EditTargetConfig
from gsstudio_ext.methods.romap.part_attention import PartAttentionConfig, part_attention_maps
from gsstudio_ext.methods.romap.part_targets import PartTargetSource, PartTargetSourceConfig, compose_part_target
from gsstudio_ext.methods.romap.slamp import SLaMPConfig, slamp_edit
from gsstudio_ext.models.rectified_flow import RectifiedFlowModel

DIFFUSION_SIZE = 512
"""RoMaP renders at 512 x 512 for SD3 (spec §1.2)."""


def to_diffusion_size(image: Tensor, size: int, multiple: int) -> Tensor:
    """Float[3, H, W] -> Float[3, s, s] bilinearly resized, s = ``size`` rounded down to ``multiple``."""
    side = max(multiple, size // multiple * multiple)
    return F.interpolate(image[None].float(), size=(side, side), mode="bilinear", align_corners=False)[0]


def from_diffusion_size(image: Tensor, height: int, width: int, mode: str = "bilinear") -> Tensor:
    """Float[C, s, s] -> Float[C, height, width]."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(image[None].float(), size=(height, width), mode=mode, **kwargs)[0]


@dataclass
class AttentionPartTargetsConfig(PartTargetSourceConfig):
    """Part targets A(C^phi) from SD3 joint attention on each view's render (RoMaP Stage A, §2.3 steps 1-5)."""

    _target: Type = field(default_factory=lambda: AttentionPartTargets)
    base_prompt: str = ""
    """Describes the object, e.g. "a photo of a chair"; the parts are appended ("... with legs and back")."""
    temperatures: Tuple[float, ...] = ()
    """Softmax temperature per part (0.1-0.2 typical, larger for large regions); empty = 0.2 for every part."""
    attention: PartAttentionConfig = field(default_factory=PartAttentionConfig)
    """Inversion and attention read-out settings."""
    size: int = DIFFUSION_SIZE
    """Side of the square image SD3 sees (renders are resized to it and the target back to the view size)."""
    seed: int = 0
    """Seed of the inversion noise (one generator per view, so a view's target does not depend on the order)."""


class AttentionPartTargets(PartTargetSource):
    """Computes each view's target once (from ``render(view) -> Float[3, H, W]``) and caches it."""

    config: AttentionPartTargetsConfig

    def __init__(
        self,
        config: AttentionPartTargetsConfig,
        model: Optional[RectifiedFlowModel] = None,
        render: Optional[Callable[[int], Tensor]] = None,
        num_views: int = 0,
    ) -> None:
        super().__init__(config)
        if not config.seg_list:
            raise ValueError("seg_list is empty: name at least one part")
        temps = config.temperatures or (0.2,) * len(config.seg_list)
        if len(temps) != len(config.seg_list):
            raise ValueError(f"{len(config.seg_list)} parts need {len(config.seg_list)} temperatures, got {len(temps)}")
        self.temperatures: Tuple[float, ...] = tuple(float(t) for t in temps)
        self.model, self.render, self._num_views = model, render, int(num_views)
        self._cache: Dict[int, Tensor] = {}

    @property
    def num_views(self) -> int:
        return self._num_views

    def targets(self, view_index: int) -> Tensor:
        if view_index not in self._cache:
            if self.model is None or self.render is None:
                raise RuntimeError("AttentionPartTargets needs a diffusion model and a render function")
            rgb = self.render(view_index)
            multiple = self.model.vae_scale_factor * self.model.patch_size
            image = to_diffusion_size(rgb, self.config.size, multiple)
            gen = torch.Generator().manual_seed(int(self.config.seed) * 100_003 + int(view_index))
            maps = part_attention_maps(
                self.model, image, self.config.base_prompt, self.config.seg_list, self.config.attention, gen
            )
            target = compose_part_target(maps, self.temperatures, self.prototypes, size=tuple(image.shape[-2:]))
            self._cache[view_index] = from_diffusion_size(target, *rgb.shape[-2:]).clamp(0.0, 1.0).cpu()
        return self._cache[view_index]


@dataclass
class SLaMPTargetConfig(EditTargetConfig):
    """SLaMP part edits with SD3 (RF inversion + scheduled latent mixing, §2.5)."""

    _target: Type = field(default_factory=lambda: SLaMPTarget)
    slamp: SLaMPConfig = field(default_factory=SLaMPConfig)
    """Inversion, mixing and guidance settings."""
    size: int = DIFFUSION_SIZE
    """Side of the square image SD3 edits (the part editor sets it from its ``diffusion_size``)."""
    seed: int = 0
    """Seed of the inversion noise."""


class SLaMPTarget(EditTarget):
    """Edits a view with SLaMP; outside the mask the input comes back unchanged (the VAE round trip is not)."""

    config: SLaMPTargetConfig
    name = "slamp"

    def __init__(self, config: SLaMPTargetConfig, model: Optional[RectifiedFlowModel] = None) -> None:
        super().__init__(config)
        self.model = model
        self.progress: Optional[Callable[[int, int], None]] = None

    def edit(self, image: Tensor, mask2d: Tensor, prompt: str, view_index: int) -> Tensor:
        if self.model is None:
            raise RuntimeError("SLaMPTarget needs a diffusion model")
        h, w = image.shape[-2:]
        multiple = self.model.vae_scale_factor * self.model.patch_size
        square = to_diffusion_size(image, self.config.size, multiple)
        mask = to_diffusion_size(mask2d[None].float(), self.config.size, multiple)[0] > 0.5
        gen = torch.Generator().manual_seed(int(self.config.seed) * 100_003 + int(view_index))
        edited = slamp_edit(self.model, square, mask, prompt, self.config.slamp, gen, self.progress)
        edited = from_diffusion_size(edited.to(image.device), h, w).to(image.dtype)
        return torch.where(mask2d.to(image.device)[None].bool(), edited, image)
