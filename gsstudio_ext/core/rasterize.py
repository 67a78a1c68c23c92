"""`rasterize()`: gsplat 1.4.0's `rasterization()` API with a pure-torch backend for CPU (and any device).

On CUDA tensors ("auto") it calls gsplat itself; elsewhere it runs `core.torch_rasterizer`, which reproduces
gsplat's maths (same colours, alphas, depths and gradients up to float rounding) and fills the `meta` fields
that gsplat's strategies and nerfstudio's splatfacto read.

Torch-backend notes:
- `packed=True` is accepted and ignored: the renders are identical; meta stays in the non-packed layout
  ([C, N] tensors, `gaussian_ids`/`camera_ids` None).
- `sparse_grad`, `distributed` and `camera_model="fisheye"` raise NotImplementedError.
- All channels are composited in one pass (`channel_chunk` has no effect on the result). With absgrad and more
  than `channel_chunk` channels gsplat keeps the |grad| sum of one chunk only; the torch backend reports the
  sum over all channels together.
- `means2d.absgrad` is (re)assigned on each backward, as gsplat does.
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch
from torch import Tensor

from gsstudio_ext.core.sh import MAX_SH_DEGREE, camera_centers, eval_sh, num_sh_bases
from gsstudio_ext.core.torch_rasterizer import (
    bin_gaussians,
    cpu_threads,
    project_gaussians,
    quat_scale_to_covar,
    rasterize_to_pixels,
)

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
CAMERA_MODELS = ("pinhole", "ortho", "fisheye")
BACKENDS = ("auto", "gsplat", "torch")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"rasterize: {msg}")


def _shape(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _validate(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds, render_mode,
    rasterize_mode, camera_model, tile_size, covars,
) -> None:  # fmt: skip
    _check(
        isinstance(means, Tensor) and means.dim() == 2 and means.shape[1] == 3,
        f"means must be [N, 3], got {_shape(means)}",
    )
    N = means.shape[0]
    if covars is None:
        _check(quats is not None and quats.shape == (N, 4), f"quats must be [N={N}, 4] (wxyz), got {_shape(quats)}")
        _check(scales is not None and scales.shape == (N, 3), f"scales must be [N={N}, 3], got {_shape(scales)}")
    else:
        _check(covars.shape == (N, 3, 3), f"covars must be [N={N}, 3, 3], got {_shape(covars)}")
    _check(opacities is not None and opacities.shape == (N,), f"opacities must be [N={N}], got {_shape(opacities)}")
    _check(
        viewmats is not None and viewmats.dim() == 3 and viewmats.shape[1:] == (4, 4),
        f"viewmats must be [C, 4, 4] world-to-camera, got {_shape(viewmats)}",
    )
    C = viewmats.shape[0]
    _check(C > 0, "viewmats must hold at least one camera")
    _check(Ks is not None and Ks.shape == (C, 3, 3), f"Ks must be [C={C}, 3, 3], got {_shape(Ks)}")
    _check(
        int(width) == width and width > 0 and int(height) == height and height > 0, f"bad image size {width}x{height}"
    )
    _check(int(tile_size) == tile_size and tile_size > 0, f"tile_size must be a positive int, got {tile_size}")
    _check(render_mode in RENDER_MODES, f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    _check(
        rasterize_mode in RASTERIZE_MODES, f"rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}"
    )
    _check(camera_model in CAMERA_MODELS, f"camera_model must be one of {CAMERA_MODELS}, got {camera_model!r}")
    _check(colors is not None, "colors is required")
    if sh_degree is None:
        ok = (colors.dim() == 2 and colors.shape[0] == N) or (colors.dim() == 3 and colors.shape[:2] == (C, N))
        _check(ok, f"colors must be [N={N}, D] or [C={C}, N, D] when sh_degree is None, got {_shape(colors)}")
        _check(colors.shape[-1] > 0, "colors must have at least one channel")
    else:
        _check(0 <= sh_degree <= MAX_SH_DEGREE, f"sh_degree must be in [0, {MAX_SH_DEGREE}], got {sh_degree}")
        ok = (colors.dim() == 3 and colors.shape[0] == N) or (colors.dim() == 4 and colors.shape[:2] == (C, N))
        _check(
            ok and colors.shape[-1] == 3, f"SH colors must be [N={N}, K, 3] or [C={C}, N, K, 3], got {_shape(colors)}"
        )
        _check(
            colors.shape[-2] >= num_sh_bases(sh_degree),
            f"sh_degree={sh_degree} needs K >= {num_sh_bases(sh_degree)} coefficients, got {_shape(colors)}",
        )
    named = dict(quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats, Ks=Ks)
    named.update(backgrounds=backgrounds, covars=covars)
    for name, t in named.items():
        if t is not None:
            _check(t.device == means.device, f"{name} is on {t.device} but means on {means.device}")
            _check(t.dtype == means.dtype, f"{name} has dtype {t.dtype} but means {means.dtype}")
    if backgrounds is not None and render_mode not in ("D", "ED"):
        D = 3 if sh_degree is not None else colors.shape[-1]
        _check(backgrounds.shape == (C, D), f"backgrounds must be [C={C}, D={D}], got {_shape(backgrounds)}")


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: RenderMode = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    channel_chunk: int = 32,
    distributed: bool = False,
    camera_model: Literal["pinhole", "ortho", "fisheye"] = "pinhole",
    covars: Optional[Tensor] = None,
    *,
    backend: Literal["auto", "gsplat", "torch"] = "auto",
) -> tuple[Tensor, Tensor, dict]:
    """Render Gaussians to C cameras with gsplat 1.4.0's `rasterization()` semantics.

    Args mirror gsplat: means [N, 3]; quats [N, 4] wxyz (any norm); scales [N, 3] and opacities [N] (activated);
    colors [N, D] / [C, N, D] (post-activation) or SH [N, K, 3] / [C, N, K, 3] with `sh_degree`; viewmats [C, 4, 4]
    world-to-camera (OpenCV); Ks [C, 3, 3]; backgrounds [C, D]. `backend`: "auto" = gsplat for CUDA tensors,
    else the pure-torch rasterizer.

    Returns:
        render_colors [C, H, W, X] (X = D, 1 or D + 1 with depth last), render_alphas [C, H, W, 1], meta (means2d
        [C, N, 2] with `.absgrad` after backward when absgrad=True, radii [C, N] int32, depths, conics, opacities...).
    """
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds, render_mode,
        rasterize_mode, camera_model, tile_size, covars,
    )  # fmt: skip
    use_gsplat = backend == "gsplat" or (backend == "auto" and means.is_cuda)
    if use_gsplat:
        try:
            from gsplat import rasterization  # lazy: needs CUDA kernels
        except ImportError as err:
            if backend == "gsplat":
                raise ImportError("backend='gsplat' needs the gsplat package (pip install gsplat==1.4.0)") from err
            warnings.warn(f"gsplat unavailable ({err}); using the torch rasterizer", stacklevel=2)
        else:
            if not means.is_cuda:
                raise NotImplementedError("backend='gsplat' needs CUDA tensors; use backend='torch' on CPU")
            out_c, out_a, meta = rasterization(
                means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height),
                near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d,
                sh_degree=sh_degree, packed=packed, tile_size=tile_size, backgrounds=backgrounds,
                render_mode=render_mode, sparse_grad=sparse_grad, absgrad=absgrad, rasterize_mode=rasterize_mode,
                channel_chunk=channel_chunk, distributed=distributed, camera_model=camera_model, covars=covars,
            )  # fmt: skip
            meta["backend"] = "gsplat"
            return out_c, out_a, meta
    with cpu_threads(means.device):
        return _rasterize_torch(
            means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height), near_plane, far_plane,
            radius_clip, eps2d, sh_degree, int(tile_size), backgrounds, render_mode, sparse_grad, absgrad,
            rasterize_mode, distributed, camera_model, covars,
        )  # fmt: skip


def _rasterize_torch(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane, radius_clip,
    eps2d, sh_degree, tile_size, backgrounds, render_mode, sparse_grad, absgrad, rasterize_mode, distributed,
    camera_model, covars,
) -> tuple[Tensor, Tensor, dict]:  # fmt: skip
    if sparse_grad:
        raise NotImplementedError("sparse_grad=True needs gsplat's packed CUDA path; the torch backend is dense only")
    if distributed:
        raise NotImplementedError("distributed=True is only supported by backend='gsplat'")
    if camera_model == "fisheye":
        raise NotImplementedError("camera_model='fisheye' is only supported by backend='gsplat'")
    C = viewmats.shape[0]
    if covars is None:
        covars = quat_scale_to_covar(quats, scales)
    proj = project_gaussians(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
        radius_clip=radius_clip, calc_compensations=rasterize_mode == "antialiased", camera_model=camera_model,
    )  # fmt: skip
    radii, means2d, depths, conics = proj.radii, proj.means2d, proj.depths, proj.conics
    opac = opacities[None, :].expand(C, -1)
    if proj.compensations is not None:
        opac = opac * proj.compensations
    meta: dict = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opac,
    }

    if sh_degree is None:
        feats = colors.expand(C, -1, -1) if colors.dim() == 2 else colors
    else:
        visible = radii > 0
        dirs = means[None, :, :] - camera_centers(viewmats)[:, None, :]  # [C, N, 3]
        dirs = torch.where(visible[..., None], dirs, torch.ones_like(dirs))  # culled: no NaN from |0|
        shs = colors.expand(C, -1, -1, -1) if colors.dim() == 3 else colors
        rgb = torch.where(visible[..., None], eval_sh(sh_degree, dirs, shs), torch.zeros_like(dirs))
        feats = torch.clamp_min(rgb + 0.5, 0.0)

    if render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths[..., None].to(feats.dtype)], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(C, 1)

    plan = bin_gaussians(means2d, conics, opac, radii, depths, width, height, tile_size=tile_size)
    render_colors, render_alphas = rasterize_to_pixels(
        means2d, conics, feats, opac, plan, backgrounds=backgrounds, absgrad=absgrad
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    meta.update(
        {
            "tile_width": -(-width // tile_size),
            "tile_height": -(-height // tile_size),
            "width": width,
            "height": height,
            "tile_size": tile_size,
            "n_cameras": C,
            "backend": "torch",
        }
    )
    return render_colors, render_alphas, meta
