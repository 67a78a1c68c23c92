"""The query panel's actions for a model with the gsstudio_ext selection API (``text_query``, ``query_state``,
``config.query.mode``, and ``point_query`` where clicks select), found by duck typing so that the viewer layer
imports no method."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from gsstudio_ext.viewer.query_panel import PanelActions
from gsstudio_ext.viewer.ray_camera import pixel_to_world


@torch.no_grad()
def rendered_point(model: Any, camera: Cameras, x: int, y: int, min_alpha: float = 0.5) -> Optional[Tensor]:
    """World point [3] that pixel (x, y) of ``camera`` shows, from the model's rendered depth; None where the
    accumulated opacity is below ``min_alpha`` (the pixel shows nothing)."""
    camera = camera.to(model.device)
    was_training = model.training
    model.eval()
    try:
        outputs = model.get_outputs_for_camera(camera)
    finally:
        model.train(was_training)
    if float(outputs["accumulation"][y, x, 0]) < min_alpha:
        return None
    return pixel_to_world(camera, x, y, float(outputs["depth"][y, x, 0]))


def model_actions(model: Any, export: Optional[Callable[[Path], int]] = None) -> PanelActions:
    """PanelActions driving ``model``'s live selection; ``export(path) -> count`` writes the selection (the model's
    own scene layout), None hides the export button."""

    def text_query(text: str, negatives: Tuple[str, ...], threshold: float) -> None:
        model.text_query(text, negatives, threshold)

    def click(camera: Cameras, x: int, y: int, add: bool) -> Optional[Tensor]:
        point = rendered_point(model, camera, x, y)  # one render of the tiny ray camera
        if point is not None:
            model.point_query(point, add=add)
        return point

    def set_mode(mode: str) -> None:
        model.config.query.mode = mode

    def selection_size() -> int:
        selection = model.query_state.selection
        return 0 if selection is None else int(selection.sum())

    return PanelActions(
        text_query=text_query,
        clear=lambda: model.query_state.push(None),
        set_mode=set_mode,
        click=click if callable(getattr(model, "point_query", None)) else None,
        undo=model.query_state.undo,
        export=export,
        selection_size=selection_size,
    )
