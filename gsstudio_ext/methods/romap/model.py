"""romap-ext: RoMaP part segmentation and part editing of a trained Gaussian scene.

Training (``ns-train romap-ext``) fits the 3D-GALP label field of the frozen scene: each step renders the label
colours in the RGB pass and matches the view's 2D part target. Edits then change only the Gaussians of one part;
the model keeps the original scene in ``gauss_params`` and the edited one in ``edited_*`` buffers, so a checkpoint
carries both (``rgb`` vs ``edited_rgb``) and the before/after toggle and undo need no re-training. Undo steps back
through the edits of a session; a reloaded run keeps only its latest edited state, so there undo returns to the
original scene.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.ply import write_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.methods.base.frozen_strategy import FrozenStrategy
from gsstudio_ext.methods.base.model import FeatureSplatfactoModel, FeatureSplatfactoModelConfig, View
from gsstudio_ext.methods.base.trained_scene import GEOMETRY_KEYS, load_trained_scene, scene_of_params, scene_params
from gsstudio_ext.methods.romap.galp import NeighbourTerm, OutlierViews, seg_loss
from gsstudio_ext.methods.romap.labels import assign_parts_3d, init_label_sh, label_colors, part_prototypes
from gsstudio_ext.methods.romap.local_edit import EditViews
from gsstudio_ext.methods.romap.part_editor import EditRecord, PartEditor, PartEditorConfig
from gsstudio_ext.viewer.edit_panel import EditActions, EditPanel

LABEL_KEYS = ("part_labels_dc", "part_labels_rest")
EDIT_KEYS = (*GEOMETRY_KEYS, "part_labels")
"""Suffixes of the ``edited_*`` buffers: the edited scene and its label field."""


@dataclass
class RoMaPModelConfig(FeatureSplatfactoModelConfig):
    """RoMaP on a trained scene; the part list, prompts and providers are in ``editor``."""

    _target: Type = field(default_factory=lambda: RoMaPModel)
    scene: Optional[Path] = None
    """The trained scene: a splatfacto / gsstudio run (config.yml, folder or step-*.ckpt) or a 3DGS .ply, in the
    frame of this dataset's dataparser. Its Gaussians are never trained by romap-ext; only edits change them."""
    editor: PartEditorConfig = field(default_factory=PartEditorConfig)
    """Parts, prompts, part-map and edit providers, label fitting and edit optimisation."""
    show_edit: bool = True
    """Render the edited scene as ``rgb`` (the viewer's before/after toggle); ``edited_rgb`` is always the edit."""
    part_overlay: float = 0.6
    """Opacity of the part colours over ``rgb`` when the viewer's "Colour parts" is on."""
    shown_part: str = ""
    """Part whose 2D mask the ``part_mask`` output shows (empty: every part)."""
    num_downscales: int = 0
    """Full resolution from the first step (the scene is already trained)."""
    background_color: str = "white"
    """Background of renders and label targets (gs-synth scenes are white)."""


