"""Write one synthetic scene as a nerfstudio dataset with exact ground-truth sidecars.

Layout of ``out_dir`` (sidecar formats: :mod:`gsstudio_ext.data.layout`)::

    transforms.json        camera_model OPENCV, shared intrinsics, frames (file_path, transform_matrix = OpenGL
                           camera-to-world, depth_file_path), ply_file_path, train/val/test_filenames
    images/<stem>.png      RGB uint8
    depths/<stem>.png      uint16 z-depth in millimetres (nerfstudio's depth_unit_scale_factor 1e-3); 0 = no surface
    gaussians.ply          with fuse_gaussians: a 3DGS scene fused from the RGB-D train views
    sparse_pc.ply          initial points (x y z float32, red green blue uint8), back-projected from train depth
    synth_config.json      the SynthConfig that made the scene (re-run it to regenerate byte-identical files)
    sidecars/              scene.json, expressions.json, instances/, semantics/, parts/

The table is background: class 0, part 0, no instance. Val and test both list the eval views; with no eval views
(eval_every=0) no split lists are written and nerfstudio applies its own ``eval_mode``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from PIL import Image

from gsstudio_ext.core.atomic import atomic_write, write_json_atomic
from gsstudio_ext.data import sidecars
from gsstudio_ext.data.synthetic import cameras, catalogue
from gsstudio_ext.data.synthetic.config import SynthConfig
from gsstudio_ext.data.synthetic.expressions import REFERENCE_FRAME, build_expressions
from gsstudio_ext.data.synthetic.layout import SceneLayout, plan_scene
from gsstudio_ext.data.synthetic.render import Frame, SceneRenderer

PLY_NAME = "sparse_pc.ply"
CONFIG_NAME = "synth_config.json"
GAUSSIANS_NAME = "gaussians.ply"
MANAGED = ("images", "depths", "sidecars", "transforms.json", PLY_NAME, CONFIG_NAME, GAUSSIANS_NAME)
"""Entries of a scene folder the generator owns (and may replace with overwrite=True)."""

Progress = Callable[[int, int], None]


def frame_stem(index: int) -> str:
    """Image stem of orbit view ``index`` (sidecars are keyed by it)."""
    return f"frame_{index:05d}"


def write_json(path: Path, obj: Any) -> None:
    """JSON with indent 2 and a final newline, written atomically."""
    write_json_atomic(path, obj, indent=2, trailing_newline=True)


def _write_png(path: Path, array: np.ndarray) -> None:
    image = Image.fromarray(array)
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def ply_bytes(points: np.ndarray, colours: np.ndarray) -> bytes:
    """Binary little-endian PLY of points [N, 3] (float32) with colours [N, 3] (uint8)."""
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rows = np.empty(len(points), dtype=dtype)
    for i, axis in enumerate("xyz"):
        rows[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        rows[channel] = colours[:, i]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    return header.encode("ascii") + rows.tobytes()


def depth_to_millimetres(depth: np.ndarray) -> np.ndarray:
    """uint16 [H, W] millimetres of a metric z-depth map; 0 (no surface) stays 0, beyond 65.535 m becomes 0."""
    mm = np.round(np.asarray(depth) * 1000.0)
    return np.where((mm > 0) & (mm <= 65535), mm, 0).astype(np.uint16)


def prepare_output(out_dir: Path, overwrite: bool, extra: tuple = ()) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite`` (then only generator-owned entries go)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out_dir} is not empty; pick another --out or pass --overwrite to replace the "
                f"generator's files in it ({', '.join(MANAGED + tuple(extra))})"
            )
        for name in MANAGED + tuple(extra):
            for entry in out_dir.glob(name):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class _PointPool:
    """Keeps a bounded, seeded random subset of back-projected pixels per category (object / table)."""

    per_frame: int
    rng: np.random.Generator
    points: Dict[bool, List[np.ndarray]] = field(default_factory=lambda: {True: [], False: []})
    colours: Dict[bool, List[np.ndarray]] = field(default_factory=lambda: {True: [], False: []})

    def add(self, frame: Frame, intr: cameras.Intrinsics, c2w: np.ndarray) -> None:
        world = cameras.backproject(frame.depth, intr, c2w)
        for is_object in (True, False):
            mask = (frame.depth > 0) & ((frame.object_ids > 0) == is_object)
            idx = np.flatnonzero(mask)
            if len(idx) > self.per_frame:
                idx = np.sort(self.rng.choice(idx, size=self.per_frame, replace=False))
            self.points[is_object].append(world.reshape(-1, 3)[idx])
            self.colours[is_object].append(frame.rgb.reshape(-1, 3)[idx])

    def sample(self, num_points: int, object_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        want = {True: int(round(num_points * object_fraction))}
        want[False] = num_points - want[True]
        pts, cols = [], []
        for is_object in (True, False):
            p = np.concatenate(self.points[is_object]) if self.points[is_object] else np.zeros((0, 3))
            c = np.concatenate(self.colours[is_object]) if self.colours[is_object] else np.zeros((0, 3), np.uint8)
            if len(p) > want[is_object]:
                keep = np.sort(self.rng.choice(len(p), size=want[is_object], replace=False))
                p, c = p[keep], c[keep]
            pts.append(p)
            cols.append(c)
        return np.concatenate(pts), np.concatenate(cols).astype(np.uint8)


def _transforms(config: SynthConfig, intr: cameras.Intrinsics, poses: np.ndarray) -> Dict[str, Any]:
    frames = [
        {
            "file_path": f"images/{frame_stem(k)}.png",
            "transform_matrix": [[round(float(v), 10) for v in row] for row in poses[k]],
            "depth_file_path": f"depths/{frame_stem(k)}.png",
        }
        for k in range(len(poses))
    ]
    eval_set = set(config.eval_indices())
    train = [f["file_path"] for k, f in enumerate(frames) if k not in eval_set]
    evals = [f["file_path"] for k, f in enumerate(frames) if k in eval_set]
    splits = {"train_filenames": train, "val_filenames": evals, "test_filenames": evals} if evals else {}
    return {
        "camera_model": "OPENCV",
        "fl_x": intr.fx,
        "fl_y": intr.fy,
        "cx": intr.cx,
        "cy": intr.cy,
        "w": intr.width,
        "h": intr.height,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
        "ply_file_path": PLY_NAME,
        **splits,
    }


def _scene_meta(config: SynthConfig, layout: SceneLayout, radius: float) -> Dict[str, Any]:
    return {
        "objects": [o.to_meta() for o in layout.objects],
        "classes": catalogue.class_list(),
        "parts": [{"id": pid, "object_id": o.id, "name": name} for o in layout.objects for pid, name in o.parts],
        "generator": "gs-synth",
        "seed": config.seed,
        "units": "metres; world z up, table top at z = 0",
        "background": "table and sky: class 0, part 0, no instance",
        "reference_frame": REFERENCE_FRAME,
        "look_at": [round(float(v), 6) for v in layout.center],
        "camera_radius": round(radius, 6),
    }


def write_scene(
    out_dir: Path, config: SynthConfig, overwrite: bool = False, progress: Optional[Progress] = None
) -> Path:
    """Render and write one scene into ``out_dir``; returns ``out_dir``. ``progress(done, total)`` per view."""
    config.check()
    out_dir = Path(out_dir)
    prepare_output(out_dir, overwrite)
    layout = plan_scene(config)
    intr = cameras.intrinsics_from_fov(config.width, config.height, config.fov_deg)
    radius = config.radius if config.radius is not None else cameras.fit_radius(layout.extent, intr)
    poses = cameras.orbit_poses(
        config.num_views,
        layout.center,
        radius,
        config.elevation_min_deg,
        config.elevation_max_deg,
        config.elevation_waves,
    )
    eval_set = set(config.eval_indices())
    n_train = max(1, config.num_views - len(eval_set))
    pool = _PointPool(
        per_frame=4 * config.num_points // n_train + 1,
        rng=np.random.default_rng(np.random.SeedSequence([config.seed, 3])),
    )
    class_lut = np.zeros(len(layout.objects) + 1, dtype=np.int32)
    for obj in layout.objects:
        class_lut[obj.id] = obj.class_id
    visible: Dict[int, List[str]] = {o.id: [] for o in layout.objects}

    with SceneRenderer(
        layout, intr, config.seed, config.near, config.far, config.table_size, config.shadows, config.supersample
    ) as renderer:
        for k, c2w in enumerate(poses):
            frame = renderer.render(c2w)
            stem = frame_stem(k)
            _write_png(out_dir / "images" / f"{stem}.png", frame.rgb)
            _write_png(out_dir / "depths" / f"{stem}.png", depth_to_millimetres(frame.depth))
            ids = [o.id for o in layout.objects if np.any(frame.object_ids == o.id)]
            masks = np.stack([frame.object_ids == i for i in ids]) if ids else np.zeros((0, *frame.depth.shape), bool)
            sidecars.write_instances(out_dir, stem, np.asarray(ids, dtype=np.int32), masks)
            sidecars.write_semantics(out_dir, stem, class_lut[frame.object_ids])
            sidecars.write_parts(out_dir, stem, frame.part_ids)
            for obj_id, mask in zip(ids, masks):
                if int(mask.sum()) >= config.min_visible_pixels:
                    visible[obj_id].append(stem)
            if k not in eval_set:
                pool.add(frame, intr, c2w)
            if progress is not None:
                progress(k + 1, config.num_views)

    points, colours = pool.sample(config.num_points, config.object_point_fraction)
    data = ply_bytes(points, colours)
    atomic_write(out_dir / PLY_NAME, lambda handle: handle.write(data))
    write_json(out_dir / "transforms.json", _transforms(config, intr, poses))
    sidecars.write_scene_meta(out_dir, _scene_meta(config, layout, radius))
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 4]))
    expressions = build_expressions(
        layout.objects, lambda i: visible[i], rng, config.relation_margin, config.max_relational, config.max_paraphrases
    )
    sidecars.write_expressions(out_dir, expressions)
    write_json(out_dir / CONFIG_NAME, {"generator": "gs-synth", "config": config.to_dict()})
    if config.fuse_gaussians:
        from gsstudio_ext.data.synthetic.gaussians import write_fused_gaussians

        write_fused_gaussians(out_dir)
    return out_dir
