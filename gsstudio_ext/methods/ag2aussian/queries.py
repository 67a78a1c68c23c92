"""Queries on a trained ag2aussian-ext model: what to render (config), the live selection with undo, and clicks
(pixel -> rendered depth -> 3D point -> grown anchor selection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from gsstudio_ext.core.selection import gaussians_of
from gsstudio_ext.methods.ag2aussian.index import anchor_centers, grow_from_point
from gsstudio_ext.viewer.model_actions import rendered_point

QueryMode = Literal["highlight", "isolate", "remove"]


@dataclass
class QueryConfig:
    """A text query applied to every render (ns-render, the viewer at start-up); also what the viewer edits."""

    text: str = ""
    """Text to look for; empty = no query."""
    negatives: Tuple[str, ...] = ()
    """Phrases the selection must be less like than the query (e.g. "table" when querying "mug")."""
    threshold: Optional[float] = None
    """Minimum cosine similarity of the best super-anchor; None = the text-query settings' threshold."""
    mode: QueryMode = "highlight"
    """How the selection shows in the RGB render: highlight (tinted), isolate (only it), remove (all but it)."""
    highlight_color: Tuple[float, float, float] = (1.0, 0.25, 0.1)
    """Tint of highlighted Gaussians."""


@dataclass
class QueryState:
    """The live selection of a model (children [N] bool) and per-child relevancy, with an undo history."""

    selection: Optional[Tensor] = None
    relevancy: Optional[Tensor] = None
    history: List[Tuple[Optional[Tensor], Optional[Tensor]]] = field(default_factory=list)

    max_undo: int = 32
    """Undo steps kept (each holds an [N] mask)."""

    def push(self, selection: Optional[Tensor], relevancy: Optional[Tensor] = None) -> None:
        """Make ``selection`` current; the previous one can be restored by :meth:`undo`."""
        self.history.append((self.selection, self.relevancy))
        del self.history[: -self.max_undo]
        self.selection, self.relevancy = selection, relevancy

    def undo(self) -> bool:
        """Restore the previous selection; False if there is none."""
        if not self.history:
            return False
        self.selection, self.relevancy = self.history.pop()
        return True


def click_point(model, camera: Cameras, x: int, y: int) -> Optional[Tensor]:
    """World point [3] under pixel (x, y) of ``camera`` from the rendered depth; None if the pixel shows nothing."""
    width, height = int(camera.width.flatten()[0]), int(camera.height.flatten()[0])
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"click ({x}, {y}) is outside the {width}x{height} image")
    return rendered_point(model, camera, x, y)


@torch.no_grad()
def select_by_point(model, point: Tensor) -> Tensor:
    """Children [N] bool selected by a 3D point: its nearest anchors, grown over the training-scale graph."""
    params = model.gauss_params
    centers = anchor_centers(params["anchor_xyz"].detach(), model.means.detach(), params["point2anchor"])
    anchors = grow_from_point(model.anchor_index, centers, params["anchor_feat"].detach(), point,
                              model.config.graph_settings)  # fmt: skip
    return gaussians_of(anchors, params["point2anchor"])
