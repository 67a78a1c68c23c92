"""RoMaP on a Gaussian scene, without nerfstudio: segment parts (Stage A), then edit one part (Stages B-D), with an
undo history. The nerfstudio model, the viewer panel and ``gs-romap-edit`` all drive this one object.

Edit targets come from a provider: "procedural" (offline recolouring of every view: the L1 anchor covers all
training views, no SDS) or "slamp" (SD3: SLaMP edits of ``anchor_views`` views anchor the L1 term, and the masked
rectified-flow SDS guides every view). Each record names the provider that made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.core.sh import camera_centers
from gsstudio_ext.methods.romap.diffusion_sources import (
    AttentionPartTargets,
    AttentionPartTargetsConfig,
    SLaMPTarget,
    SLaMPTargetConfig,
    to_diffusion_size,
)
from gsstudio_ext.methods.romap.edit_targets import ProceduralEdit, ProceduralEditConfig, unproject_depth
from gsstudio_ext.methods.romap.galp import GALPConfig, fit_part_labels
from gsstudio_ext.methods.romap.labels import (
    assign_parts_3d,
    label_colors,
    labels_to_sh,
    part_prototypes,
)
from gsstudio_ext.methods.romap.local_edit import EditViews, PartEditConfig, remove_prior, run_part_edit
from gsstudio_ext.methods.romap.part_attention import PartAttentionConfig
from gsstudio_ext.methods.romap.part_targets import PartTargetSource, SidecarPartTargetsConfig
from gsstudio_ext.methods.romap.rfds import RFDSConfig, rfds_loss, view_prompt
from gsstudio_ext.models.rectified_flow import RectifiedFlowConfig, RectifiedFlowModel, SD3Config

Progress = Callable[[int, int, float], None]
"""progress(step, total, loss)."""


def parse_parts(parts: Sequence[str]) -> Tuple[Tuple[str, ...], ...]:
    """("legs", "pump+head") -> (("legs",), ("pump", "head")): one word list per part."""
    out = tuple(tuple(w.strip() for w in p.split("+") if w.strip()) for p in parts)
    if not out or any(not words for words in out):
        raise ValueError(f"name at least one part, words of one part joined by '+': got {list(parts)}")
    return out


@dataclass
class PartEditorConfig:
    """What to segment and how to edit. [I] marks our choices where RoMaP publishes none."""

    parts: Tuple[str, ...] = ()
    """Part names, smaller parts first (assignment is exclusive in this order); words of one part joined by '+'."""
    base_prompt: str = "a photo of an object"
    """Describes the object; the segmentation prompt appends " with <part> and <part>"."""
    temperatures: Tuple[float, ...] = ()
    """Attention softmax temperature per part (empty: 0.2 each; larger for large parts)."""
    part_source: Literal["attention", "sidecar"] = "attention"
    """2D part maps: SD3 attention on renders, or the dataset's part sidecars (ground truth, e.g. gs-synth)."""
    sidecar_object: Optional[str] = None
    """Sidecar source: only parts of the object with this name (scene.json); None = every object's."""
    sidecar_noise: bool = False
    """Sidecar source: apply the noise model (boundary erosion/dilation, label flips) for robustness studies."""
    diffusion: RectifiedFlowConfig = field(default_factory=SD3Config)
    """SD3 model for the attention maps, SLaMP and the SDS guidance (loaded only when one of them is used)."""
    attention: PartAttentionConfig = field(default_factory=PartAttentionConfig)
    """Attention read-out."""
    diffusion_size: int = 512
    """Side of the square image SD3 sees for the attention maps and SLaMP (RoMaP: 512)."""
    galp: GALPConfig = field(default_factory=GALPConfig)
    """Label-field fitting (Stage A)."""
    edit_target: Literal["procedural", "slamp"] = "procedural"
    """2D edit provider: offline procedural recolouring, or SLaMP with SD3."""
    procedural: ProceduralEditConfig = field(default_factory=ProceduralEditConfig)
    """Procedural provider settings."""
    slamp: SLaMPTargetConfig = field(default_factory=SLaMPTargetConfig)
    """SLaMP provider settings."""
    anchor_views: int = 1
    """SLaMP: views edited in 2D to anchor the L1 term ([I] the code prepares two, uses one)."""
    use_sds: bool = True
    """SLaMP: add the masked rectified-flow SDS term on every view (off: L1 to the anchors only)."""
    rfds: RFDSConfig = field(default_factory=RFDSConfig)
    """SDS settings."""
    edit: PartEditConfig = field(default_factory=PartEditConfig)
    """Masked optimisation (Stage D); its background is replaced by the editor's."""
    reference_view: int = 0
    """View whose label colours define M3D (the code: view 0)."""


