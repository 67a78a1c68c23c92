"""core.rasterize on CPU: parity with a brute-force reference, gradients, fused SH + features, meta, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsstudio_ext.core.rasterize import rasterize
from gsstudio_ext.core.sh import RGB2SH, SH2RGB, eval_sh, sh_to_view_colors
from gsstudio_ext.core.torch_rasterizer import bin_gaussians, cpu_threads, rasterize_to_pixels

try:  # tests/ is not a package: works both with rootdir on sys.path and with pytest's default rootdir insertion
    from tests.core.reference_rasterizer import ref_rasterization, ref_sh_basis
except ImportError:  # pragma: no cover
    from reference_rasterizer import ref_rasterization, ref_sh_basis

W, H = 40, 30  # not multiples of 16: partial tiles


def _rot_y(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def make_cameras(n_cams: int = 2, w: int = W, h: int = H, dtype=torch.float32):
    """Camera 0 at the origin looking down +z (OpenCV); camera 1 turned and shifted."""
    vms, ks = [], []
    for i in range(n_cams):
        vm = torch.eye(4)
        if i > 0:
            vm[:3, :3] = _rot_y(0.3 * i)
            vm[:3, 3] = torch.tensor([0.3, -0.1, 0.2]) * i
        vms.append(vm)
        ks.append(torch.tensor([[35.0, 0.0, w / 2 + 1.3], [0.0, 33.0, h / 2 - 0.7], [0.0, 0.0, 1.0]]))
    return torch.stack(vms).to(dtype), torch.stack(ks).to(dtype)


def make_scene(seed: int, n: int = 30, dtype=torch.float32, special: bool = True):
    """Random Gaussians in front of camera 0, plus hard cases: behind the camera, inside the near plane, just
    past it, off-screen, far off-axis (Jacobian clamp), and a dense high-opacity cluster (T stop, alpha clamp)."""
    g = torch.Generator().manual_seed(seed)
    z = 2.5 + 3.5 * torch.rand(n, generator=g)
    xy = (torch.rand(n, 2, generator=g) - 0.5) * 1.6 * z[:, None] * torch.tensor([0.6, 0.45])
    means = torch.cat([xy, z[:, None]], dim=1)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.03), math.log(0.35), generator=g))
    opac = 0.05 + 0.9 * torch.rand(n, generator=g)
    if special:
        sm = [[0.0, 0.0, -2.0], [0.001, 0.0, 0.005], [0.01, 0.0, 0.03], [5.0, 0.0, 3.0], [1.7, 0.1, 3.0]]
        sm += [[3.0, -0.5, 3.0]] + [[0.1 + 0.04 * k, 0.1 - 0.03 * k, 4.0 + 0.1 * k] for k in range(6)]
        sm += [[-0.08, 0.7 / 33.0, 3.5]]  # centred on pixel (20, 14) of camera 0: alpha clamps at 0.999
        ss = [[0.2] * 3, [0.1] * 3, [0.005] * 3, [0.1] * 3, [0.2, 0.1, 0.1], [0.9] * 3] + [[0.35, 0.3, 0.25]] * 6
        ss += [[0.1] * 3]
        so = [0.9, 0.9, 0.7, 0.9, 0.8, 0.6] + [1.0, 0.99, 0.98, 0.97, 1.0, 0.95] + [1.0]
        means = torch.cat([means, torch.tensor(sm)])
        scales = torch.cat([scales, torch.tensor(ss)])
        opac = torch.cat([opac, torch.tensor(so)])
    m = means.shape[0]
    quats = torch.randn(m, 4, generator=g) * 2.0  # unnormalised on purpose
    return means.to(dtype), quats.to(dtype), scales.to(dtype), opac.to(dtype), g


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _compare(args: dict, tol: float = 1e-5, ed_alpha_min: float = 0.0) -> dict:
    out_c, out_a, meta = rasterize(**args, backend="torch")
    ref_args = {k: (_np(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    for k in ("packed", "absgrad", "sparse_grad", "channel_chunk"):
        ref_args.pop(k, None)
    ref_c, ref_a, ref_meta = ref_rasterization(**ref_args)
    assert out_c.shape == ref_c.shape and out_a.shape == ref_a.shape
    np.testing.assert_array_equal(meta["radii"].numpy(), ref_meta["radii"])
    vis = ref_meta["radii"] > 0
    for k in ("means2d", "depths", "conics"):
        err = np.abs(_np(meta[k])[vis] - ref_meta[k][vis]).max() if vis.any() else 0.0
        scale = max(1.0, np.abs(ref_meta[k][vis]).max()) if vis.any() else 1.0
        assert err / scale < 1e-5, (k, err)
    err_a = np.abs(_np(out_a) - ref_a).max()
    diff = np.abs(_np(out_c) - ref_c)
    if args.get("render_mode", "RGB") in ("ED", "RGB+ED") and ed_alpha_min > 0:
        diff[..., -1] *= ref_a[..., 0] > ed_alpha_min  # ED divides float32 rounding by tiny alphas
    assert err_a < tol, err_a
    assert diff.max() < tol, diff.max()
    assert ref_a.max() > 0.9 and ref_a.min() < 0.1  # scene is neither empty nor saturated
    return ref_meta["stats"]


def _base_args(seed: int, dtype=torch.float32, n_cams: int = 2, d: int = 3, **kw) -> dict:
    means, quats, scales, opac, g = make_scene(seed, dtype=dtype)
    vms, ks = make_cameras(n_cams, dtype=dtype)
    colors = torch.rand(means.shape[0], d, generator=g).to(dtype)
    args = dict(means=means, quats=quats, scales=scales, opacities=opac, colors=colors, viewmats=vms, Ks=ks)
    args.update(width=W, height=H)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "seed,kw",
    [
        (0, {}),
        (1, {"render_mode": "RGB+D"}),
        (2, {"render_mode": "RGB+ED", "rasterize_mode": "antialiased"}),
        (3, {"render_mode": "D"}),
        (4, {"render_mode": "ED", "eps2d": 0.1}),
        (5, {"tile_size": 8, "radius_clip": 1.5, "near_plane": 0.025}),
        (6, {"camera_model": "ortho"}),
    ],
)
def test_matches_reference(seed: int, kw: dict) -> None:
    args = _base_args(seed, **kw)
    if kw.get("camera_model") == "ortho":
        args["Ks"][:, :2, :2] *= 4.0 / 35.0 * 3.0  # ortho: pixels per world unit
    if seed % 2 == 0:
        args["backgrounds"] = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed))
    stats = _compare(args, ed_alpha_min=0.05)
    assert stats["stopped_pixels"] > 0 and stats["skipped_in_tile"] > 0
    if kw.get("rasterize_mode") != "antialiased":  # compensation keeps opacities below 1
        assert stats["alpha_clamped"] > 0
    if kw.get("camera_model", "pinhole") == "pinhole":
        assert stats["jacobian_clamped"] > 0


def test_matches_reference_per_camera_features_and_sh() -> None:
    args = _base_args(7, d=5)
    args["colors"] = torch.rand(2, *args["colors"].shape, generator=torch.Generator().manual_seed(1))
    args["backgrounds"] = torch.rand(2, 5)
    _compare(args)
    for deg, percam in ((0, False), (2, True), (4, False)):
        args = _base_args(8 + deg)
        n = args["means"].shape[0]
        sh = torch.randn(n, 25, 3, generator=torch.Generator().manual_seed(deg)) * 0.4
        args["colors"] = sh.expand(2, -1, -1, -1).clone() if percam else sh
        args["sh_degree"] = deg
        _compare(args)


def test_matches_reference_float64() -> None:
    args = _base_args(11, dtype=torch.float64, render_mode="RGB+ED")
    args["backgrounds"] = torch.rand(2, 3, dtype=torch.float64)
    _compare(args, tol=1e-9)


def test_sh_matches_3dgs_polynomials() -> None:
    dirs = torch.randn(20, 3, dtype=torch.float64) * 3.0
    coeffs = torch.randn(20, 25, 3, dtype=torch.float64)
    for deg in range(5):
        ours = eval_sh(deg, dirs, coeffs).numpy()
        ref = np.stack([ref_sh_basis(deg, d) @ c[: (deg + 1) ** 2] for d, c in zip(dirs.numpy(), coeffs.numpy())])
        np.testing.assert_allclose(ours, ref, atol=1e-12)
    rgb = torch.rand(7, 3)
    torch.testing.assert_close(SH2RGB(RGB2SH(rgb)), rgb)


def test_gradcheck_full_pipeline() -> None:
    torch.manual_seed(0)
    n = 5
    means = torch.cat([(torch.rand(n, 2) - 0.5) * 1.2, 3.0 + torch.rand(n, 1)], 1).double()
    quats = torch.randn(n, 4, dtype=torch.float64)
    scales = (0.15 + 0.2 * torch.rand(n, 3)).double()
    opac = (0.3 + 0.6 * torch.rand(n)).double()
    colors = torch.rand(n, 3, dtype=torch.float64)
    bg = torch.rand(1, 3, dtype=torch.float64)
    vm, K = make_cameras(1, 9, 8, dtype=torch.float64)
    K[:, :2, :2] = 7.0
    inputs = [t.requires_grad_(True) for t in (means, quats, scales, opac, colors, bg)]

    def fn(m, q, s, o, c, b):
        out, alpha, _ = rasterize(
            m, q, s, o, c, vm, K, 9, 8, backgrounds=b, render_mode="RGB+ED", rasterize_mode="antialiased",
            backend="torch",
        )  # fmt: skip
        return out, alpha

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_rasterize_to_pixels() -> None:
    """The custom backward on its own, including means2d and conics as leaves (what densification reads)."""
    torch.manual_seed(1)
    C, n, w, h = 2, 5, 11, 9
    means2d = (torch.rand(C, n, 2) * torch.tensor([w, h])).double()
    L = torch.randn(C, n, 2, 2).double() * 0.2 + torch.eye(2).double() * 0.5
    conic_m = L @ L.transpose(-1, -2)
    conics = torch.stack([conic_m[..., 0, 0], conic_m[..., 0, 1], conic_m[..., 1, 1]], -1)
    colors = torch.rand(C, n, 4, dtype=torch.float64)
    opac = (0.2 + 0.7 * torch.rand(C, n)).double()
    bg = torch.rand(C, 4, dtype=torch.float64)
    radii = torch.full((C, n), 6, dtype=torch.int32)
    depths = torch.rand(C, n, dtype=torch.float64)
    plan = bin_gaussians(means2d, conics, opac, radii, depths, w, h, tile_size=8, block_size=4)
    assert len(plan.chunks) > 0
    inputs = [t.requires_grad_(True) for t in (means2d, conics, colors, opac, bg)]
    assert torch.autograd.gradcheck(
        lambda m, q, c, o, b: rasterize_to_pixels(m, q, c, o, plan, b), inputs, eps=1e-6, atol=1e-5
    )


def test_fused_sh_rgb_plus_features_equals_separate_renders() -> None:
    args = _base_args(12)
    n = args["means"].shape[0]
    g = torch.Generator().manual_seed(3)
    sh = (torch.randn(n, 16, 3, generator=g) * 0.3).requires_grad_(True)
    feats = torch.randn(n, 13, generator=g).requires_grad_(True)
    base = {k: args[k] for k in ("means", "quats", "scales", "opacities", "viewmats", "Ks", "width", "height")}
    bg = torch.rand(2, 16, generator=g)
    rgb = sh_to_view_colors(args["means"], sh, args["viewmats"], 3)  # [C, N, 3]
    fused = torch.cat([rgb, feats[None].expand(2, -1, -1)], dim=-1)  # [C, N, 16]: one pass
    out, alpha, _ = rasterize(**base, colors=fused, backgrounds=bg, render_mode="RGB+ED", backend="torch")
    out_rgb, alpha_rgb, _ = rasterize(**base, colors=sh, sh_degree=3, backgrounds=bg[:, :3], backend="torch")
    out_f, _, _ = rasterize(**base, colors=feats, backgrounds=bg[:, 3:], render_mode="RGB+ED", backend="torch")
    assert out.shape == (2, H, W, 17)
    torch.testing.assert_close(out[..., :3], out_rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 3:], out_f, atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha, alpha_rgb, atol=0, rtol=0)
    # gradients agree as well
    w = torch.randn(2, H, W, 16, generator=g)
    g_fused = torch.autograd.grad((out[..., :16] * w).sum(), [sh, feats])
    g_rgb = torch.autograd.grad((out_rgb * w[..., :3]).sum(), sh)[0]
    g_f = torch.autograd.grad((out_f[..., :13] * w[..., 3:]).sum(), feats)[0]
    torch.testing.assert_close(g_fused[0], g_rgb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_fused[1], g_f, atol=1e-5, rtol=1e-4)


def test_meta_and_densification_fields() -> None:
    args = _base_args(13)
    params = [args[k].requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")]
    out, alpha, meta = rasterize(**args, absgrad=True, backend="torch")
    C, N = 2, args["means"].shape[0]
    assert out.shape == (C, H, W, 3) and alpha.shape == (C, H, W, 1)
    assert meta["means2d"].shape == (C, N, 2) and meta["conics"].shape == (C, N, 3)
    assert meta["radii"].shape == (C, N) and meta["radii"].dtype == torch.int32
    assert meta["depths"].shape == (C, N) and meta["opacities"].shape == (C, N)
    assert (meta["width"], meta["height"], meta["n_cameras"], meta["tile_size"]) == (W, H, C, 16)
    assert meta["gaussian_ids"] is None and meta["camera_ids"] is None
    assert not meta["means2d"].is_leaf and meta["means2d"].requires_grad
    radii = meta["radii"]
    assert (radii[0, -13:-7] == 0).sum() >= 3  # behind, inside near plane, off-screen are culled
    meta["means2d"].retain_grad()
    target = torch.rand(C, H, W, 3, generator=torch.Generator().manual_seed(0))
    ((out - target) ** 2).mean().backward()
    grad, absg = meta["means2d"].grad, meta["means2d"].absgrad
    assert grad.shape == absg.shape == (C, N, 2)
    assert (absg >= grad.abs() - 1e-9).all() and (absg > grad.abs() * 1.01).any()
    assert (grad[radii == 0] == 0).all() and (absg[radii == 0] == 0).all() and (grad[radii > 0] != 0).any()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_absgrad_is_sum_of_per_pixel_abs_gradients() -> None:
    args = _base_args(14, n_cams=1)
    w, h = 12, 10
    args.update(width=w, height=h)
    args["Ks"][:, :2, :2] = 12.0
    args["Ks"][:, :2, 2] = torch.tensor([6.0, 5.0])
    for k in ("means", "scales", "colors"):
        args[k].requires_grad_(True)
    out, alpha, meta = rasterize(**args, absgrad=True, backend="torch")
    m2d = meta["means2d"]
    m2d.retain_grad()
    wts = torch.randn(1, h, w, 3, generator=torch.Generator().manual_seed(0))
    wa = torch.randn(1, h, w, 1, generator=torch.Generator().manual_seed(1))
    per_pix = (out * wts).sum(-1, keepdim=True) + alpha * wa  # [1, h, w, 1]: one loss term per pixel
    expected = torch.zeros_like(m2d)
    for i in range(h):
        for j in range(w):
            expected += torch.autograd.grad(per_pix[0, i, j, 0], m2d, retain_graph=True)[0].abs()
    per_pix.sum().backward()
    torch.testing.assert_close(m2d.absgrad, expected, atol=1e-5, rtol=1e-4)
    assert (m2d.absgrad > 0).sum() >= 10


def test_default_strategy_densifies_on_cpu() -> None:
    """gsplat's DefaultStrategy (pure torch) runs on the CPU meta: grad2d accumulates, Gaussians get cloned/split."""
    from gsplat.strategy import DefaultStrategy

    means, quats, scales, opac, _ = make_scene(15, n=60, special=False)
    vms, ks = make_cameras(1)
    params = torch.nn.ParameterDict(
        {
            "means": means,
            "quats": quats,
            "scales": torch.log(scales),
            "opacities": torch.logit(opac),
            "colors": torch.rand(means.shape[0], 3),
        }
    )
    opts = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strat = DefaultStrategy(refine_start_iter=0, refine_every=2, grow_grad2d=1e-9, absgrad=True, verbose=False)
    strat.check_sanity(params, opts)
    state = strat.initialize_state()
    n0 = means.shape[0]
    for step in range(3):
        out, _, info = rasterize(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            params["colors"], vms, ks, W, H, absgrad=True, backend="torch",
        )  # fmt: skip
        strat.step_pre_backward(params, opts, state, step, info)
        out.square().mean().backward()
        strat.step_post_backward(params, opts, state, step, info, packed=False)
        for o in opts.values():
            o.step()
            o.zero_grad()
    assert params["means"].shape[0] > n0


