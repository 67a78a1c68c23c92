"""Who edits the N selected views in one pass: the :class:`ViewEditor` interface, FLUX.1-Kontext on a 3x3 grid
(RL3DEdit, spec §3.2-3.3) and the offline procedural editor of romap-ext (no weights: demos, tests, CPU runs).

An editor takes the source renders with their depth and cameras and returns the edited views with the intrinsics of
the size it returns them at: the Kontext grid gives ~341 px cells for a 1024 px grid, and the refit then fits the
scene at that size instead of inventing detail by upsampling [I].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Type

import torch
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.methods.rl3dedit.grid import GRID_SIDE, GridEditConfig, edit_views
from gsstudio_ext.methods.rl3dedit.views import scale_intrinsics
from gsstudio_ext.methods.romap.edit_targets import ProceduralEdit, ProceduralEditConfig, unproject_depth
from gsstudio_ext.models.flux_kontext import FluxKontextConfig, KontextEditor, KontextEditorConfig


class SourceViews(NamedTuple):
    """Renders of the scene at the selected views, consecutive entries spatial neighbours."""

    images: Tensor
    """Float[N, 3, H, W] in [0, 1]."""
    alphas: Tensor
    """Float[N, H, W] accumulated opacity."""
    depths: Tensor
    """Float[N, H, W] z-depth (0 where nothing was rendered)."""
    viewmats: Tensor
    """Float[N, 4, 4] OpenCV world-to-camera."""
    Ks: Tensor
    """Float[N, 3, 3] intrinsics at (H, W)."""


class EditedViews(NamedTuple):
    images: Tensor
    """Float[N, 3, h, w] edited views in [0, 1]."""
    Ks: Tensor
    """Float[N, 3, 3] intrinsics at (h, w)."""
    prompt: str
    """What the 2D editor was given."""
    grid: Optional[Tensor] = None
    """Float[3, Hg, Wg] the edited grid (grid editors only)."""
    source_grid: Optional[Tensor] = None
    """Float[3, Hg, Wg] the grid the editor saw."""


@dataclass
class ViewEditorConfig(InstantiateConfig):
    _target: Type = field(default_factory=lambda: ViewEditor)


class ViewEditor(ABC):
    """Edits every selected view at once from one instruction."""

    name: str = "view-editor"
    """Provider name, recorded in outputs and reports."""

    def __init__(self, config: ViewEditorConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    @abstractmethod
    def edit(self, views: SourceViews, instruction: str) -> EditedViews:
        """The edited views of ``views`` for ``instruction``."""


# ---------------------------------------------------------------------------------------------------------- Kontext


@dataclass
class KontextGridEditorConfig(ViewEditorConfig):
    """RL3DEdit: the 9 views tiled into one 3x3 grid, edited once by FLUX.1-Kontext (+ the RL3DEdit weights)."""

    _target: Type = field(default_factory=lambda: KontextGridEditor)
    kontext: KontextEditorConfig = field(default_factory=FluxKontextConfig)
    """The Kontext pipeline: FLUX.1-Kontext-dev from the local HF cache, optionally with RL-tuned weights (file or
    LoRA); ``TinyFluxKontextConfig`` in tests."""
    grid: GridEditConfig = field(default_factory=GridEditConfig)
    """Instruction template, seed, steps (28), guidance (2.5), resampling [C release]."""
    cell_size: bool = True
    """Return the views at the grid's cell size (with scaled intrinsics) rather than resized to the render size [I]."""


class KontextGridEditor(ViewEditor):
    config: KontextGridEditorConfig
    name = "flux-kontext-grid"

    def __init__(self, config: KontextGridEditorConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        self.kontext: KontextEditor = config.kontext.setup(device=self.device)

    def edit(self, views: SourceViews, instruction: str) -> EditedViews:
        count = views.images.shape[0]
        if count != GRID_SIDE * GRID_SIDE:
            raise ValueError(f"the Kontext grid edits {GRID_SIDE * GRID_SIDE} views at once, got {count}")
        cell_size = self.config.cell_size
        result = edit_views(self.kontext, views.images.to(self.device), instruction, self.config.grid, cell_size)
        height, width = views.images.shape[-2:]
        Ks = scale_intrinsics(views.Ks, (width, height), (result.views.shape[-1], result.views.shape[-2]))
        return EditedViews(result.views, Ks, result.prompt, result.grid, result.source_grid)


# ---------------------------------------------------------------------------------------------------------- offline


@dataclass
class ProceduralViewEditorConfig(ViewEditorConfig):
    """Offline stand-in: romap-ext's procedural recolouring (colour and pattern words) of the rendered foreground."""

    _target: Type = field(default_factory=lambda: ProceduralViewEditor)
    procedural: ProceduralEditConfig = field(default_factory=ProceduralEditConfig)
    """Paint, shading and pattern settings."""
    alpha_threshold: float = 0.5
    """Pixels whose accumulated opacity exceeds this are repainted."""
    world_patterns: bool = True
    """Draw patterns on the surface (from the rendered depth), so views agree; False: in image space, so each view
    gets its own pattern (what independent per-view 2D edits look like)."""


class ProceduralViewEditor(ViewEditor):
    config: ProceduralViewEditorConfig
    name = "procedural"

    def __init__(self, config: ProceduralViewEditorConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        self.painter = ProceduralEdit(config.procedural)

    def edit(self, views: SourceViews, instruction: str) -> EditedViews:
        masks = views.alphas > self.config.alpha_threshold
        positions = None
        if self.config.world_patterns:
            positions = torch.stack(
                [unproject_depth(views.depths[v], views.viewmats[v], views.Ks[v]) for v in range(len(views.depths))]
            )
        images = self.painter.edit_views(views.images, masks, instruction, positions)
        return EditedViews(images, views.Ks, instruction)
