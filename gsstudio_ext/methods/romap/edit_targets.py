"""Who produces the 2D edited image of a view: the :class:`EditTarget` interface and an offline procedural editor.

An edit target takes a render Float[3, H, W] in [0, 1], the part's 2D mask Bool[H, W], the edit prompt and the
view index, and returns the edited image. Pixels outside the mask are returned exactly unchanged. ``name`` says
which provider made the edit (recorded in outputs). RoMaP's own target is SLaMP on SD3 (spec §2.5), written
elsewhere; :class:`ProceduralEdit` is a deterministic stand-in that needs no weights (demos, tests, CPU runs).

ProceduralEdit grammar: the prompt must name a colour from :data:`COLORS` (the first one is the paint; an optional
second colour is the pattern's other colour) and may name one pattern from :data:`PATTERNS`. Other words ("a",
"nose", "-textured" ...) are ignored. Masked pixels are repainted keeping their luminance shading relative to the
part's mean luminance, so shading survives the edit (paint, not a flat sticker).

Limitation: patterns are drawn in image space (``pattern_period_px``) unless a world-position map Float[H, W, 3] is
given (``positions=``, e.g. :func:`unproject_depth` of a rendered depth), in which case they are a function of the
surface point (``pattern_period_world``) and agree between views. Image-space patterns stick to the screen, so
the targets of different views disagree and a 3D fit of them blurs the pattern.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

import torch
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.85),
    "gold": (0.90, 0.70, 0.20),
    "golden": (0.90, 0.70, 0.20),
    "silver": (0.75, 0.75, 0.78),
    "pink": (0.95, 0.50, 0.70),
    "purple": (0.50, 0.20, 0.70),
    "orange": (0.95, 0.50, 0.10),
    "yellow": (0.95, 0.88, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "white": (0.95, 0.95, 0.95),
    "black": (0.06, 0.06, 0.06),
    "brown": (0.45, 0.28, 0.12),
    "grey": (0.50, 0.50, 0.50),
    "gray": (0.50, 0.50, 0.50),
}
"""Colour words -> linear RGB paint in [0, 1] ("golden" = "gold", "gray" = "grey")."""

PATTERNS = ("striped", "checkered", "dotted")
"""Pattern words; "stripes"/"stripy", "checker(s)"/"checked", "dots"/"polka" are read as these."""

_PATTERN_ALIASES = {
    "striped": "striped",
    "stripes": "striped",
    "stripy": "striped",
    "checkered": "checkered",
    "checker": "checkered",
    "checkers": "checkered",
    "checked": "checkered",
    "dotted": "dotted",
    "dots": "dotted",
    "polka": "dotted",
}
LUMA = (0.299, 0.587, 0.114)
"""Rec. 601 luminance weights."""


@dataclass
class EditTargetConfig(InstantiateConfig):
    """Settings shared by every 2D edit provider."""

    _target: Type = field(default_factory=lambda: EditTarget)


class EditTarget(ABC):
    """Makes the 2D edited image of one view; pixels outside the mask come back exactly unchanged."""

    name: str = "edit-target"
    """Provider name, recorded in outputs."""

    def __init__(self, config: EditTargetConfig) -> None:
        self.config = config

    @abstractmethod
    def edit(self, image: Tensor, mask2d: Tensor, prompt: str, view_index: int) -> Tensor:
        """Float[3, H, W] in [0, 1], Bool[H, W] part mask, edit prompt, view index -> edited Float[3, H, W]."""

    def edit_views(self, images: Tensor, masks2d: Tensor, prompt: str) -> Tensor:
        """Edit every view: Float[V, 3, H, W], Bool[V, H, W] -> Float[V, 3, H, W]."""
        return torch.stack([self.edit(images[v], masks2d[v], prompt, v) for v in range(images.shape[0])])


def _check_inputs(image: Tensor, mask2d: Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be Float[3, H, W], got {list(image.shape)}")
    if mask2d.shape != image.shape[1:]:
        raise ValueError(f"mask2d must be Bool[{image.shape[1]}, {image.shape[2]}], got {list(mask2d.shape)}")


# ---------------------------------------------------------------------------------------------------------- procedural


@dataclass
class ProceduralEditConfig(EditTargetConfig):
    """Offline deterministic recolouring from the prompt's colour and pattern words (see the module docstring)."""

    _target: Type = field(default_factory=lambda: ProceduralEdit)
    shading: float = 1.0
    """How much of the image's relative luminance shading the paint keeps (0 = flat colour, 1 = full shading)."""
    pattern_period_px: float = 8.0
    """Pattern period in pixels when no position map is given (image-space patterns are not view-consistent)."""
    pattern_period_world: float = 0.1
    """Pattern period in scene units when a world-position map is given."""
    stripe_axis: int = 1
    """Stripes vary along this axis: image row (0) / column (1), or world x/y/z (0/1/2) with a position map."""
    dot_radius: float = 0.3
    """Dot radius as a fraction of the period."""
    pattern_shade: float = 0.35
    """Without a second colour, the pattern's other colour is the paint times this factor."""


