"""Brute-force reference for gsplat 1.4.0's `rasterization()`: one Gaussian and one pixel at a time, float64.

Written straight from the maths (EWA projection, 16 px tile lists, front-to-back compositing) with Python
loops and numpy, independently of `gsstudio_ext.core`. Slow: tiny inputs only (tens of Gaussians, ~40x30 px).
SH uses the 3DGS polynomial tables (a different formulation from gsplat's recurrences in `core.sh`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = [1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396]
C3 = [
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
]
C4 = [
    2.5033429417967046,
    -1.7701307697799304,
    0.9461746957575601,
    -0.6690465435572892,
    0.10578554691520431,
    -0.6690465435572892,
    0.47308734787878004,
    -1.7701307697799304,
    0.6258357354491761,
]


def ref_sh_basis(degree: int, d: np.ndarray) -> np.ndarray:
    """Real SH basis (3DGS sign convention) of one direction (any length) -> [(degree + 1)^2]."""
    x, y, z = d / np.linalg.norm(d)
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    b = [C0]
    if degree >= 1:
        b += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        b += [C2[0] * xy, C2[1] * yz, C2[2] * (2 * zz - xx - yy), C2[3] * xz, C2[4] * (xx - yy)]
    if degree >= 3:
        b += [
            C3[0] * y * (3 * xx - yy),
            C3[1] * xy * z,
            C3[2] * y * (4 * zz - xx - yy),
            C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            C3[4] * x * (4 * zz - xx - yy),
            C3[5] * z * (xx - yy),
            C3[6] * x * (xx - 3 * yy),
        ]
    if degree >= 4:
        b += [
            C4[0] * xy * (xx - yy),
            C4[1] * yz * (3 * xx - yy),
            C4[2] * xy * (7 * zz - 1),
            C4[3] * yz * (7 * zz - 3),
            C4[4] * (zz * (35 * zz - 30) + 3),
            C4[5] * xz * (7 * zz - 3),
            C4[6] * (xx - yy) * (7 * zz - 1),
            C4[7] * xz * (xx - 3 * yy),
            C4[8] * (xx * (xx - 3 * yy) - yy * (3 * xx - yy)),
        ]
    return np.array(b)


def _rotmat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def ref_project_one(mean, quat, scale, viewmat, K, W, H, eps2d, near, far, radius_clip, camera_model, aa):
    """Project one Gaussian into one camera. Returns None if culled, else a dict of its 2D quantities."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    p = R @ mean + t
    x, y, z = p
    if z < near or z > far:
        return None
    M = _rotmat(quat) @ np.diag(scale)
    cov_c = R @ (M @ M.T) @ R.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    if camera_model == "pinhole":
        tanx, tany = 0.5 * W / fx, 0.5 * H / fy
        # Jacobian evaluated at the view ray clamped to the frustum widened by 0.3 tan(fov) per side
        u = min((W - cx) / fx + 0.3 * tanx, max(-(cx / fx + 0.3 * tanx), x / z))
        v = min((H - cy) / fy + 0.3 * tany, max(-(cy / fy + 0.3 * tany), y / z))
        jclamp = u != x / z or v != y / z
        J = np.array([[fx / z, 0.0, -fx * u / z], [0.0, fy / z, -fy * v / z]])
        m2 = np.array([fx * x / z + cx, fy * y / z + cy])
    else:  # ortho
        jclamp = False
        J = np.array([[fx, 0.0, 0.0], [0.0, fy, 0.0]])
        m2 = np.array([fx * x + cx, fy * y + cy])
    cov2 = J @ cov_c @ J.T
    det0 = np.linalg.det(cov2)
    cov2 = cov2 + eps2d * np.eye(2)
    det = np.linalg.det(cov2)
    if det <= 0:
        return None
    lam_max = 0.5 * np.trace(cov2) + math.sqrt(max(0.01, (0.5 * np.trace(cov2)) ** 2 - det))
    radius = math.ceil(3.0 * math.sqrt(lam_max))
    if radius <= radius_clip:
        return None
    if m2[0] + radius <= 0 or m2[0] - radius >= W or m2[1] + radius <= 0 or m2[1] - radius >= H:
        return None
    inv = np.linalg.inv(cov2)
    comp = math.sqrt(max(0.0, det0 / det)) if aa else 1.0
    conic = np.array([inv[0, 0], inv[0, 1], inv[1, 1]])
    return dict(mean2d=m2, depth=z, conic=conic, radius=radius, comp=comp, jclamp=jclamp)