def test_block_culling_is_exact_on_a_dense_scene() -> None:
    """Sub-tile blocks drop a Gaussian only where its alpha < 1/255: same output and grads as whole 16 px tiles."""
    g = torch.Generator().manual_seed(5)
    n, w, h = 2000, 72, 56
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.8, 0.6, 0.4]) + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(-4.5, -1.5, generator=g))
    opac = torch.rand(n, generator=g)
    vm, K = make_cameras(1, w, h)
    K[:, :2, :2] = 60.0
    proj_args = (means, quats, scales, opac, torch.rand(n, 5, generator=g), vm, K, w, h)
    _, _, meta = rasterize(*proj_args, backend="torch")
    m2d, con, op = (meta[k].detach().requires_grad_(True) for k in ("means2d", "conics", "opacities"))
    col = torch.rand(1, n, 5, generator=g).requires_grad_(True)
    wts = torch.randn(1, h, w, 5, generator=g)
    results = []
    for bs in (16, 8, 4):
        plan = bin_gaussians(m2d, con, op, meta["radii"], meta["depths"], w, h, tile_size=16, block_size=bs)
        out, alpha = rasterize_to_pixels(m2d, con, col, op, plan, absgrad=True)
        grads = torch.autograd.grad((out * wts).sum() + alpha.sum(), [m2d, con, col, op])
        results.append((out, alpha, *grads, m2d.absgrad))
    assert results[0][1].mean() > 0.5  # dense: many pixels stop early
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_empty_and_fully_culled_scenes_render_background() -> None:
    vms, ks = make_cameras(2)
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    z = torch.zeros
    out, alpha, meta = rasterize(z(0, 3), z(0, 4), z(0, 3), z(0), z(0, 3), vms, ks, W, H, backgrounds=bg)
    assert torch.equal(out, bg[:, None, None, :].expand(2, H, W, 3)) and (alpha == 0).all()
    behind = torch.tensor([[0.0, 0.0, -3.0]]).requires_grad_(True)
    out, alpha, meta = rasterize(behind, torch.ones(1, 4), torch.ones(1, 3), torch.ones(1), torch.ones(1, 3), vms[:1],
                                 ks[:1], W, H, render_mode="RGB+ED")  # fmt: skip
    assert (meta["radii"] == 0).all() and (alpha == 0).all() and (out == 0).all()
    out.sum().backward()
    assert torch.equal(behind.grad, torch.zeros(1, 3))


