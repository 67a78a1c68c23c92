"""Differentiable pure-torch 3D Gaussian rasterizer reproducing gsplat 1.4.0's maths (runs on any device).

Three stages, as in gsplat:
1. `project_gaussians`: EWA projection (plain torch ops, differentiated by autograd).
2. `bin_gaussians`: which Gaussians each pixel block sees, in depth order (no gradients).
3. `rasterize_to_pixels`: front-to-back alpha compositing, a custom autograd Function with gsplat's
   analytic backward (per pixel block, recomputed in backward to bound memory), including `absgrad`.

Conventions kept from gsplat: pixel centres at +0.5, `eps2d` added to the 2D covariance (with the optional
antialiasing compensation sqrt(det / det_blurred)), the perspective Jacobian clamped to the frustum plus
0.3 * tan(fov) on each side, radius = ceil(3 sqrt(largest eigenvalue)), a Gaussian listed in every 16 px tile its
radius box touches, alpha = min(0.999, opacity * exp(-sigma)), alphas < 1/255 skipped, and a pixel stops
before the Gaussian that would bring its transmittance to <= 1e-4.

Speed: compositing runs on blocks of `block_size` (default 8) pixels squared inside gsplat's tiles. A Gaussian
is dropped from a block only when its alpha is provably < 1/255 at every pixel centre in the block, so the
output is the same as per-tile compositing while far less work is padded.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ALPHA_MIN = 1.0 / 255.0
"""Alphas below this are skipped (gsplat)."""
ALPHA_MAX = 0.999
"""Alpha clamp (gsplat)."""
T_MIN = 1e-4
"""A pixel stops before the Gaussian that would bring its transmittance to <= this (gsplat)."""
CPU_THREADS = int(os.environ.get("GSSTUDIO_RASTER_THREADS", "1"))
"""Intra-op threads while rasterizing on CPU (0 = leave torch's setting). The work is many small ops: extra
threads gain nothing and cost a lot when cores are shared (spinning OpenMP workers steal the main thread's core)."""


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextmanager
def cpu_threads(device: torch.device) -> Iterator[None]:
    """Use `CPU_THREADS` intra-op threads for CPU work inside the block (no-op on other devices).

    Re-entrant and safe with several rendering threads (viewer + trainer): the first entrant saves torch's
    setting, the last one out restores it.
    """
    global _threads_users, _threads_saved
    if device.type != "cpu" or CPU_THREADS <= 0:
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved > CPU_THREADS:
                torch.set_num_threads(CPU_THREADS)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved > CPU_THREADS:
                torch.set_num_threads(_threads_saved)


# ----------------------------------------------------------------------------------------------- projection


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances R diag(s)^2 R^T from quats [N, 4] (wxyz, normalised here) and scales [N, 3] -> [N, 3, 3]."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)
    m = rot * scales[..., None, :]
    return m @ m.transpose(-1, -2)


@dataclass
class Projection:
    """Per-camera projected Gaussians (entries of culled Gaussians are 0)."""

    radii: Tensor
    """[C, N] int32 pixel radius, 0 = culled."""
    means2d: Tensor
    """[C, N, 2] pixel-space centres."""
    depths: Tensor
    """[C, N] camera-space z."""
    conics: Tensor
    """[C, N, 3] upper triangle (a, b, c) of the inverse blurred 2D covariance."""
    compensations: Optional[Tensor]
    """[C, N] antialiasing opacity factor sqrt(det / det_blurred), or None."""


def project_gaussians(
    means: Tensor,
    covars: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
    camera_model: str = "pinhole",
) -> Projection:
    """gsplat's `fully_fused_projection` (non-packed) for means [N, 3], world covars [N, 3, 3] and C cameras."""
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]  # [C, 3]
    mean_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C, N, 3]
    covar_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # R Sigma R^T, [C, N, 3, 3]
    x, y, z = mean_c.unbind(-1)
    in_depth = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keep culled entries finite (their gradients are 0)

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    zero = torch.zeros_like(z)
    if camera_model == "pinhole":
        tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
        lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
        lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
        rz = 1.0 / z
        rz2 = rz * rz
        tx = z * torch.clamp(x * rz, -lim_x_neg, lim_x_pos)
        ty = z * torch.clamp(y * rz, -lim_y_neg, lim_y_pos)
        J = torch.stack([fx * rz, zero, -fx * tx * rz2, zero, fy * rz, -fy * ty * rz2], dim=-1)
        mean2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    elif camera_model == "ortho":
        J = torch.stack([fx + zero, zero, zero, zero, fy + zero, zero], dim=-1)
        mean2d = torch.stack([fx * x + cx, fy * y + cy], dim=-1)
    else:
        raise NotImplementedError(
            f"camera_model={camera_model!r} is not supported by the torch backend (use 'pinhole' or 'ortho', "
            "or backend='gsplat' on CUDA)"
        )
    J = J.reshape(*z.shape, 2, 3)
    cov2d = J @ covar_c @ J.transpose(-1, -2)  # [C, N, 2, 2]

    a, b, d = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det_orig = a * d - b * b
    a, d = a + eps2d, d + eps2d
    det = a * d - b * b
    pos_det = det > 0
    det = torch.where(pos_det, det, torch.ones_like(det))
    compensations = None
    if calc_compensations:
        ratio = det_orig / det
        pos = ratio > 0
        compensations = torch.where(pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))), zero)
    inv_det = 1.0 / det
    conics = torch.stack([d * inv_det, -b * inv_det, a * inv_det], dim=-1)

    with torch.no_grad():  # the radius is not differentiable
        half_tr = 0.5 * (a + d)
        v1 = half_tr + torch.sqrt(torch.clamp_min(half_tr * half_tr - det, 0.01))
        radius = torch.ceil(3.0 * torch.sqrt(v1))
        mx, my = mean2d[..., 0], mean2d[..., 1]
        on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        valid = in_depth & pos_det & (radius > radius_clip) & on_screen
        radii = torch.where(valid, radius, torch.zeros_like(radius)).to(torch.int32)

    means2d = torch.where(valid[..., None], mean2d, torch.zeros_like(mean2d))
    conics = torch.where(valid[..., None], conics, torch.zeros_like(conics))
    depths = torch.where(valid, mean_c[..., 2], zero)
    if compensations is not None:
        compensations = torch.where(valid, compensations, zero)
    return Projection(radii=radii, means2d=means2d, depths=depths, conics=conics, compensations=compensations)


