"""referspat-ext on a Ref-LERF-sized workload: training time for 5 epochs of ~200 views x 5 expressions, and the
latency of expression -> rendered mask at 1920x1080, on a 1M-Gaussian scene.

The scene is ``--objects`` blobs of Gaussians on a floor, written as a 3DGS .ply and loaded by the real ReferModel
(geometry frozen). Cameras orbit the scene; each view's five expressions target objects whose projected boxes are
the target masks. Word embeddings are fixed random [L, 1024] tensors (BERT-large's width) per expression: the
plugin encodes every expression once and caches it, so the encoder is outside the loop (MiniLM / BERT weights do
not reach the GPU machine).

Timed (CUDA-synchronised):
- ``train_s``: the whole training loop (model forward on one view with all its expressions, BCE + GTCL, backward,
  Adam), ``--epochs`` x ``--views`` steps, our way (one render per view, attention over the frustum);
- ``official_style_step_ms``: one view trained the official way (one render and one step per expression, attention
  over all Gaussians), for comparison;
- ``query_to_mask_ms``: one expression rendered as a mask at 1920x1080 (attention + one rasterization) vs
  ``rgb_render_ms``, plain gsplat RGB of the same Gaussians; ``text_query_ms``: the 3D selection over all Gaussians.

    python scripts/bench/referspat.py --gaussians 1000000 --out referspat.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms as _time  # noqa: E402
from timing import sync as _sync  # noqa: E402


def blob_scene(num: int, objects: int, generator: torch.Generator):
    """A GaussianScene of ``objects`` blobs (SH degree 3) and the blob centres [objects, 3]."""
    from gsstudio_ext.core.scene import GaussianScene

    centers = torch.rand(objects, 3, generator=generator) * torch.tensor([3.0, 3.0, 0.4]) - torch.tensor([1.5, 1.5, 0])
    owner = torch.randint(0, objects, (num,), generator=generator)
    means = centers[owner] + 0.1 * torch.randn(num, 3, generator=generator)
    return GaussianScene(
        means=means,
        quats=torch.nn.functional.normalize(torch.randn(num, 4, generator=generator), dim=-1),
        log_scales=torch.full((num, 3), math.log(0.006)),
        opacity_logits=torch.full((num,), 2.0),
        sh_dc=torch.randn(num, 3, generator=generator) * 0.5,
        sh_rest=torch.zeros(num, 15, 3),
    ), centers


def orbit_cameras(views: int, width: int, height: int, device: str):
    """``views`` cameras on a ring 4 m out, 2.5 m up, looking at the origin."""
    from nerfstudio.cameras.cameras import Cameras

    c2ws = []
    for i in range(views):
        angle = 2 * math.pi * i / views
        eye = torch.tensor([4.0 * math.cos(angle), 4.0 * math.sin(angle), 2.5])
        forward = torch.nn.functional.normalize(-eye, dim=0)
        right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
        up = torch.linalg.cross(right, forward)
        c2ws.append(torch.stack([right, up, -forward, eye], dim=1))  # OpenGL camera axes
    f = 0.9 * width
    return Cameras(camera_to_worlds=torch.stack(c2ws), fx=f, fy=f, cx=width / 2, cy=height / 2, width=width,
                   height=height).to(device)  # fmt: skip


def box_masks(camera, centers: torch.Tensor, half: int) -> torch.Tensor:
    """Bool [objects, H, W]: a square of side 2*half around each object centre's projection."""
    from gsstudio_ext.core.cameras import viewmat_from_c2w

    viewmat = viewmat_from_c2w(camera.camera_to_worlds)[0]
    K = camera.get_intrinsics_matrices()[0]
    width, height = int(camera.width), int(camera.height)
    cam = centers.to(viewmat.device) @ viewmat[:3, :3].T + viewmat[:3, 3]
    u = (K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]).long()
    v = (K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]).long()
    masks = torch.zeros(len(centers), height, width, dtype=torch.bool, device=viewmat.device)
    for k in range(len(centers)):
        masks[
            k, max(int(v[k]) - half, 0) : max(int(v[k]) + half, 0), max(int(u[k]) - half, 0) : max(int(u[k]) + half, 0)
        ] = True
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--views", type=int, default=200)
    parser.add_argument("--expressions-per-view", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=988, help="training views (Ref-LERF ramen: 988x731)")
    parser.add_argument("--height", type=int, default=731)
    parser.add_argument("--words", type=int, default=8, help="words per expression")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from nerfstudio.data.scene_box import SceneBox

    from gsstudio_ext.core.cameras import viewmat_from_c2w
    from gsstudio_ext.core.ply import write_ply
    from gsstudio_ext.core.rasterize import rasterize
    from gsstudio_ext.methods.referspat.model import ReferModelConfig, Words
    from gsstudio_ext.models.text import TinyTextConfig

    gen = torch.Generator().manual_seed(0)
    scene, centers = blob_scene(args.gaussians, args.objects, gen)
    expressions = [
        {"id": k, "text": f"expression {k} of object {k % args.objects}", "object_ids": [k % args.objects + 1],
         "kind": "name", "frames": []}
        for k in range(4 * args.objects)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        write_ply(Path(tmp) / "scene.ply", scene)
        # a 1024-wide encoder config (BERT-large's width) that loads nothing: words come from ``text_words`` below
        encoder = TinyTextConfig(hidden_size=1024)
        config = ReferModelConfig(scene=Path(tmp) / "scene.ply", background_color="black", text_encoder=encoder)
        model = config.setup(
            scene_box=SceneBox(aabb=torch.tensor([[-3.0, -3.0, -1.0], [3.0, 3.0, 2.0]])),
            num_train_data=args.views,
            metadata={"expressions": expressions},
        )
    model = model.to(device)
    tokens = {e["text"]: torch.randn(args.words, 1024, generator=gen).to(device) for e in expressions}

    def text_words(texts):
        for text in texts:
            tokens.setdefault(text, torch.randn(args.words, 1024, generator=gen).to(device))
        stacked = torch.stack([tokens[t] for t in texts]) if texts else torch.zeros(0, args.words, 1024, device=device)
        return Words(stacked, torch.ones(stacked.shape[:2], dtype=torch.bool, device=device))

    model.text_words = text_words  # the encoder's cache, pre-filled
    model.optimizers = {}
    groups = model.get_param_groups()
    optimizer = torch.optim.Adam(
        [{"params": groups["referring"], "lr": 2.5e-3}, {"params": groups["referring_fields"], "lr": 1e-4}], eps=1e-15
    )
    cameras = orbit_cameras(args.views, args.width, args.height, device)
    instance_ids = torch.arange(1, args.objects + 1, device=device)
    batches = []
    gen_ids = torch.Generator().manual_seed(2)
    for i in range(args.views):
        masks = box_masks(cameras[i : i + 1], centers, half=args.height // 12)
        ids = torch.randperm(len(expressions), generator=gen_ids)[: args.expressions_per_view]
        batches.append({"instance_ids": instance_ids, "instance_masks": masks, "expression_ids": ids})

    def train_step(i: int) -> None:
        batch = batches[i % args.views]
        ids = model.training_expressions(batch)
        with model.rendering(model.expression_words(ids)):
            outputs = model(cameras[i % args.views : i % args.views + 1])
            losses = model.get_loss_dict(outputs, batch)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def official_step(i: int) -> None:  # one render and one Adam step per expression, attention over all
        batch = batches[i % args.views]
        scope, model.config.attention_scope = model.config.attention_scope, "all"
        try:
            for expression in batch["expression_ids"]:
                single = dict(batch, expression_ids=expression[None])
                with model.rendering(model.expression_words(expression[None])):
                    outputs = model(cameras[i % args.views : i % args.views + 1])
                    losses = model.get_loss_dict(outputs, single)
                sum(losses.values()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            model.config.attention_scope = scope

    model.train()
    for i in range(3):
        train_step(i)  # warm-up (gsplat kernels, allocator)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    steps = args.epochs * args.views
    _sync()
    start = time.perf_counter()
    for i in range(steps):
        train_step(i)
    _sync()
    train_s = time.perf_counter() - start
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    official_ms = _time(lambda: official_step(0), max(3, args.repeats // 5), warmup=1)

    model.eval()
    query_camera = orbit_cameras(1, 1920, 1080, device)
    text = expressions[0]["text"]
    params = model.gauss_params
    sh = torch.cat([params["features_dc"][:, None], params["features_rest"]], dim=1).detach()
    viewmat, K = viewmat_from_c2w(query_camera.camera_to_worlds), query_camera.get_intrinsics_matrices().to(device)

    def rgb_render():
        return rasterize(means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
                         opacities=torch.sigmoid(params["opacities"])[:, 0], colors=sh, viewmats=viewmat, Ks=K,
                         width=1920, height=1080, sh_degree=3, packed=False)  # fmt: skip

    def query_to_mask():
        return torch.sigmoid(model.render_expressions(query_camera, [text])) > 0.5

    with torch.no_grad():
        rgb_ms = _time(rgb_render, args.repeats)
        mask_ms = _time(query_to_mask, args.repeats)
        query_ms = _time(lambda: model.text_query(text), args.repeats)
        mask_pixels = int(query_to_mask().sum())
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "gaussians": model.num_points,
        "views": args.views,
        "expressions_per_view": args.expressions_per_view,
        "epochs": args.epochs,
        "train_resolution": [args.width, args.height],
        "train_steps": steps,
        "train_s": train_s,
        "train_step_ms": 1e3 * train_s / steps,
        "train_peak_memory_gb": peak_gb,
        "official_style_step_ms": official_ms,
        "official_style_train_s_estimate": official_ms * steps / 1e3,
        "rgb_render_ms_1080p": rgb_ms,
        "query_to_mask_ms_1080p": mask_ms,
        "ratio_query_to_mask_vs_rgb": mask_ms / rgb_ms,
        "text_query_3d_selection_ms": query_ms,
        "mask_pixels": mask_pixels,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
