"""From N edited views back to an edited 3DGS (spec §3.7): fine-tune every Gaussian of the pre-edit scene on the
edited views with the 3DGS photometric loss and learning rates, densification and pruning included.

- The paper initialises with AnySplat and runs 3,000 3DGS iterations on the 9 edited views [P S2.3]. Here the start
  is the pre-edit scene [I]: already aligned with the cameras, and it covers what the 9 views do not see.
- Loss of one step (one edited view, a seeded shuffle per epoch, as 3DGS): ``(1 - l) L1 + l (1 - SSIM)``,
  l = 0.2 [C 3DGS], SSIM from pytorch_msssim (11x11 Gaussian window, what splatfacto uses).
- Optional drift anchor (spec §3.7 option): ``keep_weight`` x L1 to ORIGINAL images on the pixels an edit did not
  change (:class:`KeepTargets`; one keep view per step). :func:`changed_pixels` finds them on the edited views;
  :func:`changed_gaussians` + :func:`keep_targets` carry the change to views the edit did not cover.
- Densification is gsplat's ``DefaultStrategy`` (3DGS's clone / split / prune, as splatfacto uses it) driven with
  3DGS's 1-based iteration numbers. No opacity reset [I]: 3DGS would reset at iteration 3000, after its last save.
- Deterministic for a seed on CPU (views, split samples); gsplat's CUDA backward uses atomics.

Edited images come at the grid's cell resolution (~341 px per view for a 1024 grid): give Ks for that size
(``views.scale_intrinsics``). Renders at the original resolution are then softer (spec §3.7 honest limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from pytorch_msssim import ssim
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.contributions import contributions_and_footprint
from gsstudio_ext.core.masks import dilate_mask
from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.methods.romap.local_edit import EditViews, part_mask2d, scene_extent_of

Progress = Callable[[int, int, float], None]
"""progress(step, total_steps, loss), called after every step."""

_ROW = "source_row"
"""Carried through densification: the input row each Gaussian descends from (its extras are inherited)."""


@dataclass
class RefitConfig:
    """3DGS photometric fine-tuning on the edited views. [P] paper, [C] 3DGS code defaults, [I] our choices."""

    steps: int = 3000
    """Optimisation steps, one view each [P S2.3: 3,000 iterations, ~40 s on an RTX Pro 6000]."""
    lambda_dssim: float = 0.2
    """Weight l of D-SSIM in (1 - l) L1 + l (1 - SSIM) [P; C 3DGS lambda_dssim]."""
    means_lr: float = 1.6e-4
    """Initial position lr, times the scene extent [C 3DGS position_lr_init]."""
    means_lr_final: float = 1.6e-6
    """Final position lr, times the scene extent (log-linear decay) [C 3DGS position_lr_final]."""
    means_lr_decay_steps: Optional[int] = 30_000
    """Steps of the position-lr decay [C 3DGS position_lr_max_steps, not tied to the iteration count: 3,000 steps
    end at 0.63 x the initial lr]. None = decay over ``steps``."""
    feature_lr: float = 2.5e-3
    """SH DC lr [C 3DGS feature_lr]."""
    feature_rest_lr: float = 2.5e-3 / 20
    """Higher-SH lr, feature_lr / 20 [C 3DGS]."""
    opacity_lr: float = 0.05
    """Opacity-logit lr [C 3DGS, original release; later releases use 0.025]."""
    scaling_lr: float = 5e-3
    """Log-scale lr [C 3DGS]."""
    rotation_lr: float = 1e-3
    """Quaternion lr [C 3DGS]."""
    adam_eps: float = 1e-15
    """Adam epsilon [C 3DGS]."""
    scene_extent: Optional[float] = None
    """Scene extent for the position lr and the clone/split size rule; None = 1.1 x the largest distance of an edited
    view's camera from their mean (3DGS's cameras_extent of the refit's own training cameras)."""
    densify: bool = True
    """Clone / split / prune during the refit (geometry-changing edits need it) [I, spec §3.7]."""
    densify_from: int = 500
    """Densify after this step [C 3DGS densify_from_iter]."""
    densify_until: int = 15_000
    """No densification from this step on [C 3DGS densify_until_iter]."""
    densify_every: int = 100
    """Steps between densifications [C 3DGS densification_interval]."""
    densify_grad_threshold: float = 2e-4
    """Mean screen-space position gradient (NDC-scaled) above which a Gaussian is cloned or split [C 3DGS]."""
    percent_dense: float = 0.01
    """Gaussians larger than this x the extent are split, smaller ones cloned [C 3DGS]."""
    prune_opacity: float = 0.005
    """Gaussians below this opacity are pruned at each densification [C 3DGS]."""
    keep_weight: float = 0.1
    """Weight of the L1 to original images outside the changed pixels, when keep targets are given (one extra
    render of a keep view per step) [I]."""
    background: Optional[Tuple[float, float, float]] = None
    """Background colour of the renders (None = black, 3DGS's default); the one the edited views were rendered on."""
    seed: int = 0
    """Seed of the view order and of the split samples."""
    backend: str = "auto"
    """Rasterizer backend (core.rasterize): gsplat on CUDA, the torch rasterizer on CPU."""