# ----------------------------------------------------------------------------------------------- binning


@dataclass
class _Chunk:
    """A batch of pixel blocks padded to the same number of Gaussians."""

    gids: Tensor
    """[B, G] flat (camera * N + gaussian) ids in depth order; padding = the dummy id C * N."""
    pix: Tensor
    """[B, P] flat output pixel ids; pixels outside the image = the dummy id C * H * W."""
    px: Tensor
    """[B, P] pixel-centre x."""
    py: Tensor
    """[B, P] pixel-centre y."""
    cams: Tensor
    """[B] camera index of each block."""


@dataclass
class RasterPlan:
    """Depth-sorted Gaussian lists per pixel block, grouped into memory-bounded chunks."""

    n_cameras: int
    n_gaussians: int
    width: int
    height: int
    chunks: list[_Chunk]
    n_intersections: int


def bin_gaussians(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
    block_size: int = 8,
    chunk_elems: Optional[int] = None,
) -> RasterPlan:
    """List, per block of pixels, the Gaussians gsplat would composite there, in gsplat's (depth, id) order.

    A Gaussian belongs to every gsplat tile that its radius box touches; inside a tile it is kept for a block
    unless its alpha is provably below 1/255 at all of the block's pixel centres. Inputs are [C, N(, k)].
    chunk_elems bounds (block, Gaussian, pixel) triples per chunk; default: just under torch's CPU parallel grain
    on CPU (small ops run serially), 4M elsewhere (fewer kernel launches).
    """
    if tile_size % block_size != 0:
        block_size = tile_size
    C, N = radii.shape
    dev = means2d.device
    if chunk_elems is None:
        chunk_elems = 31744 if dev.type == "cpu" else 1 << 22
    with torch.no_grad():
        m = means2d.detach().reshape(-1, 2)
        cn = conics.detach().reshape(-1, 3)
        op = opacities.detach().reshape(-1)
        r = radii.reshape(-1).to(m.dtype)
        ts = float(tile_size)
        tile_w, tile_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
        # gsplat's tile box, converted to blocks
        f = tile_size // block_size
        nbx, nby = math.ceil(width / block_size), math.ceil(height / block_size)
        tx, ty, tr = m[:, 0] / ts, m[:, 1] / ts, r / ts
        bx0 = torch.floor(tx - tr).clamp(0, tile_w) * f
        bx1 = (torch.ceil(tx + tr).clamp(0, tile_w) * f).clamp_max(nbx)
        by0 = torch.floor(ty - tr).clamp(0, tile_h) * f
        by1 = (torch.ceil(ty + tr).clamp(0, tile_h) * f).clamp_max(nby)
        # box of pixel centres where alpha can reach 1/255: 0.5 d^T conic d <= log(255 * opacity)
        s = torch.log(torch.clamp_min(op / ALPHA_MIN, 1e-30)) * 1.001 + 1e-4
        a, b, c = cn.unbind(-1)
        det_c = a * c - b * b
        ok = det_c > 0
        det_c = torch.where(ok, det_c, torch.ones_like(det_c))
        ex = torch.sqrt(2.0 * s.clamp_min(0) * (c / det_c).clamp_min(0)) * 1.001 + 1e-3
        ey = torch.sqrt(2.0 * s.clamp_min(0) * (a / det_c).clamp_min(0)) * 1.001 + 1e-3
        big = torch.full_like(ex, 1e30)
        ex, ey = torch.where(ok, ex, big), torch.where(ok, ey, big)
        bs = float(block_size)
        ax0 = torch.floor(torch.ceil(m[:, 0] - ex - 0.5).clamp(-1, width) / bs)
        ax1 = torch.floor(torch.floor(m[:, 0] + ex - 0.5).clamp(-1, width) / bs) + 1
        ay0 = torch.floor(torch.ceil(m[:, 1] - ey - 0.5).clamp(-1, height) / bs)
        ay1 = torch.floor(torch.floor(m[:, 1] + ey - 0.5).clamp(-1, height) / bs) + 1
        x0, x1 = torch.maximum(bx0, ax0).long(), torch.minimum(bx1, ax1).long()
        y0, y1 = torch.maximum(by0, ay0).long(), torch.minimum(by1, ay1).long()
        nx, ny = (x1 - x0).clamp_min(0), (y1 - y0).clamp_min(0)
        live = (radii.reshape(-1) > 0) & (s > 0)
        counts = torch.where(live, nx * ny, torch.zeros_like(nx))

        # one entry per (Gaussian, block), sorted by (block, depth rank)
        gid = torch.repeat_interleave(torch.arange(C * N, device=dev), counts)
        M = gid.numel()
        first = torch.cumsum(counts, 0) - counts
        k = torch.arange(M, device=dev) - first[gid]
        nxg = nx[gid]
        blk_y = y0[gid] + torch.div(k, nxg, rounding_mode="floor")
        blk_x = x0[gid] + k % nxg.clamp_min(1)
        cam = torch.div(gid, N, rounding_mode="floor")
        blk = (cam * nby + blk_y) * nbx + blk_x
        rank = torch.empty(C * N, dtype=torch.long, device=dev)
        rank[torch.argsort(depths.detach().reshape(-1), stable=True)] = torch.arange(C * N, device=dev)
        order = torch.argsort(blk * (C * N) + rank[gid])
        gid, blk = gid[order], blk[order]
        per_blk = torch.bincount(blk, minlength=C * nby * nbx)
        start = torch.cumsum(per_blk, 0) - per_blk

        # group non-empty blocks (largest first) into chunks of about chunk_elems (block, Gaussian, pixel) triples
        P = block_size * block_size
        nz = torch.nonzero(per_blk).squeeze(1)
        nz = nz[torch.argsort(per_blk[nz], descending=True, stable=True)]
        sizes = per_blk[nz].tolist()
        jj = torch.arange(P, device=dev) % block_size
        ii = torch.div(torch.arange(P, device=dev), block_size, rounding_mode="floor")
        chunks: list[_Chunk] = []
        i = 0
        while i < len(sizes):
            G = sizes[i]
            n = max(1, chunk_elems // (G * P))
            bl = nz[i : i + n]
            i += n
            ar = torch.arange(G, device=dev)
            idx = start[bl][:, None] + ar[None, :]
            pad = ar[None, :] >= per_blk[bl][:, None]
            gids = torch.where(pad, torch.full_like(idx, C * N), gid[idx.clamp_max(M - 1)])
            bcam = torch.div(bl, nby * nbx, rounding_mode="floor")
            rem = bl % (nby * nbx)
            pxi = (rem % nbx)[:, None] * block_size + jj[None, :]
            pyi = torch.div(rem, nbx, rounding_mode="floor")[:, None] * block_size + ii[None, :]
            inside = (pxi < width) & (pyi < height)
            pix = torch.where(inside, (bcam[:, None] * height + pyi) * width + pxi, C * height * width)
            chunks.append(_Chunk(gids, pix, pxi.to(m.dtype) + 0.5, pyi.to(m.dtype) + 0.5, bcam))
    return RasterPlan(C, N, width, height, chunks, M)


# ----------------------------------------------------------------------------------------------- compositing


def _ge0(x: Tensor) -> Tensor:
    """1.0 where x >= 0 else 0.0, with float ops only (bool kernels are several times slower on CPU)."""
    return 1.0 - torch.sign(x.neg()).clamp_min_(0.0)


def _gt0(x: Tensor) -> Tensor:
    """1.0 where x > 0 else 0.0."""
    return torch.sign(x).clamp_min_(0.0)


def _composite(tab: Tensor, px: Tensor, py: Tensor) -> dict[str, Tensor]:
    """Front-to-back compositing weights for one chunk. tab: [B, G, 6] = (x, y, a, b, c, opacity)."""
    mx, my, ca, cb, cc, op = (v.unsqueeze(-1) for v in tab.unbind(-1))
    dx = mx - px[:, None, :]  # [B, G, P], mean minus pixel centre as in gsplat
    dy = my - py[:, None, :]
    sigma = (ca * dx * dx + cc * dy * dy).mul_(0.5).add_(cb * dx * dy)
    vis = torch.exp(-sigma)
    a_raw = op * vis
    alpha = a_raw.clamp_max(ALPHA_MAX)
    # skip sigma < 0 or alpha < 1/255: both signs below are <= 0 exactly when the Gaussian is drawn
    skip = torch.maximum(torch.sign(sigma.neg_()), torch.sign(ALPHA_MIN - alpha)).clamp_min_(0.0)
    alpha.mul_(1.0 - skip)
    t_in = torch.cumprod(1.0 - alpha, dim=1)  # transmittance after each Gaussian
    keep = _gt0(t_in - T_MIN)  # stop before the Gaussian that brings T to <= 1e-4
    alpha.mul_(keep)
    t_ex = torch.cat([torch.ones_like(t_in[:, :1]), t_in[:, :-1]], dim=1)  # transmittance before
    w = alpha * t_ex
    t_final = (t_in * keep).add_(1.0 - keep).amin(dim=1)  # [B, P]
    return dict(dx=dx, dy=dy, vis=vis, a_raw=a_raw, alpha=alpha, t_ex=t_ex, w=w, t_final=t_final)


def _tables(means2d: Tensor, conics: Tensor, opacities: Tensor, colors: Tensor) -> tuple[Tensor, Tensor]:
    """Flat per-(camera, Gaussian) tables with one trailing dummy row (opacity 0, never drawn)."""
    C, N = opacities.shape
    tab = torch.cat([means2d.reshape(C * N, 2), conics.reshape(C * N, 3), opacities.reshape(C * N, 1)], dim=1)
    tab = torch.cat([tab, tab.new_zeros(1, 6)], dim=0)
    col = colors.reshape(C * N, colors.shape[-1])
    col = torch.cat([col, col.new_zeros(1, col.shape[1])], dim=0)
    return tab, col


class _RasterizeToPixels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, plan: RasterPlan, absgrad: bool):
        C, H, W, D = plan.n_cameras, plan.height, plan.width, colors.shape[-1]
        tab, col = _tables(means2d, conics, opacities, colors)
        bg = backgrounds if backgrounds is not None else colors.new_zeros(C, D)
        out_c = bg[:, None, :].expand(C, H * W, D).reshape(C * H * W, D)
        out_c = torch.cat([out_c, out_c.new_zeros(1, D)], dim=0)
        out_a = colors.new_zeros(C * H * W + 1)
        for ch in plan.chunks:
            st = _composite(tab[ch.gids], ch.px, ch.py)
            rgb = torch.bmm(st["w"].transpose(1, 2), col[ch.gids]) + st["t_final"][..., None] * bg[ch.cams][:, None]
            out_c[ch.pix] = rgb
            out_a[ch.pix] = 1.0 - st["t_final"]
        ctx.plan, ctx.absgrad = plan, absgrad
        ctx.means2d_ref = means2d if absgrad else None
        ctx.has_bg = backgrounds is not None
        alphas = out_a[:-1].reshape(C, H, W, 1)
        ctx.save_for_backward(means2d, conics, colors, opacities, bg, alphas)
        return out_c[:-1].reshape(C, H, W, D), alphas

    @staticmethod
    @once_differentiable
    def backward(ctx, v_colors, v_alphas):
        with cpu_threads(v_colors.device):
            return _RasterizeToPixels._backward(ctx, v_colors, v_alphas)

    @staticmethod
    def _backward(ctx, v_colors, v_alphas):
        means2d, conics, colors, opacities, bg, alphas = ctx.saved_tensors
        plan: RasterPlan = ctx.plan
        C, N, D = plan.n_cameras, plan.n_gaussians, colors.shape[-1]
        tab, col = _tables(means2d, conics, opacities, colors)
        vc = torch.cat([v_colors.reshape(-1, D), v_colors.new_zeros(1, D)], dim=0)
        va = torch.cat([v_alphas.reshape(-1), v_alphas.new_zeros(1)], dim=0)
        v_tab = tab.new_zeros(C * N + 1, 6)
        v_col = col.new_zeros(C * N + 1, D)
        v_abs = tab.new_zeros(C * N + 1, 2) if ctx.absgrad else None
        need_col = ctx.needs_input_grad[2]
        need_geo = any(ctx.needs_input_grad[i] for i in (0, 1, 3)) or ctx.absgrad  # frozen geometry: skip
        for ch in plan.chunks:
            if not (need_col or need_geo):
                break
            tg, cg = tab[ch.gids], col[ch.gids]  # [B, G, 6], [B, G, D]
            st = _composite(tg, ch.px, ch.py)
            vcp, vap = vc[ch.pix], va[ch.pix]  # [B, P, D], [B, P]
            w, t_f, alpha = st["w"], st["t_final"], st["alpha"]
            if need_col:
                v_col.index_add_(0, ch.gids.reshape(-1), torch.bmm(w, vcp).reshape(-1, D))
            if not need_geo:
                continue
            cv = torch.bmm(cg, vcp.transpose(1, 2))  # [B, G, P] colour . dL/dpixel
            u = w * cv
            after = u.sum(dim=1, keepdim=True) - torch.cumsum(u, dim=1)  # sum over later Gaussians
            bgv = (bg[ch.cams][:, None, :] * vcp).sum(-1)  # [B, P]
            v_alpha = st["t_ex"] * cv - (after + (t_f * (bgv - vap))[:, None, :]) / (1.0 - alpha)
            v_alpha.mul_(_gt0(alpha)).mul_(_ge0(ALPHA_MAX - st["a_raw"]))  # drawn and not clamped
            v_sigma = -st["a_raw"] * v_alpha
            dx, dy = st["dx"], st["dy"]
            _, _, ca, cb, cc, _ = (v.unsqueeze(-1) for v in tg.unbind(-1))
            gx = v_sigma * (ca * dx + cb * dy)
            gy = v_sigma * (cb * dx + cc * dy)
            vsx, vsy = v_sigma * dx, v_sigma * dy
            v = torch.stack(
                [
                    gx.sum(-1),
                    gy.sum(-1),
                    0.5 * (vsx * dx).sum(-1),
                    (vsx * dy).sum(-1),
                    0.5 * (vsy * dy).sum(-1),
                    (st["vis"] * v_alpha).sum(-1),
                ],
                dim=-1,
            )
            v_tab.index_add_(0, ch.gids.reshape(-1), v.reshape(-1, 6))
            if v_abs is not None:
                ab = torch.stack([gx.abs().sum(-1), gy.abs().sum(-1)], dim=-1)
                v_abs.index_add_(0, ch.gids.reshape(-1), ab.reshape(-1, 2))
        v_tab, v_col = v_tab[:-1], v_col[:-1]
        v_means2d = v_tab[:, :2].reshape(C, N, 2)
        v_conics = v_tab[:, 2:5].reshape(C, N, 3)
        v_opac = v_tab[:, 5].reshape(C, N)
        if v_abs is not None and ctx.means2d_ref is not None:
            ctx.means2d_ref.absgrad = v_abs[:-1].reshape(C, N, 2)
        v_colors_out = v_col.reshape(C, N, D)
        v_bg = (v_colors * (1.0 - alphas)).sum(dim=(1, 2)) if ctx.has_bg else None  # T_final * dL/dpixel
        return v_means2d, v_conics, v_colors_out, v_opac, v_bg, None, None


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    plan: RasterPlan,
    backgrounds: Optional[Tensor] = None,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Composite [C, N, D] colours into ([C, H, W, D] colours, [C, H, W, 1] alphas), gsplat-style.

    means2d [C, N, 2], conics [C, N, 3], opacities [C, N], backgrounds [C, D] or None. With absgrad, backward
    stores sum over pixels of |d loss / d means2d| (per pixel, per component) in `means2d.absgrad`.
    """
    return _RasterizeToPixels.apply(means2d, conics, colors, opacities, backgrounds, plan, absgrad)
