"""Load Gaussian scenes from nerfstudio splatfacto checkpoints, and `load_scene` for any supported path.

A nerfstudio checkpoint ``<run>/nerfstudio_models/step-XXXXXXXXX.ckpt`` is a ``torch.save`` dict whose key
``"pipeline"`` holds the pipeline state dict; the Gaussians are ``_model.gauss_params.<name>`` (``module.``-prefixed
when saved from DDP). Besides splatfacto's six parameters, any other ``gauss_params`` entry (a method's per-Gaussian
features, ids ...) is returned in ``GaussianScene.extras``.

Security note: checkpoints are read with ``torch.load(..., weights_only=False)`` because nerfstudio checkpoints
may pickle objects beyond plain tensors. Unpickling can run arbitrary code, so these functions are only meant for
files the user explicitly points at (their own training runs); never call them on files fetched automatically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from gsstudio_ext.core.ply import SceneIOError, read_ply
from gsstudio_ext.core.scene import GaussianScene

PathLike = Union[str, os.PathLike]

_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
_GAUSS_MARKER = "gauss_params."


def find_latest_checkpoint(path: PathLike) -> Path:
    """The ``step-*.ckpt`` with the highest step in ``path`` (a run directory or its ``nerfstudio_models/``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint, run directory or nerfstudio_models folder: {path}")
    if path.is_file():
        return path
    folder = path / "nerfstudio_models" if (path / "nerfstudio_models").is_dir() else path
    steps = []
    for child in folder.iterdir():
        match = _STEP_FILE.match(child.name)
        if match and child.is_file():
            steps.append((int(match.group(1)), child))
    if not steps:
        raise FileNotFoundError(
            f"no step-*.ckpt checkpoint in {folder}; pass a nerfstudio run directory (with nerfstudio_models/), "
            "its nerfstudio_models/ folder, or a .ckpt file"
        )
    return max(steps)[1]


def _load_trusted(path: Path) -> Any:
    """``torch.load`` of a user-chosen file on CPU (unpickles: see the module's security note)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises pickle, zip and runtime errors for non-checkpoint files
        raise SceneIOError(f"{path} is not a readable torch checkpoint: {type(err).__name__}: {err}") from err


def gauss_params_from_state_dict(state: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The ``gauss_params`` entries of a (pipeline or model) state dict, by parameter name.

    Keys are matched on their ``gauss_params.`` segment, so ``_model.gauss_params.means``,
    ``module._model.gauss_params.means`` and ``gauss_params.means`` all give ``means``.
    """
    params: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        head, marker, name = key.rpartition(_GAUSS_MARKER)
        if not marker or "." in name or not (head == "" or head.endswith(".")):
            continue
        if name in params:
            raise SceneIOError(f"checkpoint holds two Gaussian models (duplicate gauss_params.{name})")
        params[name] = value.detach()
    return params


def load_splatfacto_checkpoint(path: PathLike) -> GaussianScene:
    """Load the Gaussians of a nerfstudio splatfacto(-derived) checkpoint as a CPU :class:`GaussianScene`.

    ``path`` is a ``step-*.ckpt`` file, a run directory or its ``nerfstudio_models/`` folder (the latest step is
    used). Extra ``gauss_params`` entries come back as extras.
    """
    ckpt_path = find_latest_checkpoint(path)
    ckpt = _load_trusted(ckpt_path)
    if not isinstance(ckpt, Mapping):
        raise SceneIOError(f"{ckpt_path} is not a nerfstudio checkpoint (it holds a {type(ckpt).__name__})")
    state = ckpt.get("pipeline", ckpt)
    if not isinstance(state, Mapping):
        raise SceneIOError(f"{ckpt_path}: 'pipeline' is a {type(state).__name__}, not a state dict")
    params = gauss_params_from_state_dict(state)
    if not params:
        keys = sorted(k for k in state if isinstance(k, str))[:8]
        raise SceneIOError(
            f"{ckpt_path} holds no Gaussians (no '_model.gauss_params.*' entries; first keys: {keys}); "
            "is it a splatfacto-based run?"
        )
    try:
        return GaussianScene.from_splatfacto_params(params)
    except ValueError as err:
        raise SceneIOError(f"{ckpt_path}: Gaussian parameters are inconsistent: {err}") from err


def load_scene(path: PathLike) -> GaussianScene:
    """Load a scene from a ``.ply`` file, a nerfstudio ``.ckpt``, a run directory, its ``nerfstudio_models/`` folder
    or its ``config.yml``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such scene file or directory: {path}")
    if path.is_dir():
        return load_splatfacto_checkpoint(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return read_ply(path)
    if suffix in (".ckpt", ".pt", ".pth"):
        return load_splatfacto_checkpoint(path)
    if suffix in (".yml", ".yaml") and (path.parent / "nerfstudio_models").is_dir():
        return load_splatfacto_checkpoint(path.parent)  # a run's config.yml, as ns-* commands take it
    raise SceneIOError(f"unsupported scene file {path}: expected a .ply, a nerfstudio .ckpt or a run directory")