class KeepTargets(NamedTuple):
    """Original images anchoring the unchanged pixels: viewmats [A, 4, 4], Ks [A, 3, 3] for images Float[A, 3, H, W]
    in [0, 1], masks Bool[A, H, W] (True = unchanged, anchored)."""

    viewmats: Tensor
    Ks: Tensor
    images: Tensor
    masks: Tensor


class RefitResult(NamedTuple):
    scene: GaussianScene
    """The refit scene (rows change with densification; extras follow the row each Gaussian descends from)."""
    losses: List[float]
    """Total loss of every step."""
    steps: int
    """Steps run."""


# ---------------------------------------------------------------------------------------------------------- masks


def changed_pixels(edited: Tensor, source: Tensor, threshold: float = 0.05, dilation: int = 2) -> Tensor:
    """Bool[N, h, w]: pixels whose largest channel difference between ``edited`` and ``source`` (Float[N, 3, h, w])
    exceeds ``threshold``, grown by ``dilation`` pixels [I: 0.05 is ~13 grey levels, above a diffusion editor's
    re-encoding noise on unchanged pixels; 2 px cover its soft edit boundaries]."""
    if edited.shape != source.shape or edited.ndim != 4 or edited.shape[1] != 3:
        raise ValueError(f"edited and source must be Float[N, 3, h, w]: {list(edited.shape)}, {list(source.shape)}")
    diff = (edited - source.to(edited)).abs().amax(dim=1)
    return dilate_mask(diff > threshold, dilation)


@torch.no_grad()
def changed_gaussians(
    scene: GaussianScene, viewmats: Tensor, Ks: Tensor, changed: Tensor, share: float = 0.5
) -> Tensor:
    """Bool[G]: Gaussians whose blend weight over the views viewmats [N, 4, 4], Ks [N, 3, 3] falls at least ``share``
    inside the changed pixels Bool[N, h, w]; Gaussians unseen in every view are unchanged [I: share 0.5]."""
    h, w = changed.shape[-2:]
    viewmats, Ks, changed = viewmats.to(scene.device), Ks.to(scene.device), changed.to(scene.device)
    inside = scene.means.new_zeros(scene.num_gaussians)
    total = torch.zeros_like(inside)
    geom = (scene.means, scene.quats, scene.scales(), scene.opacities())
    for v in range(viewmats.shape[0]):
        contrib, foot = contributions_and_footprint(*geom, viewmats[v : v + 1], Ks[v : v + 1], w, h, changed[v : v + 1])
        inside += contrib[:, 0]
        total += foot
    return (total > 0) & (inside >= share * total)


@torch.no_grad()
def keep_targets(
    scene: GaussianScene,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    changed3d: Tensor,
    dilation: int = 2,
    background: Optional[Tuple[float, float, float]] = None,
) -> KeepTargets:
    """Anchors for views the edit did not cover: renders of the pre-edit ``scene`` from viewmats [A, 4, 4], Ks
    [A, 3, 3] at (width, height), anchored only away from the changed Gaussians ``changed3d`` Bool[G]: pixels where
    their blend share exceeds 0.01, grown by ``dilation`` px, are left free [I: generous, an anchor on an edited
    pixel would undo the edit]."""
    bg = None if background is None else torch.tensor(background, device=scene.device)
    images = render_scene(scene, viewmats, Ks, width, height, background=bg).rgb.permute(0, 3, 1, 2)
    moved = part_mask2d(scene, changed3d, EditViews(viewmats, Ks, width, height), threshold=0.01)
    return KeepTargets(viewmats, Ks, images, ~dilate_mask(moved, dilation))


# ---------------------------------------------------------------------------------------------------------- refit


def _check_views(viewmats: Tensor, Ks: Tensor, images: Tensor, name: str) -> None:
    n = viewmats.shape[0]
    if viewmats.shape != (n, 4, 4) or Ks.shape != (n, 3, 3):
        raise ValueError(
            f"{name}: viewmats must be [N, 4, 4] and Ks [N, 3, 3]: {list(viewmats.shape)}, {list(Ks.shape)}"
        )
    if images.ndim != 4 or images.shape[:2] != (n, 3):
        raise ValueError(f"{name}: images must be Float[N={n}, 3, h, w], got {list(images.shape)}")
    h, w = images.shape[-2:]
    cx, cy = Ks[:, 0, 2], Ks[:, 1, 2]
    if bool(((cx <= 0) | (cx >= w) | (cy <= 0) | (cy >= h)).any()):
        raise ValueError(
            f"{name}: principal points lie outside the {w}x{h} images: give Ks for the image size "
            "(views.scale_intrinsics(Ks, original_size, (w, h)))"
        )


