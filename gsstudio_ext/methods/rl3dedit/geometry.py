"""Multi-view geometry for RL3DEdit's rewards and metric: relative poses, depth warping, SSIM and Ph-Loss.

Conventions (spec §1.2): cameras are OpenCV world-to-camera matrices ``viewmats [M, 4, 4]`` (x right, y down, z
forward), as gsplat and VGGT use them; convert nerfstudio's OpenGL camera-to-world poses with
:func:`gsstudio_ext.core.cameras.viewmat_from_c2w` first. Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
Depth is z-depth (distance along the optical axis); 0 (or less) means "no depth here".

Warping (spec §3.8, Monodepth2 style). View A owns the depth; every pixel p of A is lifted with D_A(p), moved into
view B and projected: ``p_B = pi(K_B T_B T_A^-1 D_A(p) K_A^-1 p~)``. Bilinear sampling of I_B at p_B gives
``I_{B->A}``, image B as seen from A, which is compared with I_A pixel by pixel. A pixel is valid when D_A(p) > 0,
the moved point is in front of B, p_B lies inside B's pixel-centre rectangle (so all four bilinear taps are real
pixels) and, optionally, B's own depth sampled at p_B agrees with the moved point's z within a relative tolerance
``tau`` (occlusions and depth edges fail that test).

Ph-Loss [P §4.2; weights and SSIM from Monodepth2, I]: over the M - 1 adjacent pairs (A, B) = (m, m + 1), the masked
mean of ``0.15 |I_A - I_{B->A}| + 0.85 (1 - SSIM) / 2`` (both averaged over colour channels), then the mean over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.sh import camera_centers

SSIM_C1 = 0.01**2  # Monodepth2 / Wang et al. constants for images in [0, 1]
SSIM_C2 = 0.03**2
PH_SSIM_WEIGHT = 0.85  # Monodepth2's alpha: 0.85 SSIM term + 0.15 L1 term [I, spec §3.8]
DEFAULT_TAU = 0.05  # relative depth agreement for a valid warp [I, spec §3.8]


# ======================================================================================================================
# views and poses
# ======================================================================================================================
@dataclass
class ViewSet:
    """M ordered views (consecutive entries are spatial neighbours) with depth and cameras."""

    images: Tensor
    """Float[M, 3, H, W] RGB in [0, 1]."""
    depths: Tensor
    """Float[M, H, W] z-depth in the cameras' units; <= 0 where unknown."""
    viewmats: Tensor
    """Float[M, 4, 4] OpenCV world-to-camera matrices."""
    Ks: Tensor
    """Float[M, 3, 3] pinhole intrinsics in pixels at (H, W)."""

    def __post_init__(self) -> None:
        m = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ViewSet.images must be [M, 3, H, W], got {tuple(self.images.shape)}")
        h, w = self.images.shape[-2:]
        expected = {"depths": (m, h, w), "viewmats": (m, 4, 4), "Ks": (m, 3, 3)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"ViewSet.{name} must be {shape} for images {tuple(self.images.shape)}, got {got}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> "ViewSet":
        return ViewSet(*(t.to(device) for t in (self.images, self.depths, self.viewmats, self.Ks)))

    def with_images(self, images: Tensor) -> "ViewSet":
        """The same depths and cameras with other images Float[M, 3, H, W]."""
        return ViewSet(images, self.depths, self.viewmats, self.Ks)


def invert_rigid(T: Tensor) -> Tensor:
    """Inverse of rigid transforms Float[..., 4, 4] in closed form ([R | t]^-1 = [R^T | -R^T t])."""
    rot_t = T[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ T[..., :3, 3:])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def relative_poses(viewmats: Tensor) -> Tensor:
    """``T_rel^m = T_{m+1} T_m^-1`` of consecutive world-to-camera matrices Float[M, 4, 4] -> Float[M-1, 4, 4].

    Invariant to the choice of world frame (VGGT puts it at the first camera): T W (T' W)^-1 = T T'^-1.
    """
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4) or viewmats.shape[0] < 2:
        raise ValueError(f"viewmats must be [M >= 2, 4, 4], got {tuple(viewmats.shape)}")
    return viewmats[1:] @ invert_rigid(viewmats[:-1])