class RoMaPModel(FeatureSplatfactoModel):
    config: RoMaPModelConfig
    frozen_params = GEOMETRY_KEYS
    train_views: Optional[EditViews] = None
    """The training cameras as the editor takes them (the pipeline sets them)."""
    dataset: Optional[Path] = None
    stems: Optional[List[str]] = None
    _editor: Optional[PartEditor] = None
    _neighbours: Optional[NeighbourTerm] = None
    _outlier_views: Optional[OutlierViews] = None
    _scene_problem: Optional[str] = None

    # ------------------------------------------------------------------ set-up

    def populate_modules(self) -> None:
        self._scene, self._scene_problem = load_trained_scene(self.config.scene)
        if self._scene is not None:
            self.config.sh_degree = self._scene.sh_degree
        super().populate_modules()
        for key in EDIT_KEYS:
            self.register_buffer(f"edited_{key}", torch.zeros(0))
        self.register_buffer("edit_info", torch.zeros(0, dtype=torch.uint8))
        self.part_targets = None  # set by the pipeline: PartTargetSource over the training views
        self.colour_parts = False
        editor = self.config.editor
        self.edit_panel = EditPanel(self.edit_actions(), editor.parts, editor.base_prompt)

    def init_gaussian_params(self, points: Tensor, colors: Optional[Tensor], generator: torch.Generator):
        params = scene_params(self._scene, self.config.sh_degree)
        self._scene = None  # the parameters hold it now
        galp = self.config.editor.galp
        labels = init_label_sh(params["means"].shape[0], galp.sh_degree, galp.init_color)
        params["part_labels_dc"], params["part_labels_rest"] = labels[:, :1], labels[:, 1:]
        return params

    def make_strategy(self) -> FrozenStrategy:
        return FrozenStrategy()

    def active_sh_degree(self) -> int:
        return self.config.sh_degree

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        result = super().load_state_dict(state_dict, **kwargs)
        self.config.sh_degree = round(math.sqrt(self.gauss_params["features_rest"].shape[1] + 1)) - 1
        self._editor = None  # rebuilt from the loaded tensors
        return result

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        """The label field only (the scene stays frozen)."""
        if self._scene_problem is not None and self.num_points == 0:
            raise ValueError(
                f"romap-ext edits a trained scene, but {self._scene_problem}: train one first (e.g. ns-train "
                "gsstudio-splatfacto --data DATA), then pass it with --pipeline.model.scene outputs/.../config.yml "
                "(or a step-*.ckpt, or a 3DGS .ply in this dataparser's frame)"
            )
        return {key: [self.gauss_params[key]] for key in LABEL_KEYS}

    # ------------------------------------------------------------------ scenes

    @property
    def label_sh(self) -> Tensor:
        """Label SH Float[N, (L+1)^2, 3] of the original scene."""
        return torch.cat([self.gauss_params[k] for k in LABEL_KEYS], dim=1)

    def original_scene(self) -> GaussianScene:
        return scene_of_params(self.gauss_params)

    def edited_scene(self) -> Optional[GaussianScene]:
        """The edited scene (None without an edit)."""
        if self.edited_means.numel() == 0:
            return None
        return GaussianScene.from_splatfacto_params({k: getattr(self, f"edited_{k}") for k in GEOMETRY_KEYS})

    def edit_records(self) -> List[Dict[str, Any]]:
        """part / prompt / provider of every edit in the history (oldest first)."""
        return json.loads(bytes(self.edit_info.tolist()).decode()) if self.edit_info.numel() else []

    def editor(self) -> PartEditor:
        """The :class:`PartEditor` of this scene and its training views (built on first use)."""
        if self._editor is None:
            if self.train_views is None:
                raise RuntimeError("the training cameras are not known yet (the pipeline sets train_views)")
            editor = PartEditor(
                self.config.editor,
                self.original_scene(),
                self.train_views,
                self.background_color.tolist(),
                self.dataset,
                self.stems,
            )
            editor.label_sh = self.label_sh.detach()
            edited = self.edited_scene()
            records = self.edit_records()
            if edited is not None and records:
                last = records[-1]
                labels = self.edited_part_labels
                editor.history.append(EditRecord(edited, labels, last["part"], last["prompt"], last["provider"], []))
            self._editor = editor
        return self._editor

    def sync_from_editor(self) -> None:
        """Copy the editor's label field and edit into the model (so renders and checkpoints show them)."""
        editor = self.editor()
        if editor.label_sh is not None:
            with torch.no_grad():
                for key, value in zip(LABEL_KEYS, (editor.label_sh[:, :1], editor.label_sh[:, 1:])):
                    value = value.to(self.gauss_params[key])
                    if value.shape == self.gauss_params[key].shape:  # in place: the trainer's optimizer keeps it
                        self.gauss_params[key].copy_(value)
                    else:
                        self.gauss_params[key] = Parameter(value.clone(), requires_grad=True)
        if editor.history:
            record = editor.history[-1]
            params = record.scene.to_splatfacto_params(include_extras=False)
            for key in GEOMETRY_KEYS:
                setattr(self, f"edited_{key}", params[key].detach().to(self.device).clone())
            self.edited_part_labels = record.label_sh.detach().to(self.device).clone()
            info = [{"part": r.part, "prompt": r.prompt, "provider": r.provider} for r in editor.history]
        else:
            for key in EDIT_KEYS:
                setattr(self, f"edited_{key}", torch.zeros(0, device=self.device))
            info = []
        self.edit_info = torch.tensor(list(json.dumps(info).encode()) if info else [], dtype=torch.uint8)

    # ------------------------------------------------------------------ training: the label field

    def feature_channels(self, crop_ids: Optional[Tensor], view: View) -> "OrderedDict[str, Tensor]":
        """Training renders the label colours of the view in the RGB pass."""
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        labels = self.label_sh if crop_ids is None else self.label_sh[crop_ids]
        means = self.means if crop_ids is None else self.means[crop_ids]
        out["parts"] = label_colors(means, labels, view.viewmat, self._label_degree())[0]
        return out

    def _label_degree(self) -> int:
        return round(math.sqrt(self.gauss_params["part_labels_rest"].shape[1] + 1)) - 1

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        """L_seg (label render vs the view's part target) + the anchor neighbour term of 3D-GALP."""
        if self.part_targets is None:
            raise RuntimeError("romap-ext needs part targets (the pipeline builds them from --pipeline.model.editor)")
        view = int(batch["image_idx"])
        target = self.part_targets.targets(view).to(self.device).permute(1, 2, 0)
        galp = self.config.editor.galp
        if self._neighbours is None or self._outlier_views is None:
            assert self.train_views is not None
            self._outlier_views = OutlierViews(self.train_views.viewmats.shape[0], galp.outlier_factor)
            prototypes = part_prototypes(len(self.config.editor.parts), device=self.device)
            self._neighbours = NeighbourTerm(self.means.detach(), self.train_views.viewmats, prototypes, galp)
        losses = {"part_seg": self._outlier_views(view, seg_loss(outputs["parts"], target, galp))}
        neighbour = self._neighbours(self.label_sh, self.step)
        if neighbour is not None:
            losses["part_neighbours"] = neighbour
        return losses

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        return {}

    # ------------------------------------------------------------------ rendering

    def shown_scene(self) -> Tuple[GaussianScene, Tensor, bool]:
        """(scene, its label SH, is_edited) that ``rgb`` shows."""
        edited = self.edited_scene()
        if edited is not None and self.config.show_edit:
            return edited, self.edited_part_labels, True
        return self.original_scene(), self.label_sh, False

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        if self.training or not isinstance(camera, Cameras):
            return super().get_outputs(camera)
        view = self._view(camera)
        scene, labels, is_edited = self.shown_scene()
        scene = scene.to(self.device)
        labels = labels.to(self.device)
        features = torch.cat(
            [
                label_colors(scene.means, labels, view.viewmat, self._label_degree())[0],
                self._part_mask(scene, labels, view.viewmat),
            ],
            dim=-1,
        )
        background = self._get_background_color().to(self.device)
        out = render_scene(
            scene, view.viewmat, view.K, view.width, view.height, features, background,
            self.config.rasterizer_backend, depth=True,
        )  # fmt: skip
        alpha = out.alpha[0]
        rgb = out.rgb[0]
        parts, mask = out.features[0, ..., :3].clamp(0.0, 1.0), out.features[0, ..., 3:4].clamp(0.0, 1.0)
        if self.colour_parts:
            weight = self.config.part_overlay * mask
            rgb = rgb * (1.0 - weight) + parts * weight
        outputs: Dict[str, Union[Tensor, List]] = {
            "rgb": rgb,
            "accumulation": alpha,
            "depth": torch.where(alpha > 0, out.depth[0], out.depth[0].max()),
            "background": background.expand(view.height, view.width, 3),
            "parts": parts,
            "part_mask": mask,
        }
        edited = self.edited_scene()
        if is_edited or edited is None:
            outputs["edited_rgb"] = out.rgb[0]
        else:
            outputs["edited_rgb"] = render_scene(
                edited.to(self.device), view.viewmat, view.K, view.width, view.height, None, background,
                self.config.rasterizer_backend,
            ).rgb[0]  # fmt: skip
        return outputs

    def part_ids_of(self, means: Tensor, labels: Tensor, fallback: Optional[Tensor] = None) -> Tensor:
        """M3D part ids Long[N] (0 = none) of a label field, as the editor sees it: label colours from its reference
        view (``fallback`` viewmat [1, 4, 4], else the identity, until the pipeline gives the cameras)."""
        if self.train_views is not None:
            ref = self.config.editor.reference_view % self.train_views.viewmats.shape[0]
            viewmat = self.train_views.viewmats[ref : ref + 1]
        else:
            viewmat = fallback if fallback is not None else torch.eye(4)[None]
        viewmat = viewmat.to(means.device)
        prototypes = part_prototypes(len(self.config.editor.parts), device=means.device)
        return assign_parts_3d(
            label_colors(means, labels.to(means.device), viewmat, self._label_degree())[0], prototypes
        )

    def _part_mask(self, scene: GaussianScene, labels: Tensor, viewmat: Tensor) -> Tensor:
        """Float[N, 1]: 1 on the Gaussians of ``config.shown_part`` (every part when empty)."""
        ids = self.part_ids_of(scene.means, labels, viewmat)
        names = list(self.config.editor.parts)
        if self.config.shown_part in names:
            return (ids == names.index(self.config.shown_part) + 1).float()[:, None]
        return (ids > 0).float()[:, None]

    def part_names(self) -> Sequence[str]:
        return list(self.config.editor.parts)

    def original_part_ids(self) -> Tensor:
        """M3D part ids Long[N] of the original scene."""
        return self.part_ids_of(self.means, self.label_sh)

    # ------------------------------------------------------------------ actions (viewer, CLI, end of training)

    def segment(self, parts: Sequence[str], base_prompt: Optional[str] = None, progress=None) -> List[str]:
        """Fit the label field for a new part list (3D-GALP on the current scene); returns the part names."""
        editor = self.editor()
        editor.set_parts(parts, base_prompt)
        editor.segment(progress)
        self.sync_from_editor()
        return editor.part_names

    def edit(self, part: str, prompt: str, progress=None) -> EditRecord:
        """Edit ``part`` toward ``prompt``; renders, checkpoints and exports then show the edit."""
        editor = self.editor()
        if not editor.history:
            editor.label_sh = self.label_sh.detach()  # training may have moved the label field since
        record = editor.edit(part, prompt, progress)
        self.sync_from_editor()
        return record

    # ------------------------------------------------------------------ viewer

    def edit_actions(self) -> EditActions:
        """The edit panel's actions on this model (segment and edit run in the panel's worker thread)."""

        def segment(parts: Sequence[str], base_prompt: str, progress) -> Sequence[str]:
            return self.segment(parts, base_prompt or None, progress)

        def edit(part: str, prompt: str, progress) -> str:
            return self.edit(part, prompt, progress).provider

        def undo() -> bool:
            done = self.editor().undo()
            self.sync_from_editor()
            return done

        def show(on: bool) -> None:
            self.config.show_edit = on

        def colour(on: bool) -> None:
            self.colour_parts = on

        return EditActions(
            segment=segment,
            edit=edit,
            undo=undo,
            set_show_edit=show,
            set_colour_parts=colour,
            export=self.export_edited_ply,
            part_names=lambda: list(self.config.editor.parts),
        )

    def export_edited_ply(self, path: Path) -> int:
        """Write the edited scene (the original without an edit) with a ``part_id`` column as a 3DGS .ply,
        atomically; returns the Gaussian count."""
        edited = self.edited_scene()
        scene, labels = (
            (edited, self.edited_part_labels) if edited is not None else (self.original_scene(), self.label_sh)
        )
        scene = scene.to("cpu")
        scene.extras["part_id"] = self.part_ids_of(scene.means, labels).int()
        parts = ", ".join(f"{i + 1}={name}" for i, name in enumerate(self.config.editor.parts))
        write_ply(path, scene, comments=[f"part_id: 0=none, {parts}"])
        return scene.num_gaussians
