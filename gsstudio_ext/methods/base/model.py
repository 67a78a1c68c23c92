"""The shared base of every gsstudio method: splatfacto plus per-Gaussian feature channels.

Differences from nerfstudio's ``SplatfactoModel`` (which it subclasses, so the viewer, ``ns-export gaussian-splat``
and checkpoint resizing keep working):

- extra per-Gaussian tensors live in ``gauss_params`` with their own optimizer groups, so gsplat's densification
  strategy duplicates, splits and prunes them together with the Gaussians;
- RGB (spherical harmonics evaluated per view) and every feature channel are rendered in ONE rasterization pass;
- rendering goes through :func:`gsstudio_ext.core.rasterize`: gsplat on CUDA, the project's pure-torch rasterizer
  on CPU (absgrad included), so nothing here assumes a GPU;
- no metric downloads weights: LPIPS is opt-in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Literal, NamedTuple, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.model_components.lib_bilagrid import BilateralGrid
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
from nerfstudio.utils.colors import get_color
from pytorch_msssim import SSIM
from torch import Tensor
from torch.nn import Parameter

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.init import scene_from_points
from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.sh import sh_to_view_colors

# The viewer's default background, as in splatfacto.
VISER_BACKGROUND = (0.1490, 0.1647, 0.2157)


class View(NamedTuple):
    """The camera of one render, as the rasterizer takes it."""

    viewmat: Tensor
    """[1, 4, 4] world-to-camera matrix."""
    K: Tensor
    """[1, 3, 3] intrinsics at the rendered size."""
    width: int
    height: int


@dataclass
class FeatureSplatfactoModelConfig(SplatfactoModelConfig):
    """Splatfacto with extra per-Gaussian feature channels rendered in the RGB pass, on GPU or CPU."""

    _target: Type = field(default_factory=lambda: FeatureSplatfactoModel)
    feature_dims: Dict[str, int] = field(default_factory=dict)
    """Extra per-Gaussian tensors (name -> channels), trained and densified with the Gaussians and rendered with RGB.
    Each name needs an optimizer group of that name (gsstudio-splatfacto has one for "feature"). Keep 3 + sum of
    channels (+1 with depth) on gsplat's fast sizes: 16, 17, 32 or 33."""
    feature_init_std: float = 0.01
    """Standard deviation of the random initial feature values."""
    rasterizer_backend: Literal["auto", "gsplat", "torch"] = "auto"
    """Rasterizer: auto = gsplat for CUDA tensors, the pure-torch rasterizer otherwise."""
    lpips_metric: bool = False
    """Report LPIPS in ns-eval. Off by default because it loads torchvision AlexNet weights (a download)."""
    seed: int = 0
    """Seed of the random initialisation (quaternions, features, random points)."""


