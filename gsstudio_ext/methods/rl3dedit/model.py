"""rl3dedit-ext: single-pass, multi-view-consistent editing of a trained Gaussian scene (RL3DEdit).

The model keeps the original scene in ``gauss_params`` (never trained) and the edited one in ``edited_*`` buffers,
so a checkpoint carries both (``original_rgb`` vs ``edited_rgb``) and the before/after toggle and undo need no
re-training. ``ns-train rl3dedit-ext`` runs one edit: its training steps are the refit steps (the pipeline drives a
:class:`~gsstudio_ext.methods.rl3dedit.refit.Refit` and the viewer shows the scene as it changes). The viewer and
``gs-rl3dedit-edit`` run further edits on top of the last one; undo steps back through a session's edits (a reloaded
run keeps only its latest edited state, so there undo returns to the original scene).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.ply import write_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.methods.base.frozen_strategy import FrozenStrategy
from gsstudio_ext.methods.base.model import FeatureSplatfactoModel, FeatureSplatfactoModelConfig
from gsstudio_ext.methods.base.trained_scene import GEOMETRY_KEYS, load_trained_scene, scene_of_params, scene_params
from gsstudio_ext.methods.rl3dedit.single_pass import Progress, SinglePassConfig, SinglePassEdit
from gsstudio_ext.methods.romap.local_edit import EditViews
from gsstudio_ext.viewer.edit_panel import EditActions, EditPanel


@dataclass
class RL3DEditModelConfig(FeatureSplatfactoModelConfig):
    """RL3DEdit on a trained scene: the instruction, the 2D editor and the refit are in ``edit``."""

    _target: Type = field(default_factory=lambda: RL3DEditModel)
    scene: Optional[Path] = None
    """The trained scene: a splatfacto / gsstudio run (config.yml, folder or step-*.ckpt) or a 3DGS .ply, in the
    frame of this dataset's dataparser."""
    instruction: str = ""
    """The edit ``ns-train rl3dedit-ext`` runs, e.g. "make the mushroom red striped" (the viewer can run more)."""
    edit: SinglePassConfig = field(default_factory=SinglePassConfig)
    """Views, 2D editor (flux-kontext or procedural) and refit."""
    show_edit: bool = True
    """Render the edited scene as ``rgb`` (the viewer's before/after toggle)."""
    num_downscales: int = 0
    """Full resolution from the first step (the scene is already trained)."""
    background_color: str = "white"
    """Background of the renders the editor sees and of the refit (gs-synth scenes are white)."""


class EditRecord:
    """One edit of the session: the scene after it and what made it."""

    def __init__(self, scene: GaussianScene, instruction: str, provider: str, views: List[int]) -> None:
        self.scene, self.instruction, self.provider, self.views = scene, instruction, provider, views

    def info(self) -> Dict[str, Any]:
        return {"instruction": self.instruction, "provider": self.provider, "views": self.views}


