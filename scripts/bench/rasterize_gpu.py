"""core.rasterize on a CUDA machine: parity of the pure-torch backend with gsplat, and gsplat timings.

(a) parity: a seeded random scene (default 10k Gaussians, 256x256) rendered with backend="torch" on CUDA tensors and
    with backend="gsplat": RGB+ED from SH degree 3 (with backgrounds, absgrad), 16 feature channels, and the
    antialiased mode. Prints max abs differences of colours, alphas, depths and of every gradient (also means2d.grad
    and means2d.absgrad, the densification inputs).
(b) timing: gsplat through `rasterize(..., backend="gsplat")` for 1M random Gaussians at 1920x1080: RGB from SH
    degree 3, and RGB + F feature channels fused in one call (SH evaluated to RGB first, then concatenated);
    F = 16, 32 and 13, 29 (totals on gsplat's fast channel counts 16 and 32).
    Forward and forward+backward, median of --repeats runs after --warmup, with torch.cuda.synchronize.

    source scripts/bench/gpu_env.sh  # on the GPU machine (wheels, PYTHONPATH, gsplat's JIT cache)
    python scripts/bench/rasterize_gpu.py --out rasterize_gpu.json

Import-safe and `--help`-able without CUDA; running it without CUDA exits with a message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gsstudio_ext.core.rasterize import rasterize  # noqa: E402
from gsstudio_ext.core.sh import sh_to_view_colors  # noqa: E402


def make_scene(
    n: int, width: int, height: int, seed: int, device: torch.device, sh_degree: int = 3, layers: float = 3.0
) -> dict:
    """Random Gaussians filling the view frustum of one pinhole camera at the origin (OpenCV, looking down +z)."""
    g = torch.Generator().manual_seed(seed)
    focal = 0.9 * max(width, height)
    z = 2.0 + 8.0 * torch.rand(n, generator=g)
    x = (torch.rand(n, generator=g) - 0.5) * 1.2 * width / focal * z
    y = (torch.rand(n, generator=g) - 0.5) * 1.2 * height / focal * z
    means = torch.stack([x, y, z], dim=-1)
    # projected sigma chosen so that the Gaussians cover the image about `layers` times (opacity ~0.5 on average)
    sigma_px = math.sqrt(layers * width * height / (max(n, 1) * math.pi))
    scales = (sigma_px * z / focal)[:, None] * torch.exp(0.5 * torch.randn(n, 3, generator=g))
    scene = dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=scales,
        opacities=torch.sigmoid(torch.randn(n, generator=g)),
        shs=torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3,
        feats=torch.randn(n, 64, generator=g),
        viewmats=torch.eye(4)[None],
        Ks=torch.tensor([[[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]]),
        backgrounds=torch.rand(1, 64, generator=g),
    )
    return {k: v.to(device) for k, v in scene.items()}


def _run_case(scene: dict, backend: str, case: str, width: int, height: int) -> dict:
    """Render one parity case, backprop a fixed random loss; return outputs and gradients."""
    leaves = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities")}
    kw = dict(width=width, height=height, packed=False, absgrad=True, backend=backend)
    if case == "sh3_rgb_ed":
        leaves["shs"] = scene["shs"].clone().requires_grad_(True)
        colors, extra = leaves["shs"], dict(sh_degree=3, render_mode="RGB+ED", backgrounds=scene["backgrounds"][:, :3])
    elif case == "feat16":
        leaves["feats"] = scene["feats"][:, :16].clone().requires_grad_(True)
        colors, extra = leaves["feats"], dict(backgrounds=scene["backgrounds"][:, :16])
    elif case == "fused_rgb_feat13_antialiased_d":
        leaves["shs"] = scene["shs"].clone().requires_grad_(True)
        leaves["feats"] = scene["feats"][:, :13].clone().requires_grad_(True)
        rgb = sh_to_view_colors(leaves["means"], leaves["shs"], scene["viewmats"], 3)
        colors = torch.cat([rgb, leaves["feats"][None]], dim=-1)
        extra = dict(render_mode="RGB+D", rasterize_mode="antialiased")
    else:
        raise ValueError(case)
    out, alpha, meta = rasterize(
        leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], colors, scene["viewmats"],
        scene["Ks"], **kw, **extra,
    )  # fmt: skip
    meta["means2d"].retain_grad()
    g = torch.Generator(device=out.device).manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, device=out.device)).sum()
    loss = loss + (alpha * torch.randn(alpha.shape, generator=g, device=out.device)).sum()
    loss.backward()
    res = {"colors": out.detach(), "alphas": alpha.detach(), "radii": meta["radii"].detach()}
    res.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    res["grad_means2d"] = meta["means2d"].grad
    res["absgrad_means2d"] = meta["means2d"].absgrad
    return res


def parity(args: argparse.Namespace, device: torch.device) -> dict:
    scene = make_scene(args.parity_n, args.parity_size, args.parity_size, args.seed, device)
    report: dict = {"n": args.parity_n, "size": args.parity_size}
    for case in ("sh3_rgb_ed", "feat16", "fused_rgb_feat13_antialiased_d"):
        t0 = time.perf_counter()
        a = _run_case(scene, "torch", case, args.parity_size, args.parity_size)
        torch.cuda.synchronize()
        t_torch = time.perf_counter() - t0
        b = _run_case(scene, "gsplat", case, args.parity_size, args.parity_size)
        row: dict = {"torch_backend_fwd_bwd_s": round(t_torch, 4)}
        row["radii_mismatch"] = int((a["radii"] != b["radii"]).sum())
        depth_last = case != "feat16"
        ca, cb = a["colors"], b["colors"]
        if depth_last:
            row["max_abs_depth"] = (ca[..., -1] - cb[..., -1]).abs().max().item()
            row["max_abs_depth_where_alpha>0.05"] = (
                ((ca[..., -1] - cb[..., -1]).abs() * (b["alphas"][..., 0] > 0.05)).max().item()
            )
            ca, cb = ca[..., :-1], cb[..., :-1]
        dc, da = (ca - cb).abs(), (a["alphas"] - b["alphas"]).abs()
        row["max_abs_colors"] = dc.max().item()
        row["max_abs_alphas"] = da.max().item()
        # isolated knife-edge pixels (1/255 skip, T <= 1e-4 stop: gsplat's __expf vs exp) vs a systematic error
        row["pixels_with_diff>1e-5"] = int(((dc.amax(-1) > 1e-5) | (da[..., 0] > 1e-5)).sum())
        row["p99.9_abs_colors"] = torch.quantile(dc.flatten().float(), 0.999).item()
        for k in a:
            if k.startswith(("grad_", "absgrad_")):
                d = (a[k] - b[k]).abs().max().item()
                scale = b[k].abs().max().item()
                row[f"{k}_max_abs"] = d
                row[f"{k}_rel_to_max"] = d / scale if scale > 0 else 0.0
        report[case] = row
        print(f"[parity] {case}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)
    return report


def _median_time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(args: argparse.Namespace, device: torch.device) -> list[dict]:
    W, H = args.width, args.height
    scene = make_scene(args.n, W, H, args.seed + 1, device)
    params = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "shs")}
    feats = scene["feats"].clone().requires_grad_(True)
    rows = []
    for n_feat in [0, *args.feature_channels]:

        def render(n_feat=n_feat):
            p = params
            if n_feat == 0:
                colors, kw = p["shs"], dict(sh_degree=3)
            else:  # fused: SH -> RGB per view, then RGB | features in one call
                rgb = sh_to_view_colors(p["means"], p["shs"], scene["viewmats"], 3)
                colors, kw = torch.cat([rgb, feats[None, :, :n_feat]], dim=-1), {}
            return rasterize(
                p["means"], p["quats"], p["scales"], p["opacities"], colors, scene["viewmats"], scene["Ks"], W, H,
                packed=False, absgrad=args.absgrad, backend="gsplat", **kw,
            )  # fmt: skip

        def fwd():
            with torch.no_grad():
                render()

        def fwd_bwd():
            out, alpha, meta = render()
            meta["means2d"].retain_grad()
            (out.sum() + alpha.sum()).backward()
            for t in (*params.values(), feats):
                t.grad = None

        torch.cuda.reset_peak_memory_stats()
        t_f = _median_time(fwd, args.warmup, args.repeats)
        t_fb = _median_time(fwd_bwd, args.warmup, args.repeats)
        with torch.no_grad():
            _, alpha, meta = render()
        row = {
            "channels": "RGB(SH3)" if n_feat == 0 else f"RGB+{n_feat} (fused, D={3 + n_feat})",
            "n": args.n,
            "size": f"{W}x{H}",
            "fwd_ms": round(t_f * 1e3, 3),
            "fwd_bwd_ms": round(t_fb * 1e3, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "visible": int((meta["radii"] > 0).sum()),
            "mean_alpha": round(alpha.mean().item(), 4),
        }
        rows.append(row)
        print(f"[timing] {row}", flush=True)
    base = rows[0]["fwd_bwd_ms"]
    for r in rows:
        r["fwd_bwd_vs_rgb"] = round(r["fwd_bwd_ms"] / base, 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("rasterize_gpu.json"), help="where to write the JSON summary")
    ap.add_argument("--seed", type=int, default=0, help="scene seed")
    ap.add_argument("--parity-n", type=int, default=10_000, help="Gaussians in the parity scene")
    ap.add_argument("--parity-size", type=int, default=256, help="parity image width = height")
    ap.add_argument("--n", type=int, default=1_000_000, help="Gaussians in the timing scene")
    ap.add_argument("--width", type=int, default=1920, help="timing image width")
    ap.add_argument("--height", type=int, default=1080, help="timing image height")
    ap.add_argument(
        "--feature-channels",
        type=int,
        nargs="*",
        default=[16, 32, 13, 29],
        help="F for the RGB+F fused rows (13 and 29 give gsplat's fast totals D=16 and D=32)",
    )
    ap.add_argument("--absgrad", action=argparse.BooleanOptionalAction, default=True, help="time with absgrad")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per measurement")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    ap.add_argument("--skip-parity", action="store_true", help="only run the timing part")
    ap.add_argument("--skip-timing", action="store_true", help="only run the parity part")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("rasterize_gpu.py needs a CUDA device (gsplat has no CPU path); nothing was run.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    import gsplat

    summary: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "gsplat": gsplat.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if not args.skip_parity:
        summary["parity"] = parity(args, device)
    if not args.skip_timing:
        summary["timing"] = timing(args, device)
    text = json.dumps(summary, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
