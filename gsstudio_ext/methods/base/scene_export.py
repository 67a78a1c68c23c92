"""A trained model's Gaussians as a standard 3DGS scene (for gs-export, the viewer's export button, the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from gsstudio_ext.core.anchors import is_anchor_layout, scene_from_anchor_params
from gsstudio_ext.core.ply import write_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH


def model_scene(model) -> GaussianScene:
    """A model's Gaussians as a CPU :class:`GaussianScene` in the standard 3DGS convention, with ``instance_id`` for
    models that have instances."""
    params = {name: value.detach() for name, value in model.gauss_params.items()}
    scene = (
        scene_from_anchor_params(params) if is_anchor_layout(params) else GaussianScene.from_splatfacto_params(params)
    )
    if getattr(model.config, "sh_degree", None) == 0 and scene.sh_rest.shape[1] == 0:
        scene.sh_dc = RGB2SH(torch.sigmoid(scene.sh_dc))  # splatfacto keeps logit colours at degree 0
    if callable(getattr(model, "instance_ids", None)):
        scene.extras["instance_id"] = model.instance_ids().detach()
    return scene.to("cpu")


def export_selection(model, path: Path, selection: Optional[Tensor] = None, comments: Sequence[str] = ()) -> int:
    """Write the ``selection`` (default: the model's live selection) as a .ply, atomically; returns the count.
    Raises ValueError when nothing is selected (no file is written)."""
    if selection is None:
        selection = model.query_state.selection
    if selection is None or not bool(selection.any()):
        raise ValueError("nothing is selected: run a text query or click an object first")
    scene = model_scene(model).subset(selection.detach().cpu())
    write_ply(path, scene, comments)
    return scene.num_gaussians