class _Trainable:
    """splatfacto-named Parameters with one Adam each (what gsplat's strategy expects), plus the source-row index."""

    def __init__(self, scene: GaussianScene, config: RefitConfig, extent: float) -> None:
        raw = scene.to_splatfacto_params(include_extras=False)
        self.params: Dict[str, Parameter] = {k: Parameter(v.detach().clone()) for k, v in raw.items()}
        lrs = {
            "means": config.means_lr * extent,
            "scales": config.scaling_lr,
            "quats": config.rotation_lr,
            "opacities": config.opacity_lr,
            "features_dc": config.feature_lr,
            "features_rest": config.feature_rest_lr,
        }
        self.optimizers: Dict[str, torch.optim.Optimizer] = {
            k: torch.optim.Adam([p], lr=lrs[k], eps=config.adam_eps) for k, p in self.params.items()
        }
        # gsplat's ops rewrite every params entry through its optimizer: the row index gets an lr-0 placeholder.
        rows = torch.arange(scene.num_gaussians, device=scene.device, dtype=torch.float64)
        self.params[_ROW] = Parameter(rows, requires_grad=False)
        self.optimizers[_ROW] = torch.optim.SGD([self.params[_ROW]], lr=0.0)
        self.extras = scene.extras
        self.sh_degree = scene.sh_degree

    def render(
        self, viewmat: Tensor, K: Tensor, width: int, height: int, background: Optional[Tensor], backend: str
    ) -> Tuple[Tensor, dict]:
        """RGB Float[3, H, W] of one camera (differentiable, not clamped, as 3DGS trains) and the rasterizer meta."""
        p = self.params
        colors = torch.cat([p["features_dc"][:, None, :], p["features_rest"]], dim=1)
        rgb, alpha, meta = rasterize(
            p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"][:, 0]), colors,
            viewmat[None], K[None], width, height, sh_degree=self.sh_degree, backend=backend,
        )  # fmt: skip
        rgb = rgb[0]
        if background is not None:
            rgb = rgb + (1.0 - alpha[0]) * background
        return rgb.permute(2, 0, 1), meta

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def scene(self) -> GaussianScene:
        p = {k: v.detach() for k, v in self.params.items()}
        rows = p.pop(_ROW).long()
        out = GaussianScene.from_splatfacto_params(p)
        out.extras = {k: v[rows] for k, v in self.extras.items()}
        return out


def _strategy(config: RefitConfig):
    from gsplat.strategy import DefaultStrategy

    return DefaultStrategy(
        prune_opa=config.prune_opacity,
        grow_grad2d=config.densify_grad_threshold,
        grow_scale3d=config.percent_dense,
        refine_start_iter=config.densify_from,
        refine_stop_iter=config.densify_until,
        refine_every=config.densify_every,
        reset_every=config.steps + 1,  # never: no opacity reset, hence no large-Gaussian pruning either
        absgrad=False,
        revised_opacity=False,
        verbose=False,
    )


def _photometric(render: Tensor, target: Tensor, lambda_dssim: float) -> Tensor:
    """(1 - l) L1 + l (1 - SSIM) of Float[3, H, W] images (3DGS)."""
    l1 = (render - target).abs().mean()
    return (1.0 - lambda_dssim) * l1 + lambda_dssim * (1.0 - ssim(render[None], target[None], data_range=1.0))


