"""The trained scene a method starts from (referspat-ext, romap-ext): a splatfacto / gsstudio run or a 3DGS .ply,
loaded as splatfacto parameters; a missing scene is remembered as a reason instead of raised, so a reloaded run
(whose checkpoint holds the Gaussians) needs no scene file."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from gsstudio_ext.core.checkpoint import load_scene
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH, SH2RGB

GEOMETRY_KEYS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")
"""The splatfacto ``gauss_params`` of a scene's Gaussians (what a method on a trained scene keeps frozen)."""


def load_trained_scene(path: Optional[Path]) -> Tuple[Optional[GaussianScene], Optional[str]]:
    """(scene, None), or (None, why there is none) for no path or a missing one."""
    if path is None:
        return None, "no trained scene given"
    if not Path(path).exists():
        return None, f"the scene {path} does not exist"
    scene = load_scene(path)
    if Path(path).suffix.lower() == ".ply" and scene.sh_degree == 0:  # splatfacto keeps degree-0 colours as logits
        scene.sh_dc = torch.logit(SH2RGB(scene.sh_dc).clamp(1e-4, 1 - 1e-4))
    return scene, None


def scene_params(scene: Optional[GaussianScene], sh_degree: int) -> Dict[str, Tensor]:
    """float32 splatfacto parameters of ``scene``; zero rows (filled by a checkpoint load) when there is none."""
    if scene is None:
        params = {key: torch.zeros(0, 3) for key in ("means", "scales", "features_dc")}
        params.update(quats=torch.zeros(0, 4), opacities=torch.zeros(0, 1))
        params["features_rest"] = torch.zeros(0, (sh_degree + 1) ** 2 - 1, 3)
    else:
        params = scene.to_splatfacto_params(include_extras=False)
    return {key: value.float() for key, value in params.items()}


def scene_of_params(params: Mapping[str, Tensor]) -> GaussianScene:
    """The scene of splatfacto parameters in the SH colour convention that ``render_scene`` and .ply files use:
    degree-0 parameters hold logit colours (splatfacto's convention, see :func:`load_trained_scene`) and are
    converted back."""
    scene = GaussianScene.from_splatfacto_params({key: params[key] for key in GEOMETRY_KEYS})
    if scene.sh_rest.shape[1] == 0:
        scene.sh_dc = RGB2SH(torch.sigmoid(scene.sh_dc))
    return scene