class ProceduralEdit(EditTarget):
    """Repaints the masked pixels with the prompt's colour (and pattern), keeping their shading."""

    config: ProceduralEditConfig
    name = "procedural"

    def edit(
        self, image: Tensor, mask2d: Tensor, prompt: str, view_index: int, positions: Optional[Tensor] = None
    ) -> Tensor:
        """Edited Float[3, H, W]; ``positions`` Float[H, W, 3] (world points of the pixels) makes patterns 3D."""
        _check_inputs(image, mask2d)
        colours, pattern = parse_edit_prompt(prompt)
        mask = mask2d.to(image.device).bool()
        if not bool(mask.any()):
            return image.clone()
        cfg = self.config
        luma = (image * torch.tensor(LUMA, dtype=image.dtype, device=image.device)[:, None, None]).sum(dim=0)
        mean_luma = luma[mask].mean()
        shade = luma / mean_luma if float(mean_luma) > 1e-6 else torch.ones_like(luma)
        factor = 1.0 + cfg.shading * (shade - 1.0)  # [H, W]
        paint = torch.tensor(colours[0], dtype=image.dtype, device=image.device)[:, None, None].expand_as(image)
        if pattern is not None:
            other = colours[1] if len(colours) > 1 else tuple(c * cfg.pattern_shade for c in colours[0])
            other_t = torch.tensor(other, dtype=image.dtype, device=image.device)[:, None, None].expand_as(image)
            on = self.pattern_mask(pattern, image.shape[1], image.shape[2], positions, image.device)
            paint = torch.where(on[None], other_t, paint)
        edited = (paint * factor[None]).clamp(0.0, 1.0)
        return torch.where(mask[None], edited, image)

    def edit_views(self, images: Tensor, masks2d: Tensor, prompt: str, positions: Optional[Tensor] = None) -> Tensor:
        """Edit every view: Float[V, 3, H, W], Bool[V, H, W] (+ world points Float[V, H, W, 3]) -> [V, 3, H, W]."""
        return torch.stack(
            [
                self.edit(images[v], masks2d[v], prompt, v, None if positions is None else positions[v])
                for v in range(images.shape[0])
            ]
        )

    def pattern_mask(
        self, pattern: str, height: int, width: int, positions: Optional[Tensor], device: torch.device
    ) -> Tensor:
        """Bool[H, W]: where the pattern's second colour goes (image space, or from world ``positions``)."""
        cfg = self.config
        if positions is not None:
            if positions.shape != (height, width, 3):
                raise ValueError(f"positions must be Float[{height}, {width}, 3], got {list(positions.shape)}")
            coords = positions.to(device).float() / cfg.pattern_period_world  # [H, W, 3] in periods
        else:
            rows = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
            cols = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width)
            coords = (torch.stack([rows, cols], dim=-1) + 0.5) / cfg.pattern_period_px  # [H, W, 2]
        if pattern == "striped":
            axis = min(cfg.stripe_axis, coords.shape[-1] - 1)
            return torch.floor(coords[..., axis]).long() % 2 == 1
        if pattern == "checkered":
            return torch.floor(coords).long().sum(dim=-1) % 2 == 1
        if pattern == "dotted":
            frac = coords - torch.floor(coords) - 0.5  # offset from the nearest cell centre, in periods
            return frac.norm(dim=-1) < cfg.dot_radius
        raise ValueError(f"unknown pattern {pattern!r}; known patterns: {', '.join(PATTERNS)}")


def parse_edit_prompt(prompt: str) -> Tuple[List[Tuple[float, float, float]], Optional[str]]:
    """(colours, pattern) named by an edit prompt: one or two colours from :data:`COLORS` in prompt order, at most
    one pattern from :data:`PATTERNS` (None when absent).

    Raises:
        ValueError: no known colour word, more than two colours, or more than one pattern; the message lists the
        known words.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    colours = [COLORS[w] for w in words if w in COLORS]
    patterns = list(dict.fromkeys(_PATTERN_ALIASES[w] for w in words if w in _PATTERN_ALIASES))
    known = f"known colours: {', '.join(COLORS)}; known patterns: {', '.join(PATTERNS)}"
    if not colours:
        raise ValueError(f"the procedural editor found no colour word in {prompt!r}; {known}")
    if len(colours) > 2:
        raise ValueError(f"the procedural editor takes at most two colours (paint, pattern) in {prompt!r}; {known}")
    if len(patterns) > 1:
        raise ValueError(f"the procedural editor takes one pattern, got {patterns} in {prompt!r}; {known}")
    if len(colours) == 2 and not patterns:
        raise ValueError(f"a second colour needs a pattern word in {prompt!r}; {known}")
    return colours, (patterns[0] if patterns else None)


def unproject_depth(depth: Tensor, viewmat: Tensor, K: Tensor) -> Tensor:
    """World points Float[H, W, 3] of a z-depth map [H, W] (or [H, W, 1]) seen by an OpenCV world-to-camera
    ``viewmat`` [4, 4] with intrinsics ``K`` [3, 3] (pixel centres at +0.5)."""
    if depth.ndim == 3:
        depth = depth[..., 0]
    h, w = depth.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=depth.device, dtype=depth.dtype) + 0.5,
        torch.arange(w, device=depth.device, dtype=depth.dtype) + 0.5,
        indexing="ij",
    )
    K = K.to(depth)
    cam = torch.stack([(xs - K[0, 2]) / K[0, 0] * depth, (ys - K[1, 2]) / K[1, 1] * depth, depth], dim=-1)
    rot, trans = viewmat[:3, :3].to(depth), viewmat[:3, 3].to(depth)
    return (cam - trans) @ rot  # R^T (x_cam - t), row-vector form