class EditRecord(NamedTuple):
    scene: GaussianScene
    """The scene after this edit."""
    label_sh: Tensor
    """The label field of ``scene`` (rows follow the scene)."""
    part: str
    prompt: str
    provider: str
    """Which 2D edit provider made the targets ("procedural" or "slamp")."""
    losses: List[float]


class PartEditor:
    """Holds the original scene, its training cameras, the label field and the edit history."""

    def __init__(
        self,
        config: PartEditorConfig,
        scene: GaussianScene,
        views: EditViews,
        background: Sequence[float] = (0.0, 0.0, 0.0),
        dataset: Optional[Path] = None,
        stems: Optional[Sequence[str]] = None,
        diffusion: Optional[RectifiedFlowModel] = None,
    ) -> None:
        self.config = config
        self.original = scene.detach()
        self.views = EditViews(*views)
        self.background = torch.tensor(list(background), dtype=torch.float32, device=scene.device)
        self.dataset, self.stems = dataset, None if stems is None else list(stems)
        self._diffusion = diffusion
        self.label_sh: Optional[Tensor] = None
        self.history: List[EditRecord] = []

    # ------------------------------------------------------------------ state

    @property
    def seg_list(self) -> Tuple[Tuple[str, ...], ...]:
        return parse_parts(self.config.parts)

    @property
    def part_names(self) -> List[str]:
        return ["+".join(words) for words in self.seg_list]

    @property
    def prototypes(self) -> Tensor:
        return part_prototypes(len(self.config.parts), device=self.original.device)

    @property
    def scene(self) -> GaussianScene:
        """The current scene: the last edit's, else the original."""
        return self.history[-1].scene if self.history else self.original

    @property
    def labels(self) -> Optional[Tensor]:
        """Label SH of :attr:`scene` (None before :meth:`segment`)."""
        return self.history[-1].label_sh if self.history else self.label_sh

    def diffusion(self) -> RectifiedFlowModel:
        if self._diffusion is None:
            self._diffusion = self.config.diffusion.setup(device=self.original.device)
        return self._diffusion

    def set_parts(self, parts: Sequence[str], base_prompt: Optional[str] = None) -> None:
        """New part list (and base prompt); clears the label field (edits stay)."""
        parse_parts(parts)
        self.config.parts = tuple(parts)
        if base_prompt is not None:
            self.config.base_prompt = base_prompt
        self.label_sh = None

    # ------------------------------------------------------------------ Stage A

    def part_targets(self) -> PartTargetSource:
        c = self.config
        if c.part_source == "sidecar":
            if self.dataset is None:
                raise ValueError("part_source 'sidecar' needs the dataset folder (sidecars/parts)")
            return SidecarPartTargetsConfig(
                seg_list=self.seg_list,
                dataset=Path(self.dataset),
                stems=None if self.stems is None else tuple(self.stems),
                object_name=c.sidecar_object,
                size=(self.views.height, self.views.width),
                noise=c.sidecar_noise,
            ).setup()
        source = AttentionPartTargetsConfig(
            seg_list=self.seg_list,
            base_prompt=c.base_prompt,
            temperatures=c.temperatures,
            attention=c.attention,
            size=c.diffusion_size,
        )
        return AttentionPartTargets(source, self.diffusion(), self._render_rgb, self.views.viewmats.shape[0])

    def segment(self, progress: Optional[Progress] = None) -> Tensor:
        """Fit the label field of the current scene's Gaussians; returns its part ids Long[N]."""
        scene = self.scene
        v = self.views
        labels = fit_part_labels(
            scene, v.viewmats, v.Ks, v.width, v.height, self.part_targets(), self.config.galp, progress
        )
        if self.history:
            self.history[-1] = self.history[-1]._replace(label_sh=labels)
        else:
            self.label_sh = labels
        return self.part_ids()

    def part_ids(self) -> Tensor:
        """M3D as part ids Long[N] of the current scene (0 = none), from the reference view's label colours."""
        if self.labels is None:
            raise RuntimeError("no label field yet: segment the parts first")
        ref = self.config.reference_view % self.views.viewmats.shape[0]
        colors = label_colors(self.scene.means, self.labels, self.views.viewmats[ref : ref + 1], self._degree())[0]
        return assign_parts_3d(colors, self.prototypes)

    def part_index(self, part: str) -> int:
        """1-based index of ``part`` in the part list."""
        names = self.part_names
        if part not in names:
            raise ValueError(f"unknown part {part!r}; the parts are {names}")
        return names.index(part) + 1

    def _degree(self) -> int:
        return int(round(math.sqrt(self.labels.shape[1]))) - 1

    # ------------------------------------------------------------------ Stages B-D

    def edit(self, part: str, prompt: str, progress: Optional[Progress] = None) -> EditRecord:
        """Edit ``part`` of the current scene toward ``prompt``; only its Gaussians change. Pushes a record."""
        index = self.part_index(part)
        scene, labels = self.scene, self.labels
        mask3d = self.part_ids() == index
        if not bool(mask3d.any()):
            raise ValueError(f"part {part!r} holds no Gaussian: segment again or change the part words")
        edit_config = replace(self.config.edit, background=tuple(float(b) for b in self.background))
        views = range(self.views.viewmats.shape[0])
        if self.config.edit_target == "procedural":
            provider = ProceduralEdit(self.config.procedural)
            images, positions, masks2d = self._render_views(scene, views, mask3d, positions=True)
            targets = provider.edit_views(images, masks2d, prompt, positions)
            result = run_part_edit(scene, mask3d, self.views, targets, masks2d, edit_config, None, progress)
        else:
            provider = SLaMPTarget(replace(self.config.slamp, size=self.config.diffusion_size), self.diffusion())
            masks2d = self._render_views(scene, views, mask3d)[2]
            result = self._slamp_edit(provider, scene, mask3d, masks2d, prompt, edit_config, progress)
        new_labels = labels.new_zeros(result.scene.num_gaussians, *labels.shape[1:])
        new_labels[~result.mask3d] = labels[~mask3d]
        part_sh = labels_to_sh(torch.full((int(result.mask3d.sum()),), index), self.prototypes, self._degree())
        new_labels[result.mask3d] = part_sh.to(labels)
        record = EditRecord(result.scene, new_labels, part, prompt, provider.name, result.losses)
        self.history.append(record)
        return record

    def undo(self) -> bool:
        """Drop the last edit; False when there is none."""
        if not self.history:
            return False
        self.history.pop()
        return True

    def _slamp_edit(
        self,
        provider: SLaMPTarget,
        scene: GaussianScene,
        mask3d: Tensor,
        masks2d: Tensor,
        prompt: str,
        edit_config: PartEditConfig,
        progress: Optional[Progress],
    ):
        c, v = self.config, self.views
        num = v.viewmats.shape[0]
        anchors = sorted(
            {(c.reference_view + round(i * num / max(c.anchor_views, 1))) % num for i in range(max(c.anchor_views, 1))}
        )
        # only the anchors carry the L1 term: the other views' targets are never read (their L1 mask is empty)
        prior_free = self._render_views(remove_prior(scene, mask3d) if c.edit.remove_prior else scene, anchors)[0]
        targets = torch.zeros(num, 3, v.height, v.width, device=masks2d.device)
        l1_masks = torch.zeros_like(masks2d)
        for image, a in zip(prior_free, anchors):
            targets[a] = provider.edit(image, masks2d[a], prompt, a)
            l1_masks[a] = masks2d[a]
        guidance = None
        if c.use_sds:
            model = provider.model
            azimuths = view_azimuths(v.viewmats, scene.means[mask3d].mean(dim=0), c.reference_view)
            uncond = model.encode_prompt([c.rfds.negative_prompt])
            conds = {i: model.encode_prompt([view_prompt(prompt, float(azimuths[i]), c.rfds)]) for i in range(num)}
            gen = torch.Generator().manual_seed(c.edit.seed)

            def guidance(render: Tensor, index: int) -> Tensor:
                return rfds_loss(
                    model,
                    _square(render, provider),
                    _square_mask(masks2d[index], provider),
                    conds[index],
                    uncond,
                    c.rfds,
                    gen,
                )

        return run_part_edit(scene, mask3d, v, targets, l1_masks, edit_config, guidance, progress)

    # ------------------------------------------------------------------ rendering

    def _render_rgb(self, view: int) -> Tensor:
        """Float[3, H, W] of the current scene at training view ``view``."""
        return self._render_views(self.scene, [view])[0][0]

    def _render_views(
        self, scene: GaussianScene, views: Sequence[int], mask3d: Optional[Tensor] = None, positions: bool = False
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """One pass per view of ``scene``: RGB Float[V, 3, H, W]; with ``positions`` the world points Float[V, H, W,
        3] of the rendered depth; with ``mask3d`` the 2D part masks Bool[V, H, W] (blended share of the part > 0.5,
        as :func:`part_mask2d`)."""
        v = self.views
        features = None if mask3d is None else mask3d[:, None].float()
        images, points, masks = [], [], []
        with torch.no_grad():
            for i in views:
                out = render_scene(
                    scene, v.viewmats[i : i + 1], v.Ks[i : i + 1], v.width, v.height, features, self.background,
                    depth=positions,
                )  # fmt: skip
                images.append(out.rgb[0].permute(2, 0, 1))
                if positions:
                    points.append(unproject_depth(out.depth[0], v.viewmats[i], v.Ks[i]))
                if features is not None:
                    masks.append(out.features[0, ..., 0] > 0.5)
        return (
            torch.stack(images),
            torch.stack(points) if points else None,
            torch.stack(masks) if masks else None,
        )


def _square(render: Tensor, provider: SLaMPTarget) -> Tensor:
    """Float[1, 3, H, W] -> the square size SD3 sees (differentiable)."""
    multiple = provider.model.vae_scale_factor * provider.model.patch_size
    return to_diffusion_size(render[0], provider.config.size, multiple)[None]


def _square_mask(mask: Tensor, provider: SLaMPTarget) -> Tensor:
    return _square(mask[None, None].float().expand(1, 3, -1, -1), provider)[0, 0] > 0.5


def view_azimuths(viewmats: Tensor, centre: Tensor, reference: int = 0) -> Tensor:
    """Azimuth (degrees, [0, 180]) of every camera around ``centre`` relative to camera ``reference``, measured in
    the plane orthogonal to the cameras' mean up direction (OpenCV: up = -y of the camera)."""
    up = -viewmats[:, 1, :3].mean(dim=0)
    up = up / up.norm().clamp_min(1e-9)
    rel = camera_centers(viewmats) - centre
    flat = rel - (rel @ up)[:, None] * up
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    cos = (flat @ flat[reference % flat.shape[0]]).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))