def test_packed_is_ignored_with_identical_results() -> None:
    args = _base_args(16)
    a, _, _ = rasterize(**args, packed=False, backend="torch")
    b, _, meta = rasterize(**args, packed=True, backend="torch")
    assert torch.equal(a, b) and meta["radii"].shape == (2, args["means"].shape[0])


def test_channel_counts_and_chunk_invariance() -> None:
    args = _base_args(17, d=40)
    out, _, _ = rasterize(**args, backend="torch")
    out_small, _, _ = rasterize(**{**args, "colors": args["colors"][:, :7]}, backend="torch", channel_chunk=4)
    assert out.shape[-1] == 40
    torch.testing.assert_close(out[..., :7], out_small, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"means": torch.zeros(5, 2)}, "means must be"),
        ({"quats": torch.zeros(3, 4)}, "quats must be"),
        ({"scales": torch.zeros(43, 2)}, "scales must be"),
        ({"opacities": torch.zeros(43, 1)}, "opacities must be"),
        ({"colors": torch.zeros(41, 3)}, "colors must be"),
        ({"colors": torch.zeros(43, 4, 3), "sh_degree": 2}, "needs K >= 9"),
        ({"colors": torch.zeros(43, 9, 4), "sh_degree": 2}, "SH colors must be"),
        ({"colors": torch.zeros(43, 25, 3), "sh_degree": 5}, "sh_degree must be"),
        ({"viewmats": torch.zeros(2, 3, 4)}, "viewmats must be"),
        ({"Ks": torch.zeros(1, 3, 3)}, "Ks must be"),
        ({"backgrounds": torch.zeros(2, 4)}, "backgrounds must be"),
        ({"render_mode": "RGBD"}, "render_mode must be"),
        ({"rasterize_mode": "aa"}, "rasterize_mode must be"),
        ({"width": 0}, "bad image size"),
        ({"Ks": torch.zeros(2, 3, 3, dtype=torch.float64)}, "Ks has dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(change: dict, match: str) -> None:
    args = _base_args(18)
    assert args["means"].shape[0] == 43
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rasterize(**args, backend="torch")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"sparse_grad": True, "packed": True}, "sparse_grad"),
        ({"camera_model": "fisheye"}, "fisheye"),
        ({"distributed": True}, "distributed"),
        ({"backend": "gsplat"}, "CUDA"),
    ],
)
def test_unsupported_on_torch_backend(kw: dict, match: str) -> None:
    with pytest.raises(NotImplementedError, match=match):
        rasterize(**_base_args(19), **kw)


def test_cpu_threads_restores_setting() -> None:
    n = torch.get_num_threads()
    with cpu_threads(torch.device("cpu")):
        with cpu_threads(torch.device("cpu")):
            assert torch.get_num_threads() <= max(n, 1)
        rasterize(**_base_args(20), backend="torch")
    assert torch.get_num_threads() == n