class RL3DEditModel(FeatureSplatfactoModel):
    config: RL3DEditModelConfig
    frozen_params = GEOMETRY_KEYS
    train_views: Optional[EditViews] = None
    """The training cameras (the pipeline sets them)."""
    _scene_problem: Optional[str] = None

    # ------------------------------------------------------------------ set-up

    def populate_modules(self) -> None:
        self._scene, self._scene_problem = load_trained_scene(self.config.scene)
        if self._scene is not None:
            self.config.sh_degree = self._scene.sh_degree
        super().populate_modules()
        for key in GEOMETRY_KEYS:
            self.register_buffer(f"edited_{key}", torch.zeros(0))
        self.register_buffer("edit_info", torch.zeros(0, dtype=torch.uint8))
        self.history: List[EditRecord] = []
        self.edit_panel = EditPanel(
            self.edit_actions(), name="Scene editing", export_path="exports/rl3dedit.ply",
            prompt_hint='The edit, e.g. "make it look like bronze" (procedural editor: colour words)',
        )  # fmt: skip

    def init_gaussian_params(self, points: Tensor, colors: Optional[Tensor], generator: torch.Generator):
        params = scene_params(self._scene, self.config.sh_degree)
        self._scene = None  # the parameters hold it now
        return params

    def make_strategy(self) -> FrozenStrategy:
        return FrozenStrategy()

    def active_sh_degree(self) -> int:
        return self.config.sh_degree

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        result = super().load_state_dict(state_dict, **kwargs)
        self.config.sh_degree = round(math.sqrt(self.gauss_params["features_rest"].shape[1] + 1)) - 1
        edited, records = self.stored_edit(), self.edit_records()
        self.history = [] if edited is None or not records else [EditRecord(edited, **records[-1])]
        return result

    def get_training_callbacks(self, training_callback_attributes) -> List:
        """None: splatfacto's strategy callbacks follow its own renders, and training here is the pipeline's refit."""
        return []

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        """Nothing for nerfstudio's optimizers: the original scene stays frozen and the refit owns its Adam."""
        if self._scene_problem is not None and self.num_points == 0:
            raise ValueError(
                f"rl3dedit-ext edits a trained scene, but {self._scene_problem}: train one first (e.g. ns-train "
                "gsstudio-splatfacto --data DATA), then pass it with --pipeline.model.scene outputs/.../config.yml "
                "(or a step-*.ckpt, or a 3DGS .ply in this dataparser's frame)"
            )
        return {}

    # ------------------------------------------------------------------ scenes

    def original_scene(self) -> GaussianScene:
        return scene_of_params(self.gauss_params)

    def stored_edit(self) -> Optional[GaussianScene]:
        """The edited scene held in the buffers (None without an edit)."""
        if self.edited_means.numel() == 0:
            return None
        return GaussianScene.from_splatfacto_params({k: getattr(self, f"edited_{k}") for k in GEOMETRY_KEYS})

    def current_scene(self) -> GaussianScene:
        """The scene the next edit starts from: the latest edit, else the original."""
        return self.history[-1].scene if self.history else self.original_scene().detach()

    def edit_records(self) -> List[Dict[str, Any]]:
        """instruction / provider / views of every edit in the history (oldest first)."""
        return json.loads(bytes(self.edit_info.tolist()).decode()) if self.edit_info.numel() else []

    def show(self, scene: Optional[GaussianScene]) -> None:
        """Put ``scene`` (None: no edit) into the ``edited_*`` buffers, which renders and checkpoints read."""
        params = {} if scene is None else scene.to_splatfacto_params(include_extras=False)
        for key in GEOMETRY_KEYS:
            value = params.get(key, torch.zeros(0))
            setattr(self, f"edited_{key}", value.detach().to(self.device))
        info = [record.info() for record in self.history]
        self.edit_info = torch.tensor(list(json.dumps(info).encode()) if info else [], dtype=torch.uint8)

    # ------------------------------------------------------------------ edits

    def single_pass(self) -> SinglePassEdit:
        """A single-pass edit of the current scene over the training cameras."""
        if self.train_views is None:
            raise RuntimeError("the training cameras are not known yet (the pipeline sets train_views)")
        background = self._get_background_color().to(self.device)
        return SinglePassEdit(self.config.edit, self.current_scene().to(self.device), self.train_views, background)

    def record(self, scene: GaussianScene, instruction: str, provider: str, views: Tensor) -> EditRecord:
        """Push a finished edit onto the history and show it."""
        record = EditRecord(scene.detach(), instruction, provider, [int(v) for v in views])
        self.history.append(record)
        self.show(record.scene)
        return record

    def edit(self, instruction: str, progress: Optional[Progress] = None) -> EditRecord:
        """Edit the current scene with ``instruction`` (select, render, 2D edit, refit)."""
        edit = self.single_pass()
        result = edit.run(instruction, progress)
        return self.record(result.scene, instruction, edit.editor.name, result.view_indices)

    def undo(self) -> bool:
        """Drop the last edit; False when there is none."""
        if not self.history:
            return False
        self.history.pop()
        self.show(self.history[-1].scene if self.history else None)
        return True

    # ------------------------------------------------------------------ rendering

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        raise RuntimeError("rl3dedit-ext trains through its pipeline (the refit owns the loss)")

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        return {}

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """``rgb`` (the edit, or the original with show_edit off), ``original_rgb``, ``edited_rgb``, depth, alpha."""
        if self.training or not isinstance(camera, Cameras):
            return super().get_outputs(camera)
        view = self._view(camera)
        background = self._get_background_color().to(self.device)
        edited = self.stored_edit()

        def render(scene: GaussianScene):
            return render_scene(
                scene.to(self.device), view.viewmat, view.K, view.width, view.height, None, background,
                self.config.rasterizer_backend, depth=True,
            )  # fmt: skip

        original = render(self.original_scene())
        after = original if edited is None else render(edited)
        shown = after if self.config.show_edit else original
        alpha = shown.alpha[0]
        return {
            "rgb": shown.rgb[0],
            "accumulation": alpha,
            "depth": torch.where(alpha > 0, shown.depth[0], shown.depth[0].max()),
            "background": background.expand(view.height, view.width, 3),
            "original_rgb": original.rgb[0],
            "edited_rgb": after.rgb[0],
        }

    # ------------------------------------------------------------------ viewer and export

    def edit_actions(self) -> EditActions:
        """The edit panel's actions (the edit runs in the panel's worker thread)."""

        def edit(part: str, prompt: str, progress) -> str:
            return self.edit(prompt, progress).provider

        def show(on: bool) -> None:
            self.config.show_edit = on

        return EditActions(edit=edit, undo=self.undo, set_show_edit=show, export=self.export_edited_ply)

    def export_edited_ply(self, path: Path) -> int:
        """Write the edited scene (the original without an edit) as a 3DGS .ply, atomically; returns its count."""
        edited = self.stored_edit()
        scene = (self.original_scene() if edited is None else edited).detach().to("cpu")
        instructions = "; ".join(r["instruction"] for r in self.edit_records()) or "none"
        write_ply(Path(path), scene, comments=[f"rl3dedit-ext edits: {instructions}"])
        return scene.num_gaussians
