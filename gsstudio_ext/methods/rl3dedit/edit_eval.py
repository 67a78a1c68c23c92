"""ns-eval metrics of rl3dedit-ext on the eval views (spec §3.8): the photometric consistency loss (Ph-Loss) of the
edited renders and of the original ones, and CLIP directional similarity between the original and edited renders.

Ph-Loss warps adjacent eval views (ordered around the scene) with the edited scene's own rendered depth and the known
cameras, so no VGGT is needed and there is no scale to align [I: the paper uses VGGT depth of the edited images].
VIEScore needs an external multimodal judge (GPT-4.1) and is left to the user: the report's before/after grid is what
it would be shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.eval.part_editing import clip_directional_similarity
from gsstudio_ext.methods.rl3dedit.geometry import DEFAULT_TAU, photometric_consistency
from gsstudio_ext.methods.rl3dedit.refit import changed_pixels
from gsstudio_ext.methods.rl3dedit.views import select_views
from gsstudio_ext.methods.romap.local_edit import EditViews
from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.image_text import ImageTextEncoderConfig, OpenCLIPImageTextConfig


def _clip_l14() -> OpenCLIPImageTextConfig:
    """CLIP ViT-L/14 (OpenAI weights), the CLIP-dir backbone of the 3D-editing literature."""
    return OpenCLIPImageTextConfig(model_name="ViT-L-14", pretrained="openai")


@dataclass
class RL3DEditEvalConfig:
    """Which edit metrics ns-eval computes."""

    clip: Optional[ImageTextEncoderConfig] = field(default_factory=_clip_l14)
    """CLIP for CLIP-dir; None skips it. Missing weights skip it with a warning."""
    source_caption: str = "a photo of a scene"
    """t_src, a description of the original scene (CLIP-dir's t_edit is the instruction itself [P])."""
    max_views: int = 9
    """At most this many eval views (evenly spread, then ordered so that neighbours are adjacent)."""
    tau: float = DEFAULT_TAU
    """Relative depth agreement of a valid warp in Ph-Loss [I: 5 %]."""


class EditEvalResult(NamedTuple):
    metrics: Dict[str, float]
    before: Optional[Tensor]
    """Float[V, 3, H, W] original renders (None without an edit)."""
    after: Optional[Tensor]
    changed: Optional[Tensor]
    """Bool[V, H, W] pixels the edit changed."""
    provider: str
    instruction: str


class _Renders(NamedTuple):
    images: Tensor
    depths: Tensor


@torch.no_grad()
def _render(scene: GaussianScene, views: EditViews, background: Tensor) -> _Renders:
    out = render_scene(scene, views.viewmats, views.Ks, views.width, views.height, background=background, depth=True)
    alpha = out.alpha[..., 0]
    depth = torch.where(alpha > 0.5, out.depth[..., 0], torch.zeros_like(alpha))  # no depth on the background
    return _Renders(out.rgb.permute(0, 3, 1, 2).contiguous(), depth)


def _ph_loss(renders: _Renders, views: EditViews, tau: float) -> float:
    return float(photometric_consistency(renders.images, renders.depths, views.viewmats, views.Ks, tau))


def evaluate_edit(model, datamanager, config: RL3DEditEvalConfig) -> EditEvalResult:
    """Edit metrics of ``model`` (an RL3DEditModel) on the datamanager's eval views."""
    from gsstudio_ext.methods.romap.pipeline import views_of

    dataset = datamanager.eval_dataset
    count = len(dataset)
    picks = torch.linspace(0, count - 1, min(count, config.max_views)).round().long().unique()
    views = views_of(dataset.cameras[picks])
    order = select_views(views.viewmats, len(picks))
    device = model.device
    views = EditViews(views.viewmats[order].to(device), views.Ks[order].to(device), views.width, views.height)
    edited = model.stored_edit()
    records = model.edit_records()
    if edited is None or not records:
        return EditEvalResult({}, None, None, None, "", "")
    last = records[-1]
    background = model.background_color.to(model.device)
    before = _render(model.original_scene().to(model.device), views, background)
    after = _render(edited.to(model.device), views, background)
    metrics: Dict[str, float] = {}
    if len(picks) > 1:
        metrics["ph_loss"] = _ph_loss(after, views, config.tau)
        metrics["ph_loss_original"] = _ph_loss(before, views, config.tau)
    changed = changed_pixels(after.images, before.images)
    metrics["changed_pixels"] = float(changed.float().mean())
    if config.clip is not None:
        try:
            encoder = config.clip.setup(device=model.device)
            metrics["clip_directional"] = clip_directional_similarity(
                encoder, before.images, after.images, config.source_caption, last["instruction"]
            )
        except MissingWeightsError as err:
            CONSOLE.print(f"[yellow]rl3dedit-ext: CLIP-dir skipped: {str(err).splitlines()[0]}")
    return EditEvalResult(metrics, before.images, after.images, changed, last["provider"], last["instruction"])
