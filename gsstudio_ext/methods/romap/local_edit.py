"""RoMaP local editing (spec §2.4, §2.6): part masks, Gaussian prior removal and the masked edit optimisation.

- :func:`part_mask2d`: M2D of any Gaussian mask, by rendering it as a 0/1 feature channel (M3D / M2D from a 3D-GALP
  label field are in ``methods.romap.labels``).
- :func:`remove_prior`: masked Gaussians become plain mid-grey (SH DC 0 renders 0.5; ``features_rest`` zeroed).
- :func:`run_part_edit`: ``lambda_l1`` x masked L1 to per-view 2D edit targets (+ an optional guidance term such as
  regularized SDS). Only the M3D rows are trainable tensors; each step the full scene is reassembled from the frozen
  outside rows and the trainable inside rows (``torch.cat`` + index), so Gaussians outside M3D are bit-identical
  afterwards by construction: their tensors are never written.
- :func:`masked_gradient_hook`: the same guarantee for code that trains full tensors (zero grad rows outside M3D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.masks import dilate_mask
from gsstudio_ext.core.param_surgery import append_rows, keep_rows
from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.core.sh import RGB2SH, camera_centers, sh_to_view_colors

# Trainable groups: GaussianScene field -> optimiser name (splatfacto's names).
_FIELDS = {
    "means": "means",
    "log_scales": "scales",
    "quats": "quats",
    "opacity_logits": "opacities",
    "sh_dc": "features_dc",
    "sh_rest": "features_rest",
}


class EditViews(NamedTuple):
    """Cameras of the edit: OpenCV world-to-camera viewmats [V, 4, 4], intrinsics Ks [V, 3, 3], image size."""

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int


# ---------------------------------------------------------------------------------------------------------- masks


def part_mask2d(scene: GaussianScene, mask3d: Tensor, views: EditViews, threshold: float = 0.5) -> Tensor:
    """Bool[V, H, W]: pixels whose alpha-blended share of M3D Gaussians exceeds ``threshold`` (one extra channel)."""
    with torch.no_grad():
        out = render_scene(scene, views.viewmats, views.Ks, views.width, views.height, features=mask3d[:, None].float())
    return out.features[..., 0] > threshold


def remove_prior(scene: GaussianScene, mask3d: Tensor) -> GaussianScene:
    """A copy of ``scene`` whose M3D Gaussians render neutral mid-grey: SH DC = RGB2SH(0.5) = 0 (0.5 after gsplat's
    +0.5 offset) and ``features_rest`` zeroed (spec [I]; the code keeps them). Other rows are copied unchanged."""
    mask3d = mask3d.to(scene.device).bool()
    out = scene.clone()
    out.sh_dc[mask3d] = RGB2SH(torch.full_like(out.sh_dc[mask3d], 0.5))
    out.sh_rest[mask3d] = 0.0
    return out


def masked_gradient_hook(mask3d: Tensor) -> Callable[[Tensor], Tensor]:
    """A ``Tensor.register_hook`` function that zeroes the gradient rows of Gaussians outside ``mask3d`` [N].

    With Adam, rows whose gradient is always zero keep zero moments and never move. Rows that got gradients before
    the hook was registered would still drift on their momentum: register it before the first step."""
    keep = mask3d.bool()

    def hook(grad: Tensor) -> Tensor:
        m = keep.to(grad.device).reshape(-1, *([1] * (grad.dim() - 1)))
        return torch.where(m, grad, torch.zeros_like(grad))

    return hook


# ---------------------------------------------------------------------------------------------------------- config


@dataclass
class PartEditConfig:
    """Masked part-edit optimisation (Stage D of RoMaP): L1 to 2D edit targets plus an optional guidance term."""

    steps: int = 300
    """Optimisation steps; the code saves its "fine edit" at step 300 (spec §2.6: 300-500)."""
    lambda_l1: float = 10.0
    """Weight of the masked L1 anchor term (lambda2, unpublished; proposed 10 on [0, 1] RGB)."""
    lambda_sds: float = 1.0
    """Weight of the guidance term (lambda1 = lambda_rfds = 1); used only when a guidance callable is given."""
    mask_dilation: int = 1
    """Pixels by which the 2D part masks are grown for the L1 term (lets the part's edge blend)."""
    means_lr: float = 2.5e-5
    """Position lr, multiplied by the scene extent (RoMaP's override of 3DGS's 1.6e-4)."""
    opacity_lr: float = 0.01
    """Opacity-logit lr."""
    scaling_lr: float = 0.005
    """Log-scale lr."""
    rotation_lr: float = 0.001
    """Quaternion lr."""
    feature_lr: float = 0.0125
    """SH DC lr."""
    feature_rest_lr: float = 0.0125 / 20
    """Higher SH lr (feature_lr / 20)."""
    adam_eps: float = 1e-15
    """Adam epsilon (3DGS)."""
    scene_extent: Optional[float] = None
    """Scene extent for the position lr; None = 1.1 x the largest camera distance from the cameras' mean (3DGS)."""
    remove_prior: bool = True
    """Reset the M3D Gaussians to mid-grey before editing (spec §2.4, Reg. 1)."""
    background: Optional[Tuple[float, float, float]] = None
    """Background colour of the renders (None = black); must match the one the targets were made on."""
    densify: bool = False
    """Clone/split/prune inside M3D during the edit (spec §2.6). The result then lists outside rows first."""
    densify_from: int = 200
    """First step that may densify (the code: after step 200)."""
    densify_until: int = 10_000
    """Densification stops at this step."""
    densify_every: int = 50
    """Steps between densifications (the code: every 50)."""
    densify_grad_threshold: float = 0.0005
    """Mean screen-space position gradient (gsplat's NDC-scaled units) above which a Gaussian is densified [C]."""
    densify_min_opacity: float = 0.005
    """Inside Gaussians below this opacity are pruned at each densification [C]."""
    densify_extent: float = 4.0
    """Camera extent of the clone-vs-split rule: split if max scale > percent_dense x this [C: 4.0]."""
    percent_dense: float = 0.01
    """3DGS's percent_dense."""
    seed: int = 0
    """Seed of the view order and of split sampling."""


class PartEditResult(NamedTuple):
    scene: GaussianScene
    """The edited scene (same row order as the input unless densification ran; then outside rows come first)."""
    losses: List[float]
    """Total loss of every step."""
    steps: int
    """Steps run."""
    mask3d: Tensor
    """Bool[N'] rows of the edited part in ``scene``."""


Guidance = Callable[[Tensor, int], Tensor]
"""guidance(render Float[1, 3, H, W] in [0, 1], view_index) -> scalar loss (e.g. the regularized-SDS term)."""
Progress = Callable[[int, int, float], None]
"""progress(step, total_steps, loss), called after every step."""


def scene_extent_of(viewmats: Tensor) -> float:
    """3DGS's camera extent: 1.1 x the largest distance of a camera centre from the centres' mean."""
    centres = camera_centers(viewmats)
    return float((centres - centres.mean(dim=0)).norm(dim=-1).max()) * 1.1


# ---------------------------------------------------------------------------------------------------------- editing


class _Part:
    """Trainable rows of the edited part (one Adam per tensor, as splatfacto) + the frozen rest of the scene."""

    def __init__(self, scene: GaussianScene, mask3d: Tensor, config: PartEditConfig, extent: float) -> None:
        self.outside = scene.subset(~mask3d).detach()
        inside = scene.subset(mask3d)
        self.params: Dict[str, Parameter] = {f: Parameter(getattr(inside, f).detach().clone()) for f in _FIELDS}
        self.extras = {k: v.detach().clone() for k, v in inside.extras.items()}
        lrs = {
            "means": config.means_lr * extent,
            "log_scales": config.scaling_lr,
            "quats": config.rotation_lr,
            "opacity_logits": config.opacity_lr,
            "sh_dc": config.feature_lr,
            "sh_rest": config.feature_rest_lr,
        }
        self.optimizers = {f: torch.optim.Adam([self.params[f]], lr=lrs[f], eps=config.adam_eps) for f in _FIELDS}
        # cat([outside, inside])[order] restores the input row order (dropped once densification changes rows).
        n = scene.num_gaussians
        idx = torch.arange(n, device=mask3d.device)
        self.order: Optional[Tensor] = torch.argsort(torch.cat([idx[~mask3d], idx[mask3d]]))

    def assemble(self) -> GaussianScene:
        """The full scene: frozen outside rows + trainable inside rows (autograd flows into the inside only)."""
        o = self.outside

        def join(a: Tensor, b: Tensor) -> Tensor:
            full = torch.cat([a, b], dim=0)
            return full if self.order is None else full[self.order]

        return GaussianScene(
            **{f: join(getattr(o, f), self.params[f]) for f in _FIELDS},
            extras={k: join(v, self.extras[k]) for k, v in o.extras.items()},
        )

    def inside_mask(self) -> Tensor:
        """Bool[N'] of the inside rows in :meth:`assemble`'s order."""
        n_out, n_in = self.outside.num_gaussians, self.params["means"].shape[0]
        device = self.outside.device
        flags = torch.cat(
            [torch.zeros(n_out, dtype=torch.bool, device=device), torch.ones(n_in, dtype=torch.bool, device=device)]
        )
        return flags if self.order is None else flags[self.order]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def densify(self, grad2d: Tensor, config: PartEditConfig, gen: torch.Generator) -> None:
        """Clone small / split large inside Gaussians whose mean 2D gradient is high, then prune transparent ones."""
        p, opts = self.params, {f: self.optimizers[f] for f in _FIELDS}
        scales = p["log_scales"].exp()
        big = scales.max(dim=-1).values > config.percent_dense * config.densify_extent
        hot = grad2d > config.densify_grad_threshold
        clone, split = hot & ~big, hot & big
        new = {f: p[f][clone] for f in _FIELDS}
        new_extras = {k: v[clone] for k, v in self.extras.items()}
        if bool(split.any()):  # two samples inside each split Gaussian, scales / 1.6 (3DGS)
            q = F.normalize(p["quats"][split], dim=-1)
            rot = _quat_to_rotmat(q)
            s = scales[split]
            for _ in range(2):
                noise = torch.randn(s.shape, generator=gen, dtype=s.dtype).to(s.device) * s
                rows = {
                    "means": p["means"][split] + (rot @ noise[..., None])[..., 0],
                    "log_scales": torch.log(s / 1.6),
                    "quats": p["quats"][split],
                    "opacity_logits": p["opacity_logits"][split],
                    "sh_dc": p["sh_dc"][split],
                    "sh_rest": p["sh_rest"][split],
                }
                new = {f: torch.cat([new[f], rows[f]]) for f in _FIELDS}
                new_extras = {k: torch.cat([new_extras[k], v[split]]) for k, v in self.extras.items()}
        n_old = p["means"].shape[0]
        append_rows(p, opts, new)
        self.extras = {k: torch.cat([v, new_extras[k]]) for k, v in self.extras.items()}
        keep = torch.ones(p["means"].shape[0], dtype=torch.bool, device=p["means"].device)
        keep[:n_old] = ~split
        keep &= torch.sigmoid(p["opacity_logits"]) >= config.densify_min_opacity
        keep_rows(p, opts, list(_FIELDS), keep)
        self.extras = {k: v[keep] for k, v in self.extras.items()}
        self.order = None


def _quat_to_rotmat(q: Tensor) -> Tensor:
    """Unit wxyz quaternions [M, 4] -> rotation matrices [M, 3, 3]."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)  # fmt: skip


def _render_view(scene: GaussianScene, views: EditViews, v: int, background: Optional[Tensor]) -> Tuple[Tensor, dict]:
    """RGB [H, W, 3] of view ``v`` (differentiable) and the rasterizer meta."""
    viewmat, K = views.viewmats[v : v + 1], views.Ks[v : v + 1]
    colors = sh_to_view_colors(scene.means, scene.colors_sh(), viewmat, scene.sh_degree)
    rgb, alpha, meta = rasterize(
        scene.means, scene.quats, scene.scales(), scene.opacities(), colors, viewmat, K, views.width, views.height
    )
    rgb = rgb[0]
    if background is not None:
        rgb = rgb + (1.0 - alpha[0]) * background
    return rgb, meta


def run_part_edit(
    scene: GaussianScene,
    mask3d: Tensor,
    views: EditViews,
    targets: Tensor,
    masks2d: Tensor,
    config: Optional[PartEditConfig] = None,
    guidance: Optional[Guidance] = None,
    progress: Optional[Progress] = None,
) -> PartEditResult:
    """Edit the M3D part of ``scene`` so that its renders match ``targets`` inside the 2D part masks.

    Args:
        scene: the scene to edit (not modified).
        mask3d: Bool[N] Gaussians of the part (M3D); only these rows change.
        views: V cameras (:class:`EditViews` or a (viewmats, Ks, width, height) tuple).
        targets: Float[V, 3, H, W] in [0, 1]: the 2D edit of each view (e.g. SLaMP or a procedural edit).
        masks2d: Bool[V, H, W] M2D of each view (dilated by ``config.mask_dilation`` for the loss).
        guidance: optional ``guidance(render Float[1, 3, H, W], view_index) -> loss``, weighted by ``lambda_sds``.
        progress: optional ``progress(step, steps, loss)`` called after each step.

    Loss per step, for one view v (a seeded shuffle of the views per epoch):
    ``lambda_l1 * mean over dilated-mask pixels and channels |render_v - target_v| + lambda_sds * guidance``.
    """
    config = config or PartEditConfig()
    views = EditViews(*views)
    device = scene.device
    mask3d = mask3d.to(device).bool()
    num_views = views.viewmats.shape[0]
    if mask3d.shape != (scene.num_gaussians,):
        raise ValueError(f"mask3d must be Bool[{scene.num_gaussians}], got {list(mask3d.shape)}")
    size = f"{views.height}, {views.width}"
    if targets.shape != (num_views, 3, views.height, views.width):
        raise ValueError(f"targets must be [V={num_views}, 3, {size}], got {list(targets.shape)}")
    if masks2d.shape != (num_views, views.height, views.width):
        raise ValueError(f"masks2d must be [V={num_views}, {size}], got {list(masks2d.shape)}")
    if not bool(mask3d.any()):
        raise ValueError("mask3d selects no Gaussian: nothing to edit")
    if config.remove_prior:
        scene = remove_prior(scene, mask3d)
    extent = config.scene_extent if config.scene_extent is not None else scene_extent_of(views.viewmats)
    part = _Part(scene, mask3d, config, extent)
    loss_masks = dilate_mask(masks2d.to(device), config.mask_dilation)
    targets = targets.to(device).permute(0, 2, 3, 1)  # [V, H, W, 3]
    background = torch.tensor(config.background, device=device) if config.background is not None else None
    gen = torch.Generator().manual_seed(config.seed)
    grad_sum = torch.zeros(part.params["means"].shape[0], device=device)
    grad_count = torch.zeros_like(grad_sum)
    losses: List[float] = []
    order: List[int] = []
    for step in range(config.steps):
        if not order:
            order = torch.randperm(num_views, generator=gen).tolist()
        v = order.pop()
        full = part.assemble()
        rgb, meta = _render_view(full, views, v, background)
        m = loss_masks[v]
        loss = rgb.new_zeros(())
        if bool(m.any()):
            loss = loss + config.lambda_l1 * (rgb[m] - targets[v][m]).abs().mean()
        if guidance is not None:
            loss = loss + config.lambda_sds * guidance(rgb.permute(2, 0, 1)[None], v)
        means2d = meta["means2d"]
        if config.densify and means2d.requires_grad:
            means2d.retain_grad()
        if loss.requires_grad:
            loss.backward()
        part.step()
        if config.densify and step < config.densify_until:  # after the step, as 3DGS does
            grad_sum, grad_count = _accumulate(part, meta, views, grad_sum, grad_count)
            if step + 1 >= config.densify_from and (step + 1) % config.densify_every == 0:
                part.densify(grad_sum / grad_count.clamp_min(1), config, gen)
                grad_sum = torch.zeros(part.params["means"].shape[0], device=device)
                grad_count = torch.zeros_like(grad_sum)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, config.steps, losses[-1])
    with torch.no_grad():
        final = part.assemble().detach()
    return PartEditResult(final, losses, config.steps, part.inside_mask())


def _accumulate(
    part: _Part, meta: dict, views: EditViews, grad_sum: Tensor, grad_count: Tensor
) -> Tuple[Tensor, Tensor]:
    """Add this step's screen-space gradient norms (gsplat's NDC scaling) of the visible inside Gaussians."""
    grad = meta["means2d"].grad
    if grad is None:
        return grad_sum, grad_count
    inside = part.inside_mask()
    g = grad[0].clone()
    g[..., 0] *= views.width / 2.0
    g[..., 1] *= views.height / 2.0
    radii = meta["radii"][0]
    visible = (radii > 0) if radii.dim() == 1 else (radii > 0).all(dim=-1)  # gsplat >= 1.5: [N, 2]
    visible = visible[inside]
    norms = g.norm(dim=-1)[inside]
    return grad_sum + norms * visible, grad_count + visible.float()
