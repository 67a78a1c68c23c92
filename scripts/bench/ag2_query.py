"""Text query -> rendered selection on a 1M-Gaussian ag2aussian-ext model at 1920x1080 (default), vs plain gsplat RGB.

The model is a real AG2Model (anchors + 5 children each) whose anchors fill ``--objects`` blobs; every blob has its
own instance feature, so super-anchor clustering finds the objects. Each super-anchor gets a random language
embedding (as association would give), and the query text encodes to one object's embedding (the text encoder's
own time is measured separately when the offline MiniLM package is installed).

Timed, median of ``--repeats`` after warm-up, CUDA-synchronised:
- ``rgb_render``: gsplat rasterization of the same Gaussians, SH degree 3, RGB only (the practical limit);
- ``query``: model.text_query (relevancy over super-anchors, softmax rule, graph growth, per-child mask);
- ``selection_render``: the selection as a 1-channel render (the mask a query returns);
- ``query_to_selection``: the two together, the figure the issue's target is about;
- ``viewer_render``: the model's full eval render (RGB highlighted + instance colours + selection + relevancy + depth).

    python scripts/bench/ag2_query.py --anchors 200000 --out ag2_query.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_ms as _time  # noqa: E402
from timing import sync as _sync  # noqa: E402


def _blob_scene(num_anchors: int, objects: int, generator: torch.Generator):
    """Anchor seed points in ``objects`` blobs on a 4x4 m floor, their colours and per-anchor object ids."""
    centers = torch.rand(objects, 3, generator=generator) * torch.tensor([4.0, 4.0, 0.5]) - torch.tensor([2, 2, 0])
    owner = torch.randint(0, objects, (num_anchors,), generator=generator)
    points = centers[owner] + 0.08 * torch.randn(num_anchors, 3, generator=generator)
    colors = torch.randint(0, 256, (num_anchors, 3), generator=generator, dtype=torch.uint8)
    return points, colors, owner


def build_model(num_anchors: int, objects: int, device: str):
    from nerfstudio.data.scene_box import SceneBox

    from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig

    gen = torch.Generator().manual_seed(0)
    points, colors, owner = _blob_scene(num_anchors, objects, gen)
    config = AG2ModelConfig(voxel_size=1e-4, sh_degree=3, rasterizer_backend="auto")
    model = config.setup(
        scene_box=SceneBox(aabb=torch.tensor([[-3.0, -3.0, -1.0], [3.0, 3.0, 2.0]])),
        num_train_data=1,
        seed_points=(points, colors),
    )
    params = model.gauss_params
    # One unit feature per object (+ small noise), children small and fairly opaque: a rendered scene of blobs.
    object_feat = torch.nn.functional.normalize(torch.randn(objects, 3, generator=gen), dim=-1)
    centers = points.new_zeros(objects, 3).index_add_(0, owner, points) / torch.bincount(owner)[:, None]
    anchor_owner = torch.cdist(params["anchor_xyz"].detach(), centers).argmin(dim=1)  # anchors are voxel-sorted
    with torch.no_grad():
        params["anchor_feat"].copy_(object_feat[anchor_owner] + 0.005 * torch.randn(len(anchor_owner), 3))
        params["scales"].fill_(float(torch.log(torch.tensor(0.004))))
        params["opacities"].fill_(1.0)
    model.step = 100000  # full SH degree
    return model.to(device).eval()


def make_camera(width: int, height: int, device: str):
    from nerfstudio.cameras.cameras import Cameras

    c2w = torch.tensor([[1.0, 0, 0, 0], [0, 0.6, 0.8, 4.0], [0, -0.8, 0.6, 3.0]])  # above the floor, looking down
    f = 1400.0 * width / 1920
    return Cameras(camera_to_worlds=c2w[None], fx=f, fy=f, cx=width / 2, cy=height / 2, width=width, height=height).to(
        device
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", type=int, default=200_000, help="anchors (x5 children)")
    parser.add_argument("--objects", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from gsstudio_ext.core.cameras import viewmat_from_c2w
    from gsstudio_ext.core.rasterize import rasterize
    from gsstudio_ext.methods.ag2aussian.language import GroupLanguage

    model = build_model(args.anchors, args.objects, device)
    camera = make_camera(args.width, args.height, device)
    _sync()
    start = time.perf_counter()
    index = model.build_index()
    _sync()
    index_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(1)
    embeddings = torch.nn.functional.normalize(torch.randn(index.num_groups, 384, generator=gen), dim=-1).to(device)
    matched = torch.ones(index.num_groups, dtype=torch.bool, device=device)
    model.set_language(GroupLanguage(index.labels, embeddings, matched, "label:minilm"))
    target = int(torch.argmax(model.anchor_index.sizes))
    model._encoders["label:minilm"] = lambda texts: embeddings[target : target + 1].expand(len(texts), -1)

    params = model.gauss_params
    means, quats = model.means.detach(), model.quats.detach()
    scales, opacities = torch.exp(model.scales).detach(), torch.sigmoid(model.opacities).squeeze(-1).detach()
    sh = torch.cat([params["features_dc"][:, None], params["features_rest"]], dim=1).detach()
    viewmat, K = viewmat_from_c2w(camera.camera_to_worlds).to(device), camera.get_intrinsics_matrices().to(device)

    def render(colors, sh_degree=None):
        return rasterize(
            means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmat, Ks=K,
            width=args.width, height=args.height, sh_degree=sh_degree, packed=False,
        )  # fmt: skip

    def query():
        return model.text_query("the largest object")

    def selection_render():
        return render(model.selection.float()[:, None])

    def query_to_selection():
        query()
        return selection_render()

    with torch.no_grad():
        results = {
            "rgb_render": _time(lambda: render(sh, 3), args.repeats),
            "query": _time(query, args.repeats),
            "selection_render": _time(selection_render, args.repeats),
            "query_to_selection": _time(query_to_selection, args.repeats),
            "viewer_render": _time(lambda: model.get_outputs(camera), args.repeats),
        }
        mask = selection_render()[0][0, ..., 0] > 0.5
    encoder_ms = None
    try:
        from gsstudio_ext.data.embedding_sources import text_query_encoder

        encode = text_query_encoder("label:minilm", device=device)
        texts = (f"the red mug number {i}" for i in range(10**6))  # new text every call: the encoder caches
        encoder_ms = _time(lambda: encode([next(texts)]), args.repeats)
    except Exception as error:  # noqa: BLE001 - report why the encoder could not be timed
        encoder_ms = f"not measured: {error}"
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "gaussians": model.num_points,
        "anchors": model.num_anchors,
        "super_anchors": model.anchor_index.num_groups,
        "selected_gaussians": int(model.selection.sum()),
        "selected_pixels": int(mask.sum()),
        "index_build_s": index_s,
        "median_ms": results,
        "text_encoder_ms": encoder_ms,
        "ratio_query_to_selection_vs_rgb": results["query_to_selection"] / results["rgb_render"],
        "ratio_viewer_render_vs_rgb": results["viewer_render"] / results["rgb_render"],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