class FeatureSplatfactoModel(SplatfactoModel):
    """Splatfacto whose ``gauss_params`` also hold ``config.feature_dims`` feature tensors, rendered in one pass."""

    config: FeatureSplatfactoModelConfig
    frozen_params: Tuple[str, ...] = ()
    """``gauss_params`` entries that are stored and densified but not optimised (integer entries never are)."""

    # ------------------------------------------------------------------ set-up

    def populate_modules(self) -> None:
        # Re-implemented rather than inherited: splatfacto's version moves the seed colours to a hard-coded GPU and
        # builds an LPIPS metric whose construction downloads weights.
        gen = torch.Generator().manual_seed(self.config.seed)
        if self.seed_points is not None and not self.config.random_init:
            points, colors = self.seed_points
        else:
            points = (torch.rand(self.config.num_random, 3, generator=gen) - 0.5) * self.config.random_scale
            colors = None
        params = self.init_gaussian_params(points, colors, gen)
        self.gauss_params = torch.nn.ParameterDict(
            {
                k: Parameter(v.contiguous(), requires_grad=v.is_floating_point() and k not in self.frozen_params)
                for k, v in params.items()
            }
        )

        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        self.lpips = None
        if self.config.lpips_metric:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(normalize=True)
        self.step = 0
        self.crop_box = None
        if self.config.background_color == "random":
            self.background_color = torch.tensor(VISER_BACKGROUND)
        else:
            self.background_color = get_color(self.config.background_color)
        if self.config.use_bilateral_grid:
            self.bil_grids = BilateralGrid(
                num=self.num_train_data,
                grid_X=self.config.grid_shape[0],
                grid_Y=self.config.grid_shape[1],
                grid_W=self.config.grid_shape[2],
            )
        self.strategy = self.make_strategy()
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)

    def init_gaussian_params(
        self, points: Tensor, colors: Optional[Tensor], generator: torch.Generator
    ) -> Dict[str, Tensor]:
        """Initial ``gauss_params`` from the seed point cloud [N, 3] and its colours (0..255 or None)."""
        scene = scene_from_points(
            points, colors, self.config.sh_degree, sigmoid_colors=self.config.sh_degree == 0, generator=generator
        )
        params = scene.to_splatfacto_params(include_extras=False)
        for name, dim in self.config.feature_dims.items():
            params[name] = torch.randn(scene.num_gaussians, dim, generator=generator) * self.config.feature_init_std
        return params

    def make_strategy(self):
        """gsplat's DefaultStrategy with splatfacto's mapping of config names."""
        from gsplat.strategy import DefaultStrategy

        cfg = self.config
        return DefaultStrategy(
            prune_opa=cfg.cull_alpha_thresh,
            grow_grad2d=cfg.densify_grad_thresh,
            grow_scale3d=cfg.densify_size_thresh,
            grow_scale2d=cfg.split_screen_size,
            prune_scale3d=cfg.cull_scale_thresh,
            prune_scale2d=cfg.cull_screen_size,
            refine_scale2d_stop_iter=cfg.stop_screen_size_at,
            refine_start_iter=cfg.warmup_length,
            refine_stop_iter=cfg.stop_split_at,
            reset_every=cfg.reset_alpha_every * cfg.refine_every,
            refine_every=cfg.refine_every,
            pause_refine_after_reset=self.num_train_data + cfg.refine_every,
            absgrad=cfg.use_absgrad,
            revised_opacity=False,
            verbose=False,
        )

    def get_gaussian_param_groups(self) -> Dict[str, List[Parameter]]:
        """One optimizer group per trainable ``gauss_params`` entry (gsplat's strategy requires a one-to-one match)."""
        return {name: [param] for name, param in self.gauss_params.items() if param.requires_grad}

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        """Resize every ``gauss_params`` entry and buffer to its own checkpoint shape (splatfacto assumes one shared
        count)."""
        self.step = 30000
        prefix = "gauss_params."
        for name, param in self.gauss_params.items():
            saved = state_dict.get(prefix + name)
            if saved is not None:
                self.gauss_params[name] = Parameter(
                    torch.zeros(saved.shape, dtype=saved.dtype, device=self.device), requires_grad=param.requires_grad
                )
        for name, buffer in list(self.named_buffers(recurse=False)):
            saved = state_dict.get(name)
            if saved is not None and saved.shape != buffer.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=saved.dtype, device=buffer.device))
        return torch.nn.Module.load_state_dict(self, state_dict, **kwargs)

    # ------------------------------------------------------------------ rendering

    def render_filter(self) -> Optional[Tensor]:
        """Bool [N] of the Gaussians to render (e.g. a selection isolated or removed in the viewer); None = all.
        Combined with the viewer's crop box; override in methods with queries."""
        return None

    def active_sh_degree(self) -> int:
        """SH degree used at the current step (splatfacto's warm-up: one more degree every ``sh_degree_interval``)."""
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    def feature_channels(self, crop_ids: Optional[Tensor], view: View) -> "OrderedDict[str, Tensor]":
        """Per-Gaussian channels [N, D] rendered next to RGB this pass, by output name (override to add more).

        ``view`` is the rendered camera, for view-dependent channels."""
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        for name in self.config.feature_dims:
            value = self.gauss_params[name]
            out[name] = value if crop_ids is None else value[crop_ids]
        return out

    def _view(self, camera: Cameras) -> View:
        """The (downscaled) view of a camera."""
        if self.training:
            assert camera.shape[0] == 1, "Only one camera at a time"
            c2w = self.camera_optimizer.apply_to_camera(camera)
        else:
            c2w = camera.camera_to_worlds
        scale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale)
        K = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(scale)
        return View(viewmat_from_c2w(c2w.to(self.device)), K, width, height)

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """Render RGB, depth, alpha and every feature channel of ``feature_channels`` with one rasterization."""
        if not isinstance(camera, Cameras):
            return {}
        crop_ids = self.render_filter()
        if self.crop_box is not None and not self.training:
            inside = self.crop_box.within(self.means).squeeze()
            crop_ids = inside if crop_ids is None else crop_ids & inside
        if crop_ids is not None and not bool(crop_ids.any()):
            width, height = int(camera.width.item()), int(camera.height.item())
            return self.get_empty_outputs(width, height, self.background_color)
        pick = (lambda t: t) if crop_ids is None else (lambda t: t[crop_ids])
        view = self._view(camera)
        viewmat, K, width, height = view
        self.last_size = (height, width)
        means = pick(self.means)

        sh = torch.cat((pick(self.features_dc)[:, None, :], pick(self.features_rest)), dim=1)
        degree = self.active_sh_degree()
        features = self.feature_channels(crop_ids, view)
        if self.config.sh_degree == 0:
            colors, sh_degree = torch.sigmoid(sh[:, 0, :]), None
        elif features:
            colors, sh_degree = sh_to_view_colors(means, sh, viewmat, degree)[0], None
        else:
            colors, sh_degree = sh, degree
        if features:
            colors = torch.cat([colors, *features.values()], dim=-1)

        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        render, alpha, self.info = rasterize(
            means=means,
            quats=pick(self.quats),
            scales=torch.exp(pick(self.scales)),
            opacities=torch.sigmoid(pick(self.opacities)).squeeze(-1),
            colors=colors,
            viewmats=viewmat,
            Ks=K,
            width=width,
            height=height,
            packed=False,
            near_plane=0.01,
            far_plane=1e10,
            render_mode=render_mode,
            sh_degree=sh_degree,
            sparse_grad=False,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
            backend=self.config.rasterizer_backend,
        )
        if self.training and torch.is_grad_enabled():
            self.strategy.step_pre_backward(
                self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info
            )

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training:
            if camera.metadata is not None and "cam_idx" in camera.metadata:
                rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], height, width)
        outputs: Dict[str, Union[Tensor, List]] = {"rgb": rgb.squeeze(0), "accumulation": alpha.squeeze(0)}
        start = 3
        for name, value in features.items():
            outputs[name] = render[0, ..., start : start + value.shape[-1]]
            start += value.shape[-1]
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., start : start + 1]
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        outputs["depth"] = depth
        if background.shape[0] == 3 and not self.training:
            background = background.expand(height, width, 3)
        outputs["background"] = background
        return outputs

    # ------------------------------------------------------------------ metrics

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        """PSNR and SSIM (LPIPS when enabled) of the RGB render, and the GT|render image pair."""
        gt_rgb = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        predicted = outputs["rgb"]
        gt_chw, pred_chw = gt_rgb.permute(2, 0, 1)[None], predicted.permute(2, 0, 1)[None]
        metrics = {"psnr": float(self.psnr(gt_chw, pred_chw).item()), "ssim": float(self.ssim(gt_chw, pred_chw))}
        if self.lpips is not None:
            metrics["lpips"] = float(self.lpips(gt_chw, pred_chw))
        return metrics, {"img": torch.cat([gt_rgb, predicted], dim=1)}
