"""Real spherical harmonics up to degree 4, with gsplat 1.4.0's constants, basis order and conventions.

gsplat evaluates `sum_k basis_k(dir / |dir|) * coeffs[k]` over the first (degree + 1)^2 coefficients
(the coefficient tensor may hold more), and `rasterization()` then applies `clamp_min(rgb + 0.5, 0)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814
"""Degree-0 basis constant, 1 / (2 sqrt(pi))."""

MAX_SH_DEGREE = 4


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients for a degree: (degree + 1)^2."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SH degree must be in [0, {MAX_SH_DEGREE}], got {degree}")
    return (degree + 1) ** 2


def RGB2SH(rgb: Tensor) -> Tensor:  # noqa: N802 (names match nerfstudio / gsplat utilities)
    """Degree-0 coefficient that renders `rgb` (before the +0.5 offset is added back)."""
    return (rgb - 0.5) / SH_C0


def SH2RGB(sh: Tensor) -> Tensor:  # noqa: N802
    """Colour of a degree-0 coefficient."""
    return sh * SH_C0 + 0.5


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """SH basis values for unit directions.

    dirs: [..., 3] (normalised here); returns [..., (degree + 1)^2] in gsplat's order.
    """
    n = num_sh_bases(degree)
    out = [torch.full_like(dirs[..., 0], SH_C0)]
    if degree >= 1:  # (degree 0 ignores dirs, like gsplat)
        x, y, z = (dirs / dirs.norm(dim=-1, keepdim=True)).unbind(-1)
        c1 = 0.48860251190292
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        z2 = z * z
        t0b = -1.092548430592079 * z
        t1a = 0.5462742152960395
        fc1 = x * x - y * y
        fs1 = 2.0 * x * y
        p6 = 0.9461746957575601 * z2 - 0.3153915652525201
        out += [t1a * fs1, t0b * y, p6, t0b * x, t1a * fc1]
    if degree >= 3:
        t0c = -2.285228997322329 * z2 + 0.4570457994644658
        t1b = 1.445305721320277 * z
        t2a = -0.5900435899266435
        fc2 = x * fc1 - y * fs1
        fs2 = x * fs1 + y * fc1
        p12 = z * (1.865881662950577 * z2 - 1.119528997770346)
        out += [t2a * fs2, t1b * fs1, t0c * y, p12, t0c * x, t1b * fc1, t2a * fc2]
    if degree >= 4:
        t0d = z * (-4.683325804901025 * z2 + 2.007139630671868)
        t1c = 3.31161143515146 * z2 - 0.47308734787878
        t2b = -1.770130769779931 * z
        t3a = 0.6258357354491763
        fc3 = x * fc2 - y * fs2
        fs3 = x * fs2 + y * fc2
        p20 = 1.984313483298443 * z * p12 - 1.006230589874905 * p6
        out += [t3a * fs3, t2b * fs2, t1c * fs1, t0d * y, p20, t0d * x, t1c * fc1, t2b * fc2, t3a * fc3]
    basis = torch.stack(out, dim=-1)
    assert basis.shape[-1] == n
    return basis


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate SH like gsplat's `spherical_harmonics` (no +0.5, no clamp).

    dirs: [..., 3]; coeffs: [..., K, D] with K >= (degree + 1)^2; returns [..., D].
    """
    n = num_sh_bases(degree)
    if coeffs.shape[-2] < n:
        raise ValueError(f"SH degree {degree} needs {n} coefficients, got coeffs of shape {tuple(coeffs.shape)}")
    basis = sh_basis(degree, dirs)
    return (basis.unsqueeze(-1) * coeffs[..., :n, :]).sum(dim=-2)


def camera_centers(viewmats: Tensor) -> Tensor:
    """Camera centres in world space from rigid world-to-camera matrices [C, 4, 4] -> [C, 3], i.e. -R^T t.

    Closed form rather than a matrix inverse, which would synchronise a CUDA stream to check for singularity.
    """
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3:]
    return -(rot.transpose(1, 2) @ trans)[..., 0]


def sh_to_view_colors(means: Tensor, shs: Tensor, viewmats: Tensor, degree: int) -> Tensor:
    """Per-view RGB from SH, exactly as `rasterization(..., sh_degree=degree)` computes it before compositing.

    means: [N, 3]; shs: [N, K, 3] or [C, N, K, 3]; viewmats: [C, 4, 4]; returns [C, N, 3] = clamp_min(sh + 0.5, 0).
    Use it to fuse RGB with extra feature channels into one `rasterize(..., sh_degree=None)` call.
    """
    C = viewmats.shape[0]
    dirs = means[None, :, :] - camera_centers(viewmats)[:, None, :]  # [C, N, 3]
    if shs.dim() == 3:
        shs = shs.unsqueeze(0).expand(C, -1, -1, -1)
    if shs.is_cuda:  # gsplat's fused kernel: one launch instead of dozens of element-wise ops
        from gsplat import spherical_harmonics

        colors = spherical_harmonics(degree, dirs, shs)
    else:
        colors = eval_sh(degree, dirs, shs)
    return torch.clamp_min(colors + 0.5, 0.0)
