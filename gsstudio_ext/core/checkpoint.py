"""Load Gaussian scenes from nerfstudio splatfacto checkpoints, and `load_scene` for any supported path.

A nerfstudio checkpoint ``<run>/nerfstudio_models/step-XXXXXXXXX.ckpt`` is a ``torch.save`` dict whose key
``"pipeline"`` holds the pipeline state dict; the Gaussians are ``_model.gauss_params.<name>`` (``module.``-prefixed
when saved from DDP). Besides splatfacto's six parameters, any other ``gauss_params`` entry (a method's per-Gaussian
features, ids ...) is returned in ``GaussianScene.extras``.

Anchor-layout checkpoints (ag2aussian-ext: children stored as offsets from fixed anchors, see
:mod:`gsstudio_ext.core.anchors`) give their children with world positions, their ``instance_feature`` and, when the
checkpoint holds a super-anchor label per anchor (the model buffer ``index_labels``), their ``instance_id``.

Security note: checkpoints are read with ``torch.load(..., weights_only=False)`` because nerfstudio checkpoints
may pickle objects beyond plain tensors. Unpickling can run arbitrary code, so these functions are only meant for
files the user explicitly points at (their own training runs); never call them on files fetched automatically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from gsstudio_ext.core.anchors import is_anchor_layout, scene_from_anchor_params
from gsstudio_ext.core.ply import SceneIOError, read_ply
from gsstudio_ext.core.scene import GaussianScene

PathLike = Union[str, os.PathLike]

_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
_GAUSS_MARKER = "gauss_params."
_ANCHOR_LABELS = "index_labels"  # ag2aussian-ext's model buffer: super-anchor id per anchor


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


def model_buffer_from_state_dict(state: Mapping[str, Any], name: str) -> Optional[torch.Tensor]:
    """A model-level tensor ``name`` of a (pipeline or model) state dict (``_model.<name>``, ``module._model.<name>``
    or ``<name>``), or None. Entries inside ``gauss_params`` do not count."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        head, dot, last = key.rpartition(".")
        if last == name and _GAUSS_MARKER not in key and (not dot or head == "_model" or head.endswith("._model")):
            return value.detach()
    return None


def _anchor_scene(params: Dict[str, torch.Tensor], state: Mapping[str, Any]) -> GaussianScene:
    """Children of an anchor-layout checkpoint; ``instance_id`` only when the saved labels fit the anchors."""
    labels = model_buffer_from_state_dict(state, _ANCHOR_LABELS)
    if labels is not None and tuple(labels.shape) != (int(params["anchor_xyz"].shape[0]),):
        labels = None  # labels of an older anchor set: no instance ids rather than wrong ones
    return scene_from_anchor_params(params, labels)


def load_splatfacto_checkpoint(path: PathLike) -> GaussianScene:
    """Load the Gaussians of a nerfstudio splatfacto(-derived) checkpoint as a CPU :class:`GaussianScene`.

    ``path`` is a ``step-*.ckpt`` file, a run directory or its ``nerfstudio_models/`` folder (the latest step is
    used). Extra ``gauss_params`` entries come back as extras. Anchor layouts (ag2aussian-ext) give their children
    (see the module docstring).
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
        if is_anchor_layout(params):
            return _anchor_scene(params, state)
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