def ref_rasterization(
    means: np.ndarray,
    quats: np.ndarray,
    scales: np.ndarray,
    opacities: np.ndarray,
    colors: np.ndarray,
    viewmats: np.ndarray,
    Ks: np.ndarray,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    tile_size: int = 16,
    backgrounds: Optional[np.ndarray] = None,
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    camera_model: str = "pinhole",
):
    """Same arguments and outputs as gsplat's `rasterization` (numpy, float64, non-packed meta subset).

    meta["stats"] counts the hard cases the scene exercised (clamped Jacobians and alphas, pixels stopped at
    T <= 1e-4, listed Gaussians skipped for alpha < 1/255)."""
    N, C = means.shape[0], viewmats.shape[0]
    aa = rasterize_mode == "antialiased"
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    outs, alphas = [], []
    meta = dict(
        radii=np.zeros((C, N), np.int32),
        means2d=np.zeros((C, N, 2)),
        depths=np.zeros((C, N)),
        conics=np.zeros((C, N, 3)),
        stats=dict(jacobian_clamped=0, alpha_clamped=0, stopped_pixels=0, skipped_in_tile=0),
    )
    stats = meta["stats"]
    for c in range(C):
        campos = np.linalg.inv(viewmats[c])[:3, 3]
        items = []  # (depth, n, mean2d, conic, opacity, feature, tile rect)
        for n in range(N):
            g = ref_project_one(
                means[n], quats[n], scales[n], viewmats[c], Ks[c], width, height, eps2d, near_plane, far_plane,
                radius_clip, camera_model, aa,
            )  # fmt: skip
            if g is None:
                continue
            meta["radii"][c, n], meta["means2d"][c, n] = g["radius"], g["mean2d"]
            meta["depths"][c, n], meta["conics"][c, n] = g["depth"], g["conic"]
            stats["jacobian_clamped"] += g["jclamp"]
            col = colors[c, n] if colors.ndim == (3 if sh_degree is None else 4) else colors[n]
            if sh_degree is not None:
                basis = ref_sh_basis(sh_degree, means[n] - campos)
                col = np.maximum(basis @ col[: len(basis)] + 0.5, 0.0)
            if render_mode in ("D", "ED"):
                feat = np.array([g["depth"]])
            elif render_mode in ("RGB+D", "RGB+ED"):
                feat = np.concatenate([col, [g["depth"]]])
            else:
                feat = np.asarray(col, dtype=np.float64)
            mx, my = g["mean2d"]
            r = g["radius"]
            rect = (
                min(max(0, math.floor((mx - r) / tile_size)), tw),
                min(max(0, math.ceil((mx + r) / tile_size)), tw),
                min(max(0, math.floor((my - r) / tile_size)), th),
                min(max(0, math.ceil((my + r) / tile_size)), th),
            )
            items.append((g["depth"], n, g["mean2d"], g["conic"], opacities[n] * g["comp"], feat, rect))
        items.sort(key=lambda it: (it[0], it[1]))
        if render_mode in ("D", "ED"):
            D = 1
        else:
            D = (3 if sh_degree is not None else colors.shape[-1]) + (1 if render_mode in ("RGB+D", "RGB+ED") else 0)
        bg = np.zeros(D)
        if backgrounds is not None and render_mode not in ("D", "ED"):
            bg[: backgrounds.shape[1]] = backgrounds[c]
        img = np.zeros((height, width, D))
        alp = np.zeros((height, width, 1))
        for i in range(height):
            for j in range(width):
                tx, ty = j // tile_size, i // tile_size
                px, py = j + 0.5, i + 0.5
                T, acc = 1.0, np.zeros(D)
                for _, _, m2, conic, opac, feat, (x0, x1, y0, y1) in items:
                    if not (x0 <= tx < x1 and y0 <= ty < y1):
                        continue  # this Gaussian is not in the pixel's tile list
                    dx, dy = m2[0] - px, m2[1] - py
                    sigma = 0.5 * (conic[0] * dx * dx + conic[2] * dy * dy) + conic[1] * dx * dy
                    alpha = min(0.999, opac * math.exp(-sigma))
                    if sigma < 0 or alpha < 1.0 / 255.0:
                        stats["skipped_in_tile"] += 1
                        continue
                    if T * (1 - alpha) <= 1e-4:
                        stats["stopped_pixels"] += 1
                        break
                    stats["alpha_clamped"] += alpha == 0.999
                    acc += feat * alpha * T
                    T *= 1 - alpha
                img[i, j] = acc + T * bg
                alp[i, j, 0] = 1 - T
        if render_mode in ("ED", "RGB+ED"):
            img[..., -1:] = img[..., -1:] / np.maximum(alp, 1e-10)
        outs.append(img)
        alphas.append(alp)
    return np.stack(outs), np.stack(alphas), meta