class Refit:
    """The refit as a stepper, so a training loop (nerfstudio's trainer, the viewer's worker) can drive it:
    :meth:`loss` builds one step's loss, the caller back-propagates it, :meth:`update` applies it. :func:`refit_scene`
    runs it to the end.

    Args:
        scene: the pre-edit scene (not modified).
        viewmats: [N, 4, 4] OpenCV world-to-camera of the edited views (duplicates allowed).
        Ks: [N, 3, 3] intrinsics for the images' size (scale them to the cell resolution).
        images: Float[N, 3, h, w] in [0, 1]: the edited views.
        keep: optional original images anchoring unchanged pixels (weight ``config.keep_weight``).
    """

    def __init__(
        self,
        scene: GaussianScene,
        viewmats: Tensor,
        Ks: Tensor,
        images: Tensor,
        config: Optional[RefitConfig] = None,
        keep: Optional[KeepTargets] = None,
    ) -> None:
        config = config or RefitConfig()
        device = scene.device
        viewmats, Ks, images = viewmats.to(device).float(), Ks.to(device).float(), images.to(device).float()
        _check_views(viewmats, Ks, images, "edited views")
        if keep is not None:
            keep = KeepTargets(*(t.to(device).float() for t in keep[:3]), keep.masks.to(device).bool())
            _check_views(keep.viewmats, keep.Ks, keep.images, "keep targets")
            if keep.masks.shape != (keep.images.shape[0], *keep.images.shape[-2:]):
                raise ValueError(f"keep masks must be Bool[A, H, W] like the images, got {list(keep.masks.shape)}")
        if scene.num_gaussians == 0:
            raise ValueError("the scene has no Gaussians to refit")
        self.config, self.keep = config, keep
        self.viewmats, self.Ks, self.images = viewmats, Ks, images
        extent = config.scene_extent if config.scene_extent is not None else scene_extent_of(viewmats)
        self.background = None if config.background is None else torch.tensor(config.background, device=device)
        self._means_lr0 = config.means_lr * extent
        self._decay = config.means_lr_decay_steps or config.steps
        self.model = _Trainable(scene, config, extent)
        self.strategy = _strategy(config) if config.densify else None
        self.state = self.strategy.initialize_state(scene_scale=extent) if self.strategy is not None else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self._rng = _SeededRng(config.seed, device)  # gsplat's split draws from the global generator
        self._order: List[int] = []
        self._keep_order: List[int] = []
        self._meta: Optional[dict] = None
        self.losses: List[float] = []
        self.step = 0
        """Steps applied so far (3DGS iterations count from 1: the next one is ``step + 1``)."""

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    def loss(self) -> Tensor:
        """The loss of step ``step + 1`` on one edited view (a seeded shuffle per epoch, as 3DGS)."""
        config, step = self.config, self.step + 1
        ratio = config.means_lr_final / config.means_lr
        self.model.optimizers["means"].param_groups[0]["lr"] = self._means_lr0 * ratio ** min(step / self._decay, 1.0)
        if not self._order:
            self._order = torch.randperm(self.images.shape[0], generator=self.generator).tolist()
        v = self._order.pop()
        h, w = self.images.shape[-2:]
        rgb, self._meta = self.model.render(self.viewmats[v], self.Ks[v], w, h, self.background, config.backend)
        if self.strategy is not None:
            self.strategy.step_pre_backward(self.model.params, self.model.optimizers, self.state, step, self._meta)
        loss = _photometric(rgb, self.images[v], config.lambda_dssim)
        keep = self.keep
        if keep is not None and config.keep_weight > 0:
            if not self._keep_order:
                self._keep_order = torch.randperm(keep.images.shape[0], generator=self.generator).tolist()
            a = self._keep_order.pop()
            kh, kw = keep.images.shape[-2:]
            krgb, _ = self.model.render(keep.viewmats[a], keep.Ks[a], kw, kh, self.background, config.backend)
            m = keep.masks[a]
            if bool(m.any()):
                loss = loss + config.keep_weight * (krgb - keep.images[a]).abs().permute(1, 2, 0)[m].mean()
        return loss

    def update(self, loss: Tensor) -> float:
        """Apply the back-propagated ``loss`` of :meth:`loss`: Adam steps, then densification; returns its value."""
        if self._meta is None:
            raise RuntimeError("call loss() and back-propagate it before update()")
        self.step += 1
        self.model.step()
        if self.strategy is not None and self.step < self.config.steps:  # 3DGS saves its last iteration first
            with self._rng:
                self.strategy.step_post_backward(
                    self.model.params, self.model.optimizers, self.state, self.step, self._meta
                )
        self._meta = None
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def scene(self) -> GaussianScene:
        """The current refit scene (rows change with densification; extras follow their source rows)."""
        return self.model.scene()


class _SeededRng:
    """A context with its own global-RNG stream: enters with this stream's state, leaves the caller's untouched."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(seed)
            self.states = self._get()
        self._fork: Any = None

    def _get(self) -> List[Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in self.devices)]

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.states[0])
        for d, state in zip(self.devices, self.states[1:]):
            torch.cuda.set_rng_state(state, d)

    def __exit__(self, *exc: Any) -> None:
        self.states = self._get()
        self._fork.__exit__(*exc)


def refit_scene(
    scene: GaussianScene,
    viewmats: Tensor,
    Ks: Tensor,
    images: Tensor,
    config: Optional[RefitConfig] = None,
    progress: Optional[Progress] = None,
    keep: Optional[KeepTargets] = None,
) -> RefitResult:
    """Fine-tune every Gaussian of ``scene`` (not modified) to the edited views (see :class:`Refit`);
    ``progress(step, steps, loss)`` after each step."""
    refit = Refit(scene, viewmats, Ks, images, config, keep)
    while not refit.done:
        loss = refit.loss()
        loss.backward()
        value = refit.update(loss)
        if progress is not None:
            progress(refit.step, refit.config.steps, value)
    return RefitResult(refit.scene(), refit.losses, refit.step)
