"""rtgs2-ext on an RT-GS2-sized workload: per-frame semantic segmentation at 640x480 of a ~500k-Gaussian scene, and
the one-off Stage-A cost per scene, with the full-size networks (PTv3-style backbone, ConvNeXt-T + MiT-B0 fusion,
46 classes as Replica). Weights are random: the compute is the same as with trained weights.

The scene is a room-sized cloud (``--blobs`` clusters of Gaussians in 8 x 8 x 3 m, SH degree 3), loaded into the
real RTGS2Model. Timed (CUDA-synchronised medians):
- ``frame_ms``: the viewer / ns-render path, ``model.get_outputs_for_camera``: one rasterization of RGB + 32 baked
  feature channels, the fusion net, argmax and the colour outputs; per precision mode (fp32 eager, bf16 autocast,
  bf16 + torch.compile);
- ``render_ms``: the fused 35-channel rasterization alone, and ``rgb_render_ms``: plain gsplat RGB of the same
  Gaussians (the practical limit);
- ``bake_s``: Stage-A feature bake of the whole scene (one backbone forward over all Gaussians);
- ``ssl_step_ms``: one Stage-A training step on a pair of views (voxel 0.07 m, 4096 correspondences).

    python scripts/bench/rtgs2.py --gaussians 500000 --out rtgs2.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms as _time  # noqa: E402
from timing import sync as _sync  # noqa: E402


def room_scene(num: int, blobs: int, generator: torch.Generator):
    """A GaussianScene of ``blobs`` anisotropic clusters in an 8 x 8 x 3 m room (SH degree 3)."""
    from gsstudio_ext.core.scene import GaussianScene

    centers = torch.rand(blobs, 3, generator=generator) * torch.tensor([8.0, 8.0, 3.0]) - torch.tensor([4.0, 4.0, 0.0])
    owner = torch.randint(0, blobs, (num,), generator=generator)
    spread = 0.05 + 0.4 * torch.rand(blobs, 3, generator=generator)
    means = centers[owner] + spread[owner] * torch.randn(num, 3, generator=generator)
    return GaussianScene(
        means=means,
        quats=torch.nn.functional.normalize(torch.randn(num, 4, generator=generator), dim=-1),
        log_scales=torch.full((num, 3), math.log(0.01)),
        opacity_logits=torch.full((num,), 1.0),
        sh_dc=torch.randn(num, 3, generator=generator) * 0.5,
        sh_rest=torch.randn(num, 15, 3, generator=generator) * 0.05,
    )


def room_camera(width: int, height: int, device: str, angle: float = 0.3):
    """One camera inside the room at 1.5 m height looking across it (OpenGL axes)."""
    from nerfstudio.cameras.cameras import Cameras

    eye = torch.tensor([3.0 * math.cos(angle), 3.0 * math.sin(angle), 1.5])
    target = torch.tensor([0.0, 0.0, 1.0])
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    up = torch.linalg.cross(right, forward)
    c2w = torch.stack([right, up, -forward, eye], dim=1)[None]
    f = 0.8 * width
    return Cameras(camera_to_worlds=c2w, fx=f, fy=f, cx=width / 2, cy=height / 2, width=width, height=height).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=500_000)
    parser.add_argument("--blobs", type=int, default=400)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--classes", type=int, default=46)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-stage-a", action="store_true", help="only the per-frame timings")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from nerfstudio.data.scene_box import SceneBox

    from gsstudio_ext.core.cameras import viewmat_from_c2w
    from gsstudio_ext.core.rasterize import rasterize
    from gsstudio_ext.core.scene_render import render_scene
    from gsstudio_ext.methods.rtgs2.model import RTGS2ModelConfig
    from gsstudio_ext.methods.rtgs2.pairs import ViewPair
    from gsstudio_ext.methods.rtgs2.ssl import SSLConfig, ssl_loss

    gen = torch.Generator().manual_seed(0)
    scene = room_scene(args.gaussians, args.blobs, gen).to(device)
    classes = [f"class_{i}" for i in range(args.classes)]
    model = RTGS2ModelConfig().setup(
        scene_box=SceneBox(aabb=torch.tensor([[-4.0, -4.0, 0.0], [4.0, 4.0, 3.0]])),
        num_train_data=1,
        metadata={"classes": classes},
    )
    model = model.to(device).eval()
    model.register_scene("room", scene)
    camera = room_camera(args.width, args.height, device)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "gaussians": args.gaussians,
        "resolution": [args.width, args.height],
        "classes": args.classes,
        "backbone_params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "fusion_params_m": sum(p.numel() for p in model.fusion.parameters()) / 1e6,
    }

    # Stage A, once per scene: bake every Gaussian's feature (cold, then warm)
    _sync()
    start = time.perf_counter()
    feats = model.scene_features("room")
    _sync()
    result["bake_first_s"] = time.perf_counter() - start
    bake = []
    for _ in range(3):
        model.forget_features()
        _sync()
        start = time.perf_counter()
        model.scene_features("room")
        _sync()
        bake.append(time.perf_counter() - start)
    result["bake_s"] = sorted(bake)[1]
    result["bake_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    print(f"bake: {result['bake_s']:.3f} s (first {result['bake_first_s']:.3f} s)", flush=True)

    # Stage A training step on a pair of overlapping halves of the room
    if not args.skip_stage_a:
        first = scene.means[:, 0] < 1.0
        second = scene.means[:, 0] > -1.0
        pair = ViewPair(0, 1, 0.0, torch.nonzero(first & second).squeeze(1), first, second)
        backbone = model.backbone.train()
        optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-3)

        def ssl_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            out = ssl_loss(backbone, scene, pair, SSLConfig(), gen)
            out["contrastive"].backward()
            optimizer.step()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result["ssl_step_ms"] = _time(ssl_step, repeats=10, warmup=2)
        result["ssl_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        print(f"ssl step: {result['ssl_step_ms']:.1f} ms", flush=True)
    model.backbone.eval()

    # per frame
    viewmat = viewmat_from_c2w(camera.camera_to_worlds.to(device))
    K = camera.get_intrinsics_matrices().to(device)
    background = torch.zeros(3, device=device)
    result["render_ms"] = _time(
        lambda: render_scene(scene, viewmat, K, args.width, args.height, feats.float(), background), args.repeats
    )
    result["rgb_render_ms"] = _time(
        lambda: rasterize(scene.means, scene.quats, scene.scales(), scene.opacities(), scene.colors_sh(), viewmat, K,
                          args.width, args.height, sh_degree=3),
        args.repeats,
    )  # fmt: skip
    frames = {}
    modes = [("fp32", "float32", False), ("bf16", "bfloat16", False), ("bf16_compiled", "bfloat16", True)]
    for mode, precision, compiled in modes[-1:] if args.skip_stage_a else modes:
        model.config.inference_precision, model.config.compile_inference = precision, compiled
        try:
            with torch.no_grad():
                ms = _time(lambda: model.get_outputs_for_camera(camera)["semantic_ids"], args.repeats, warmup=10)
        except Exception as error:  # noqa: BLE001 (report a failing mode, keep the others)
            frames[mode] = {"error": repr(error)[:300]}
            continue
        rgb, fmap, _ = model.render_view("room", camera)
        with torch.no_grad():
            net_ms = _time(lambda: model.segment_logits(rgb, fmap).argmax(1), args.repeats, warmup=5)
        frames[mode] = {"frame_ms": ms, "fps": 1e3 / ms, "fusion_argmax_ms": net_ms}
        print(f"{mode}: {ms:.2f} ms/frame = {1e3 / ms:.0f} FPS (fusion + argmax {net_ms:.2f} ms)", flush=True)
    result["frames"] = frames
    result["render_only_ms"] = {"fused_35ch": result["render_ms"], "rgb": result["rgb_render_ms"]}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
