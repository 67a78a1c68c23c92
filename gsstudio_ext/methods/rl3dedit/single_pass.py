"""RL3DEdit's single-pass edit of a trained scene (spec §3.1, §3.7): choose N views spread over the training cameras,
render the current scene there, edit all of them in one 2D pass, then refit the Gaussians to the edited views.

:class:`SinglePassEdit` exposes the stages so a training loop can drive the refit step by step (``ns-train
rl3dedit-ext``, the viewer's worker); :meth:`SinglePassEdit.run` does everything at once (CLI, benchmark).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Literal, NamedTuple, Optional

import torch
from torch import Tensor

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.methods.rl3dedit.refit import Refit, RefitConfig, refit_scene
from gsstudio_ext.methods.rl3dedit.view_editors import (
    EditedViews,
    KontextGridEditorConfig,
    ProceduralViewEditorConfig,
    SourceViews,
    ViewEditor,
)
from gsstudio_ext.methods.rl3dedit.views import NUM_VIEWS, select_views
from gsstudio_ext.methods.romap.local_edit import EditViews

Progress = Callable[[int, int, float], None]


@dataclass
class SinglePassConfig:
    """Views, 2D editor and refit of one edit. [P] paper, [C] release, [I] our choices."""

    num_views: int = NUM_VIEWS
    """Views edited together (9 = the 3x3 grid) [P]."""
    view_kind: Literal["auto", "360", "forward"] = "auto"
    """How views are spread: equal azimuth steps around the scene (360), farthest camera centres (forward), or
    decided from the cameras' azimuth coverage (auto) [I]."""
    editor: Literal["flux-kontext", "procedural"] = "flux-kontext"
    """The 2D editor: FLUX.1-Kontext on the grid (needs weights) or the offline procedural recolouring."""
    kontext: KontextGridEditorConfig = field(default_factory=KontextGridEditorConfig)
    """Kontext weights (and RL3DEdit LoRA or transformer file), grid and sampling settings."""
    procedural: ProceduralViewEditorConfig = field(default_factory=ProceduralViewEditorConfig)
    """The offline editor's settings."""
    refit: RefitConfig = field(default_factory=RefitConfig)
    """3DGS fine-tuning on the edited views (3,000 steps from the current scene)."""

    def view_editor(self, device: torch.device | str = "cpu") -> ViewEditor:
        config = self.kontext if self.editor == "flux-kontext" else self.procedural
        return config.setup(device=device)


class SinglePassResult(NamedTuple):
    scene: GaussianScene
    """The edited scene."""
    view_indices: Tensor
    """Long[N] indices into the training cameras of the edited views, in neighbour order."""
    sources: SourceViews
    edited: EditedViews
    losses: List[float]
    timings: Dict[str, float]
    """Seconds per stage: render, edit, refit."""


class SinglePassEdit:
    """One edit of ``scene`` seen by the training ``cameras`` (see the module docstring)."""

    def __init__(
        self,
        config: SinglePassConfig,
        scene: GaussianScene,
        cameras: EditViews,
        background: Optional[Tensor] = None,
        editor: Optional[ViewEditor] = None,
    ) -> None:
        self.config = config
        self.scene = scene
        self.cameras = cameras
        self.background = background
        self._editor = editor
        self.timings: Dict[str, float] = {}

    @property
    def editor(self) -> ViewEditor:
        if self._editor is None:
            self._editor = self.config.view_editor(self.scene.device)
        return self._editor

    def _synchronize(self) -> None:
        """Wait for the GPU, so stage timings hold their own work."""
        if self.scene.device.type == "cuda":
            torch.cuda.synchronize(self.scene.device)

    def view_indices(self) -> Tensor:
        """Long[N] training views to edit, consecutive ones spatial neighbours (centred on the Gaussians' mean)."""
        centre = self.scene.means.detach().mean(dim=0)
        return select_views(self.cameras.viewmats, self.config.num_views, self.config.view_kind, centre)

    @torch.no_grad()
    def sources(self, indices: Tensor) -> SourceViews:
        """Renders (RGB, alpha, depth) of the scene at the training views ``indices``."""
        start = time.perf_counter()
        device = self.scene.device
        viewmats = self.cameras.viewmats[indices.to(self.cameras.viewmats.device)].to(device)
        Ks = self.cameras.Ks[indices.to(self.cameras.Ks.device)].to(device)
        background = None if self.background is None else self.background.to(device)
        out = render_scene(
            self.scene, viewmats, Ks, self.cameras.width, self.cameras.height, background=background, depth=True
        )
        alphas = out.alpha[..., 0]
        depths = torch.where(alphas > 0, out.depth[..., 0], torch.zeros_like(alphas))
        self._synchronize()
        self.timings["render"] = time.perf_counter() - start
        return SourceViews(out.rgb.permute(0, 3, 1, 2).contiguous(), alphas, depths, viewmats, Ks)

    def edit_views(self, sources: SourceViews, instruction: str) -> EditedViews:
        """The one 2D edit of every source view."""
        if not instruction.strip():
            raise ValueError("give an edit instruction, e.g. 'make the mushroom red striped'")
        start = time.perf_counter()
        with torch.no_grad():
            edited = self.editor.edit(sources, instruction)
        self._synchronize()
        self.timings["edit"] = time.perf_counter() - start
        return edited

    def refit_config(self) -> RefitConfig:
        """The refit settings, on this edit's background unless they name one."""
        config = self.config.refit
        if config.background is None and self.background is not None:
            config = replace(config, background=tuple(float(c) for c in self.background))
        return config

    def refit(self, sources: SourceViews, edited: EditedViews, steps: Optional[int] = None) -> Refit:
        """The refit stepper of the scene on the edited views (``steps`` overrides the configured count), for a loop
        that drives it step by step."""
        config = self.refit_config() if steps is None else replace(self.refit_config(), steps=steps)
        return Refit(self.scene, sources.viewmats, edited.Ks, edited.images, config)

    def run(self, instruction: str, progress: Optional[Progress] = None) -> SinglePassResult:
        """Select, render, edit, refit; ``progress(step, steps, loss)`` follows the refit."""
        indices = self.view_indices()
        sources = self.sources(indices)
        edited = self.edit_views(sources, instruction)
        start = time.perf_counter()
        fitted = refit_scene(self.scene, sources.viewmats, edited.Ks, edited.images, self.refit_config(), progress)
        self._synchronize()
        self.timings["refit"] = time.perf_counter() - start
        return SinglePassResult(fitted.scene, indices, sources, edited, fitted.losses, dict(self.timings))