def unit_relative_poses(viewmats: Tensor, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """Relative rotations Float[M-1, 3, 3] and unit-length relative translations Float[M-1, 3] (spec §3.5).

    The unit length removes the unknown global scale of VGGT's cameras. A zero translation (a duplicated view) stays 0.
    """
    rel = relative_poses(viewmats)
    t = rel[:, :3, 3]
    return rel[:, :3, :3], t / t.norm(dim=-1, keepdim=True).clamp_min(eps)


def relative_pose_errors(pred_viewmats: Tensor, gt_viewmats: Tensor) -> Tensor:
    """Per adjacent pair ``||R_rel - R_rel*||_F^2 + ||t~_rel - t~_rel*||^2`` -> Float[M-1] (spec §3.5, Eq. 2)."""
    if pred_viewmats.shape != gt_viewmats.shape:
        raise ValueError(f"camera sets differ in shape: {tuple(pred_viewmats.shape)} vs {tuple(gt_viewmats.shape)}")
    rot, t = unit_relative_poses(pred_viewmats)
    rot_gt, t_gt = unit_relative_poses(gt_viewmats.to(pred_viewmats))
    return (rot - rot_gt).square().sum(dim=(-1, -2)) + (t - t_gt).square().sum(dim=-1)


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity ``dst ~ s R src + t`` between point sets Float[N, 3] (Umeyama 1991).

    Returns:
        (scale Float[], R Float[3, 3] with det +1, t Float[3]); scale is 1 when ``with_scale`` is False.
    """
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or src.shape[0] < 3:
        raise ValueError(f"umeyama needs two [N >= 3, 3] point sets, got {tuple(src.shape)} and {tuple(dst.shape)}")
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / src.shape[0]
    u, sig, vt = torch.linalg.svd(cov)
    sign = torch.ones(3, dtype=src.dtype, device=src.device)
    if torch.det(u) * torch.det(vt) < 0:
        sign[2] = -1.0
    rot = u @ torch.diag(sign) @ vt
    var_s = xs.square().sum() / src.shape[0]
    scale = (sig * sign).sum() / var_s if with_scale else torch.ones((), dtype=src.dtype, device=src.device)
    t = mu_d - scale * rot @ mu_s
    return scale.float(), rot.float(), t.float()


def depth_scale_to_cameras(pred_viewmats: Tensor, gt_viewmats: Tensor) -> Tensor:
    """Factor that brings up-to-scale predicted depth (VGGT) to the scale of ground-truth cameras (spec §3.8 option).

    It is the scale of the Umeyama similarity from the predicted camera centres to the ground-truth ones; multiply the
    predicted depth by it before warping with the ground-truth cameras. Needs >= 3 non-collinear cameras.
    """
    scale, _, _ = umeyama(camera_centers(pred_viewmats.float()), camera_centers(gt_viewmats.float()))
    return scale


# ======================================================================================================================
# warping
# ======================================================================================================================
class Warp(NamedTuple):
    """Image B seen from view A, per pair."""

    image: Tensor
    """Float[P, C, H, W]: I_{B->A}, B bilinearly sampled at the pixels of A moved into B."""
    valid: Tensor
    """Bool[P, H, W]: A has depth, the point is in front of B, inside B and (optionally) agrees with B's depth."""


def pixel_grid(height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Homogeneous pixel centres Float[H, W, 3] = (j + 0.5, i + 0.5, 1)."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)


def warp_views(
    image_b: Tensor,
    depth_a: Tensor,
    K_a: Tensor,
    K_b: Tensor,
    a_to_b: Tensor,
    depth_b: Optional[Tensor] = None,
    tau: Optional[float] = DEFAULT_TAU,
) -> Warp:
    """Differentiable backward warp of image B into view A using A's depth, for P pairs at once.

    Args:
        image_b: Float[P, C, H, W] images of the B views.
        depth_a: Float[P, H, W] z-depth of the A views (<= 0: unknown).
        K_a, K_b: Float[P, 3, 3] intrinsics.
        a_to_b: Float[P, 4, 4] camera-A-to-camera-B transforms, ``T_B T_A^-1`` for world-to-camera T.
        depth_b: Float[P, H, W] z-depth of the B views for the agreement test (None: no test).
        tau: relative depth tolerance ``|D_B(p_B) - z_B| <= tau z_B`` (None: no test).

    Returns:
        :class:`Warp` (gradients flow to ``image_b``, ``depth_a`` and ``depth_b``).
    """
    p, _, h, w = image_b.shape
    if depth_a.shape != (p, h, w):
        raise ValueError(f"depth_a must be {(p, h, w)}, got {tuple(depth_a.shape)}")
    pix = pixel_grid(h, w, image_b.device, image_b.dtype).reshape(1, -1, 3)  # [1, HW, 3]
    rays = pix @ torch.linalg.inv(K_a).transpose(1, 2)  # [P, HW, 3] with z = 1
    pts_a = rays * depth_a.reshape(p, -1, 1)
    pts_b = pts_a @ a_to_b[:, :3, :3].transpose(1, 2) + a_to_b[:, None, :3, 3]
    z_b = pts_b[..., 2]
    proj = pts_b @ K_b.transpose(1, 2)
    uv = proj[..., :2] / z_b.clamp_min(1e-6)[..., None]  # [P, HW, 2] in pixels
    grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], dim=-1).reshape(p, h, w, 2)
    warped = F.grid_sample(image_b, grid, mode="bilinear", padding_mode="border", align_corners=False)
    u, v = uv[..., 0], uv[..., 1]
    valid = (depth_a.reshape(p, -1) > 0) & (z_b > 1e-6)
    valid = valid & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)
    if depth_b is not None and tau is not None:
        sampled = F.grid_sample(depth_b[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = sampled.reshape(p, -1)
        valid = valid & (sampled > 0) & ((sampled - z_b).abs() <= tau * z_b)
    return Warp(warped, valid.reshape(p, h, w))


# ======================================================================================================================
# photometric error
# ======================================================================================================================
def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-pixel SSIM Float[B, C, H, W] with Monodepth2's 3x3 box window and reflection padding, clamped to [-1, 1]."""
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    var_x = F.avg_pool2d(x * x, 3, 1) - mu_x**2
    var_y = F.avg_pool2d(y * y, 3, 1) - mu_y**2
    cov = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).clamp(-1.0, 1.0)


def photometric_error(target: Tensor, estimate: Tensor, ssim_weight: float = PH_SSIM_WEIGHT) -> Tensor:
    """Monodepth2 error map ``w (1 - SSIM) / 2 + (1 - w) |target - estimate|`` averaged over channels -> [B, H, W]."""
    l1 = (target - estimate).abs().mean(1)
    dssim = ((1.0 - ssim(target, estimate)) / 2).mean(1)
    return ssim_weight * dssim + (1.0 - ssim_weight) * l1


class PairErrors(NamedTuple):
    """Photometric errors of directed view pairs (A, B)."""

    error: Tensor
    """Float[P, H, W] error map in A's pixels."""
    valid: Tensor
    """Bool[P, H, W] valid warp."""

    def masked_mean(self) -> Tensor:
        """Float[P]: mean error over valid pixels; NaN for a pair without any."""
        count = self.valid.sum(dim=(1, 2))
        total = (self.error * self.valid).sum(dim=(1, 2))
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def pair_errors(
    views: ViewSet,
    a_index: Tensor,
    b_index: Tensor,
    tau: Optional[float] = DEFAULT_TAU,
    ssim_weight: float = PH_SSIM_WEIGHT,
) -> PairErrors:
    """Photometric errors of the directed pairs (a_index[k], b_index[k]) (Long[P] each) of ``views``."""
    a_to_b = views.viewmats[b_index] @ invert_rigid(views.viewmats[a_index])
    warp = warp_views(
        views.images[b_index],
        views.depths[a_index],
        views.Ks[a_index],
        views.Ks[b_index],
        a_to_b,
        depth_b=views.depths[b_index],
        tau=tau,
    )
    return PairErrors(photometric_error(views.images[a_index], warp.image, ssim_weight), warp.valid)


def photometric_consistency(
    images: Tensor,
    depths: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    tau: Optional[float] = DEFAULT_TAU,
    ssim_weight: float = PH_SSIM_WEIGHT,
) -> Tensor:
    """Ph-Loss (spec §3.8): mean over the M - 1 adjacent pairs (m, m + 1) of the masked mean photometric error.

    Args:
        images: Float[M, 3, H, W] in [0, 1], ordered so that consecutive views are neighbours.
        depths: Float[M, H, W] z-depth in the units of ``viewmats`` (align VGGT depth first, see
            :func:`depth_scale_to_cameras`, or use VGGT's own cameras).
        viewmats: Float[M, 4, 4] OpenCV world-to-camera. Ks: Float[M, 3, 3].
        tau: relative depth-agreement tolerance (None: no occlusion test).

    Returns:
        Float[] loss (differentiable); pairs without a valid pixel are left out, NaN when no pair has one.
    """
    views = ViewSet(images, depths, viewmats, Ks)
    m = len(views)
    if m < 2:
        raise ValueError(f"Ph-Loss needs at least 2 views, got {m}")
    idx = torch.arange(m - 1, device=images.device)
    per_pair = pair_errors(views, idx, idx + 1, tau, ssim_weight).masked_mean()
    ok = ~per_pair.isnan()
    if not bool(ok.any()):
        return per_pair.new_tensor(float("nan"))
    return per_pair[ok].mean()
