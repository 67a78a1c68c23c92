"""ns-eval metrics of romap-ext on the eval views: part mIoU against ground-truth part maps (when the dataset has
part sidecars naming the parts), and for an edit: locality, CLIP score and CLIP directional similarity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, NamedTuple, Optional

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.eval.part_editing import clip_directional_similarity, clip_score, locality, part_miou
from gsstudio_ext.methods.romap.labels import (
    part_map_2d,
    part_prototypes,
    render_label_field,
)
from gsstudio_ext.methods.romap.local_edit import EditViews
from gsstudio_ext.methods.romap.part_editor import parse_parts
from gsstudio_ext.methods.romap.part_targets import SidecarPartTargetsConfig
from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.image_text import ImageTextEncoderConfig, OpenCLIPImageTextConfig


def _clip_l14_336() -> OpenCLIPImageTextConfig:
    """RoMaP's CLIP: ViT-L/14 at 336 px (OpenAI weights)."""
    return OpenCLIPImageTextConfig(model_name="ViT-L-14-336", pretrained="openai")


@dataclass
class EditEvalConfig:
    """Which edit metrics ns-eval computes."""

    clip: Optional[ImageTextEncoderConfig] = field(default_factory=_clip_l14_336)
    """CLIP for the CLIP score and CLIPdir; None skips them. Missing weights skip them with a warning."""
    locality_dilation: int = 2
    """Pixels by which the 2D part mask grows before measuring the change outside it."""
    max_views: int = 16
    """At most this many eval views (evenly spread)."""


class EditEvalResult(NamedTuple):
    metrics: Dict[str, float]
    before: Optional[Tensor]
    """Float[V, 3, H, W] original renders (None without an edit)."""
    after: Optional[Tensor]
    masks2d: Optional[Tensor]
    provider: str
    prompt: str


def _render(scene: GaussianScene, views: EditViews, background: Tensor, mask3d: Optional[Tensor] = None):
    """RGB Float[V, 3, H, W] and, with ``mask3d``, the 2D masks Bool[V, H, W] of those Gaussians (one pass)."""
    features = None if mask3d is None else mask3d[:, None].float()
    with torch.no_grad():
        out = render_scene(scene, views.viewmats, views.Ks, views.width, views.height, features, background)
    masks = None if mask3d is None else out.features[..., 0] > 0.5  # as part_mask2d
    return out.rgb.permute(0, 3, 1, 2), masks


def evaluate_edit(model, datamanager, config: EditEvalConfig) -> EditEvalResult:
    """Part and edit metrics of ``model`` (a RoMaPModel) on the datamanager's eval views."""
    from gsstudio_ext.methods.romap.pipeline import views_of

    dataset = datamanager.eval_dataset
    count = len(dataset)
    picks = torch.linspace(0, count - 1, min(count, config.max_views)).round().long().unique().tolist()
    views = views_of(dataset.cameras[torch.tensor(picks)])
    views = EditViews(views.viewmats.to(model.device), views.Ks.to(model.device), views.width, views.height)
    stems = [Path(dataset.image_filenames[i]).stem for i in picks]
    metrics: Dict[str, float] = {}
    original = model.original_scene().to(model.device)
    parts = model.config.editor.parts
    if parts:
        miou = _part_miou(model, original, views, stems)
        if miou is not None:
            metrics["part_miou"] = miou
    edited = model.edited_scene()
    records = model.edit_records()
    if edited is None or not records:
        return EditEvalResult(metrics, None, None, None, "", "")
    last = records[-1]
    background = model.background_color.to(model.device)
    edited_parts = [list(parts).index(r["part"]) + 1 for r in records if r["part"] in parts]
    mask3d = torch.isin(model.original_part_ids(), torch.tensor(edited_parts, device=model.device))
    before, masks2d = _render(original, views, background, mask3d)  # every edit of the history vs the original
    after = _render(edited.to(model.device), views, background)[0]
    metrics["edit_locality"] = locality(before, after, masks2d, config.locality_dilation)
    if config.clip is not None:
        try:
            encoder = config.clip.setup(device=model.device)
            base = model.config.editor.base_prompt
            target = f"{base}, {last['part']} {last['prompt']}"
            metrics["clip_score"] = clip_score(encoder, after, target)
            metrics["clip_directional"] = clip_directional_similarity(encoder, before, after, base, target)
        except MissingWeightsError as err:
            CONSOLE.print(f"[yellow]romap-ext: CLIP metrics skipped: {str(err).splitlines()[0]}")
    return EditEvalResult(metrics, before, after, masks2d, last["provider"], last["prompt"])


def _part_miou(model, scene: GaussianScene, views: EditViews, stems) -> Optional[float]:
    """Part mIoU of the label field against the dataset's part sidecars; None when it has none for these parts."""
    if model.dataset is None or not (Path(model.dataset) / "sidecars" / "parts").is_dir():
        return None
    editor = model.config.editor
    try:
        gt_source = SidecarPartTargetsConfig(
            seg_list=parse_parts(editor.parts), dataset=Path(model.dataset), stems=tuple(stems),
            object_name=editor.sidecar_object, size=(views.height, views.width), noise=False,
        ).setup()  # fmt: skip
    except ValueError:
        return None  # the part words are not part names of the dataset
    labels = model.label_sh.to(model.device)
    with torch.no_grad():
        maps = render_label_field(scene, labels, views.viewmats, views.Ks, views.width, views.height)
    prototypes = part_prototypes(len(editor.parts), device=labels.device)
    pred = part_map_2d(maps, prototypes)
    gt = torch.stack([gt_source.gt_labels(i) for i in range(len(stems))]).to(pred.device)
    return part_miou(pred, gt, len(editor.parts))
