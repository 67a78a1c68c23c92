"""The synthetic scene generator: determinism, nerfstudio loading, exact ground truth, expressions, multi-scene."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsstudio_ext.data import sidecars
from gsstudio_ext.data.synthetic import SynthConfig, cameras, class_list, generate_scene, generate_scenes
from gsstudio_ext.data.synthetic.expressions import RELATIONS, SIZE_RATIO
from gsstudio_ext.data.synthetic.layout import plan_scene
from gsstudio_ext.data.synthetic.render import SceneRenderer

pytest.importorskip("pybullet")  # the package imports pybullet lazily, so skipping here is enough

TINY = dict(width=48, height=40, num_views=8, eval_every=4, num_points=500)
SEED = 5  # a layout with a repeated class, so class-level colour / size / relation expressions occur


def _hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return generate_scene(tmp_path_factory.mktemp("synth") / "scene", SynthConfig(seed=SEED, **TINY))


@pytest.fixture(scope="module")
def transforms(scene) -> dict:
    return json.loads((scene / "transforms.json").read_text())


@pytest.fixture(scope="module")
def meta(scene) -> dict:
    return sidecars.read_scene_meta(scene)


def _camera(transforms: dict, frame: dict):
    intr = cameras.Intrinsics(
        transforms["fl_x"], transforms["fl_y"], transforms["cx"], transforms["cy"], transforms["w"], transforms["h"]
    )
    return intr, np.asarray(frame["transform_matrix"], dtype=np.float64)


def _depth_m(scene: Path, frame: dict) -> np.ndarray:
    """Depth in metres read the way nerfstudio reads it (uint16 PNG times depth_unit_scale_factor 1e-3)."""
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path

    image = Image.open(scene / frame["file_path"])
    depth = get_depth_image_from_path(scene / frame["depth_file_path"], image.height, image.width, 1e-3)
    return depth[..., 0].numpy().astype(np.float64)


def test_same_seed_identical_files_other_seed_differs(scene, tmp_path):
    again = generate_scene(tmp_path / "again", SynthConfig(seed=SEED, **TINY))
    first, second = _hashes(scene), _hashes(again)
    assert len(first) > 30 and first == second
    other = _hashes(generate_scene(tmp_path / "other", SynthConfig(seed=SEED + 1, **TINY)))
    assert other.keys() == first.keys()
    assert other["images/frame_00000.png"] != first["images/frame_00000.png"]
    assert other["sidecars/scene.json"] != first["sidecars/scene.json"]


def test_loads_through_nerfstudio_dataparser(scene, transforms):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    parser = NerfstudioDataParserConfig(data=scene, load_3D_points=True).setup()
    train, val, test = (parser.get_dataparser_outputs(split) for split in ("train", "val", "test"))
    assert (len(train.image_filenames), len(val.image_filenames), len(test.image_filenames)) == (6, 2, 2)
    assert [p.stem for p in val.image_filenames] == ["frame_00003", "frame_00007"]
    assert train.metadata["points3D_xyz"].shape == (500, 3)
    assert train.metadata["points3D_rgb"].shape == (500, 3)
    assert len(train.metadata["depth_filenames"]) == 6 and train.metadata["depth_unit_scale_factor"] == 1e-3
    assert float(train.cameras.fx[0]) == pytest.approx(transforms["fl_x"])
    assert int(train.cameras.width[0]) == 48 and int(train.cameras.height[0]) == 40


def test_renderer_pixels_match_intrinsics_exactly():
    """Float depth of table pixels, back-projected with the written intrinsics, lies on the plane z = 0."""
    config = SynthConfig(seed=2, width=40, height=32, fov_deg=60.0)
    layout = plan_scene(config)
    intr = cameras.Intrinsics(fx=37.0, fy=41.0, cx=19.3, cy=16.8, width=40, height=32)  # off-centre, non-square
    poses = cameras.orbit_poses(3, layout.center, 0.6, 30.0, 50.0)
    with SceneRenderer(layout, intr, seed=2, near=0.02, far=20.0) as renderer:
        for c2w in poses:
            frame = renderer.render(c2w)
            table = (frame.object_ids == 0) & (frame.depth > 0)
            points = cameras.backproject(frame.depth, intr, c2w)[table]
            assert table.sum() > 100 and np.abs(points[:, 2]).max() < 2e-4


def test_table_depth_png_backprojects_to_table_plane(scene, transforms):
    for frame in transforms["frames"]:
        intr, c2w = _camera(transforms, frame)
        depth = _depth_m(scene, frame)
        _, masks = sidecars.read_instances(scene / "sidecars/instances" / (Path(frame["file_path"]).stem + ".npz"))
        table = (depth > 0) & ~masks.any(axis=0)
        points = cameras.backproject(depth, intr, c2w)[table]
        assert np.abs(points[:, 2]).max() < 3e-3  # millimetre quantisation only


def test_surface_point_projects_into_its_instance_mask(scene, transforms, meta):
    checked = {obj["id"]: 0 for obj in meta["objects"]}
    for frame in transforms["frames"]:
        intr, c2w = _camera(transforms, frame)
        depth = _depth_m(scene, frame)
        ids, masks = sidecars.read_instances(scene / "sidecars/instances" / (Path(frame["file_path"]).stem + ".npz"))
        for obj in meta["objects"]:
            uv, z = cameras.project(np.asarray([obj["surface_point"]]), intr, c2w)
            col, row = int(np.floor(uv[0, 0])), int(np.floor(uv[0, 1]))
            if not (0 <= col < intr.width and 0 <= row < intr.height) or abs(depth[row, col] - z[0]) > 6e-3:
                continue  # outside the image or occluded
            assert obj["id"] in ids.tolist(), f"object {obj['id']} visible at {frame['file_path']} but has no mask"
            assert masks[ids.tolist().index(obj["id"]), row, col], f"object {obj['id']} in {frame['file_path']}"
            checked[obj["id"]] += 1
    assert all(count >= 2 for count in checked.values()), checked


def test_masked_depth_backprojects_inside_object_bbox(scene, transforms, meta):
    boxes = {o["id"]: (np.asarray(o["bbox_min"]), np.asarray(o["bbox_max"])) for o in meta["objects"]}
    for frame in transforms["frames"]:
        intr, c2w = _camera(transforms, frame)
        points = cameras.backproject(_depth_m(scene, frame), intr, c2w)
        ids, masks = sidecars.read_instances(scene / "sidecars/instances" / (Path(frame["file_path"]).stem + ".npz"))
        assert len(ids) > 0
        for obj_id, mask in zip(ids.tolist(), masks):
            lo, hi = boxes[obj_id]
            inside = np.all((points[mask] >= lo - 3e-3) & (points[mask] <= hi + 3e-3), axis=1)
            assert inside.all(), f"object {obj_id}: {np.sum(~inside)} pixels outside its bbox"


def test_semantic_and_part_maps_agree_with_instances(scene, transforms, meta):
    class_ids = {o["id"]: meta["classes"].index(o["class"]) for o in meta["objects"]}
    part_owner = {p["id"]: p["object_id"] for p in meta["parts"]}
    assert meta["classes"] == class_list() and meta["classes"][0] == "background"
    assert all(len(o["parts"]) >= 2 for o in meta["objects"])
    for frame in transforms["frames"]:
        stem = Path(frame["file_path"]).stem
        ids, masks = sidecars.read_instances(scene / f"sidecars/instances/{stem}.npz")
        sem = sidecars.read_semantics(scene / f"sidecars/semantics/{stem}.png")
        parts = sidecars.read_parts(scene / f"sidecars/parts/{stem}.png")
        assert masks.sum(axis=0).max() <= 1  # visible masks of a render never overlap
        covered = masks.any(axis=0)
        assert np.all(sem[~covered] == 0) and np.all(parts[~covered] == 0)
        for obj_id, mask in zip(ids.tolist(), masks):
            assert mask.any() and np.all(sem[mask] == class_ids[obj_id])
            owners = {part_owner[int(p)] for p in np.unique(parts[mask])}
            assert owners == {obj_id}


def test_expressions_are_valid_and_true(scene, transforms, meta):
    config = json.loads((scene / "synth_config.json").read_text())["config"]
    margin = config["relation_margin"]
    objects = {o["id"]: o for o in meta["objects"]}
    stems = {Path(f["file_path"]).stem for f in transforms["frames"]}
    exprs = sidecars.read_expressions(scene)
    kinds = {e["kind"] for e in exprs}
    assert {"name", "colour", "size", "left_right", "front_behind", "paraphrase"} <= kinds
    assert len({e["text"] for e in exprs}) == len(exprs)
    for e in exprs:
        assert e["object_ids"] and all(i in objects for i in e["object_ids"]) and e["frames"]
        assert set(e["frames"]) <= stems
        target = objects[e["object_ids"][0]]
        if e["kind"] == "name":
            assert e["text"] == f"the {target['name']}"
        if e["kind"] == "colour":
            assert target["color"] in e["text"]
        relation = e.get("relation")
        if relation is None:
            continue
        pool = [o for o in objects.values() if relation["category"] in ("object", o["class"])]
        assert target in pool
        kind = relation["type"]
        if kind in RELATIONS:  # binary relation: true for the target, false for every other candidate
            axis, sign = RELATIONS[kind]
            anchor = objects[relation["anchor_id"]]
            assert anchor["name"] in e["text"]
            holds = [
                o["id"]
                for o in pool
                if o["id"] != anchor["id"] and sign * (o["center"][axis] - anchor["center"][axis]) > margin
            ]
            assert holds == [target["id"]], e
        elif kind in ("largest", "smallest"):
            vol = {o["id"]: float(np.prod(np.subtract(o["bbox_max"], o["bbox_min"]))) for o in pool}
            ranked = sorted(vol, key=vol.get, reverse=kind == "largest")
            assert ranked[0] == target["id"]
            ratio = vol[ranked[0]] / vol[ranked[1]]
            assert (ratio >= SIZE_RATIO) if kind == "largest" else (ratio <= 1 / SIZE_RATIO + 1e-9)
        else:  # leftmost / rightmost / frontmost / backmost
            axis, sign = {"leftmost": (0, -1), "rightmost": (0, 1), "frontmost": (1, -1), "backmost": (1, 1)}[kind]
            best = max(pool, key=lambda o: sign * o["center"][axis])
            assert best["id"] == target["id"]
    # visible frames are exactly those where the target's mask covers enough pixels
    name_expr = next(e for e in exprs if e["kind"] == "name")
    counts = {}
    for stem in sorted(stems):
        ids, masks = sidecars.read_instances(scene / f"sidecars/instances/{stem}.npz")
        hit = [m.sum() for i, m in zip(ids.tolist(), masks) if i == name_expr["object_ids"][0]]
        counts[stem] = int(hit[0]) if hit else 0
    assert name_expr["frames"] == [s for s in sorted(stems) if counts[s] >= config["min_visible_pixels"]]


def test_dataset_passes_the_sidecar_validator(scene, transforms):
    from gsstudio_ext.data.validate import validate_dataset

    files = [scene / f["file_path"] for f in transforms["frames"]]
    index = validate_dataset(
        scene, files, [(40, 48)] * len(files), require=("instances", "semantics", "parts", "expressions")
    )
    assert len(index.expressions) > 10 and index.expression_ids("frame_00000")


def test_multi_scene_mode_shares_the_class_list(tmp_path):
    config = SynthConfig(seed=1, width=24, height=24, num_views=3, eval_every=0, num_points=50, num_objects=5)
    folders = generate_scenes(tmp_path / "bench", config, num_scenes=3)
    index = json.loads((tmp_path / "bench" / "scenes.json").read_text())
    assert [s["path"] for s in index["scenes"]] == ["scene_000", "scene_001", "scene_002"]
    assert [s["split"] for s in index["scenes"]] == ["train", "train", "unseen"]
    assert len({s["seed"] for s in index["scenes"]}) == 3
    metas = [sidecars.read_scene_meta(f) for f in folders]
    assert all(m["classes"] == index["classes"] == class_list() for m in metas)
    layouts = {json.dumps([(o["class"], o["center"]) for o in m["objects"]]) for m in metas}
    assert len(layouts) == 3 and all(len(m["objects"]) == 5 for m in metas)


def test_cli_writes_and_refuses_non_empty_folder(tmp_path, capsys):
    import tyro

    from gsstudio_ext.cli.synth import SynthCommand, run

    args = [
        "--out",
        str(tmp_path / "cli"),
        "--seed",
        "3",
        "--width",
        "24",
        "--height",
        "24",
        "--num-views",
        "4",
        "--num-points",
        "100",
    ]
    folders = run(tyro.cli(SynthCommand, args=args))
    assert (folders[0] / "transforms.json").exists() and len(list((folders[0] / "images").iterdir())) == 4
    assert "Wrote 1 scene(s)" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(tyro.cli(SynthCommand, args=args))
    (folders[0] / "notes.txt").write_text("keep me")
    run(tyro.cli(SynthCommand, args=args + ["--overwrite", "--num-views", "3"]))
    assert len(list((folders[0] / "images").iterdir())) == 3 and (folders[0] / "notes.txt").exists()


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="num_objects"):
        SynthConfig(num_objects=0).check()
    with pytest.raises(ValueError, match="eval_every"):
        SynthConfig(eval_every=1).check()
    with pytest.raises(ValueError, match="max_per_class"):
        SynthConfig(num_objects=25, max_per_class=2).check()
