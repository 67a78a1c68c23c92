"""Sidecar formats, validation and delivery through the nerfstudio datamanager, on hand-built 16x16 datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from gsstudio_ext.data import layout, sidecars
from gsstudio_ext.data.sidecars import SidecarError
from gsstudio_ext.data.validate import size_compatible, validate_dataset

ALL = ("instances", "semantics", "parts", "expressions", "embeddings")
N_FRAMES, SIZE, DIM = 4, 16, 8
SCENE = {
    "objects": [
        {"id": 1, "name": "red cube", "class": "cube", "color": "red", "size": "large", "parts": [1, 2]},
        {"id": 2, "name": "blue ball", "class": "ball", "color": "blue", "size": "small", "parts": [3]},
    ],
    "classes": ["background", "cube", "ball"],
    "parts": [
        {"id": 1, "object_id": 1, "name": "top"},
        {"id": 2, "object_id": 1, "name": "side"},
        {"id": 3, "object_id": 2, "name": "shell"},
    ],
}
EXPRESSIONS = [
    {"id": 0, "text": "the red cube", "object_ids": [1], "kind": "name", "frames": ["frame_0000", "frame_0001"]},
    {"id": 1, "text": "the small thing", "object_ids": [2], "kind": "size", "frames": ["frame_0001", "frame_0003"]},
]


def stem(i: int) -> str:
    return f"frame_{i:04d}"


def frame_truth(i: int) -> Dict[str, np.ndarray]:
    """Deterministic ground truth for frame i: two overlapping masks, class, part maps, embeddings."""
    masks = np.zeros((2, SIZE, SIZE), dtype=bool)
    masks[0, 2 + i : 10 + i, 1:9] = True  # cube
    masks[1, 6:14, 5 + i : 13 + i] = True  # ball, overlaps the cube
    semantics = np.where(masks[1], 2, np.where(masks[0], 1, 0))
    parts = np.where(masks[1], 3, np.where(masks[0], np.where(np.arange(SIZE)[:, None] < 6 + i, 1, 2), 0))
    features = np.random.default_rng(i).normal(size=(2, DIM)).astype(np.float32)
    return {"ids": np.array([1, 2]), "masks": masks, "semantics": semantics, "parts": parts, "features": features}


def make_dataset(root: Path, downscaled: bool = False) -> Path:
    """Write a 4-frame transforms.json dataset with 16x16 images and every sidecar kind."""
    (root / "images").mkdir(parents=True)
    frames = []
    for i in range(N_FRAMES):
        rgb = np.random.default_rng(100 + i).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{stem(i)}.png")
        if downscaled:
            (root / "images_2").mkdir(exist_ok=True)
            Image.fromarray(rgb).resize((SIZE // 2, SIZE // 2)).save(root / "images_2" / f"{stem(i)}.png")
        angle = 2 * np.pi * i / N_FRAMES
        pose = np.eye(4)
        pose[:3, 3] = [3 * np.cos(angle), 3 * np.sin(angle), 1.0]
        frames.append({"file_path": f"images/{stem(i)}.png", "transform_matrix": pose.tolist()})
        truth = frame_truth(i)
        sidecars.write_instances(root, stem(i), truth["ids"], truth["masks"])
        sidecars.write_semantics(root, stem(i), truth["semantics"])
        sidecars.write_parts(root, stem(i), truth["parts"])
        sidecars.write_embeddings(root, stem(i), truth["ids"][::-1], truth["features"][::-1], provider="label")
    meta = {"fl_x": 20.0, "fl_y": 20.0, "cx": 8.0, "cy": 8.0, "w": SIZE, "h": SIZE, "frames": frames}
    (root / "transforms.json").write_text(json.dumps(meta))
    sidecars.write_scene_meta(root, SCENE)
    sidecars.write_expressions(root, EXPRESSIONS)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "scene")


def all_images(root: Path) -> Tuple[list, list]:
    names = [root / "images" / f"{stem(i)}.png" for i in range(N_FRAMES)]
    return names, [(SIZE, SIZE)] * N_FRAMES


def validate(root: Path, require=ALL):
    names, sizes = all_images(root)
    return validate_dataset(root, names, sizes, require=require)


def manager(root: Path, data: Path = None, **kwargs):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from gsstudio_ext.data.datamanager import SidecarDataManagerConfig

    parser = NerfstudioDataParserConfig(
        data=data or root,
        eval_mode="interval",
        eval_interval=4,
        load_3D_points=False,
        downscale_factor=kwargs.pop("downscale_factor", 1),
    )
    kwargs.setdefault("sidecars", ALL)
    return SidecarDataManagerConfig(dataparser=parser, **kwargs).setup(device="cpu", test_mode="val")


# ----- round trip of sidecars.py ---------------------------------------------------------------------------------


def test_round_trip_instances_overlapping(tmp_path: Path):
    masks = np.random.default_rng(0).random((3, 5, 7)) > 0.4  # odd size: packed bits need padding
    masks[1] |= masks[0]  # overlap
    sidecars.write_instances(tmp_path, "a", np.array([4, 9, 2]), masks)
    ids, back = sidecars.read_instances(layout.instance_path(tmp_path, "a"))
    assert ids.tolist() == [4, 9, 2] and back.dtype == bool
    np.testing.assert_array_equal(back, masks)


@pytest.mark.parametrize("high, mode", [(200, "L"), (300, "I;16")])
def test_round_trip_semantics_uint8_uint16(tmp_path: Path, high: int, mode: str):
    class_map = np.random.default_rng(1).integers(0, high, size=(6, 9))
    class_map[0, 0] = high - 1
    sidecars.write_semantics(tmp_path, "a", class_map)
    path = layout.semantic_path(tmp_path, "a")
    with Image.open(path) as image:
        assert image.mode == mode
    np.testing.assert_array_equal(sidecars.read_semantics(path), class_map)


def test_round_trip_parts_and_embeddings(tmp_path: Path):
    part_map = np.random.default_rng(2).integers(0, 1000, size=(5, 4))
    sidecars.write_parts(tmp_path, "a", part_map)
    np.testing.assert_array_equal(sidecars.read_parts(layout.part_path(tmp_path, "a")), part_map)
    for dtype in (np.float16, np.float32):
        features = np.random.default_rng(3).normal(size=(3, 5)).astype(dtype)
        sidecars.write_embeddings(tmp_path, "a", np.array([1, 2, 3]), features, provider="label")
        ids, back, provider = sidecars.read_embeddings(layout.embedding_path(tmp_path, "a"))
        assert ids.tolist() == [1, 2, 3] and provider == "label" and back.dtype == dtype
        np.testing.assert_array_equal(back, features)


# ----- validator ------------------------------------------------------------------------------------------------


def test_good_dataset_validates(dataset: Path):
    index = validate(dataset)
    assert index.kinds == ALL and index.stems == [stem(i) for i in range(N_FRAMES)]
    assert index.object_ids == [1, 2] and index.class_names == SCENE["classes"]
    assert index.expression_ids("frame_0001") == [0, 1] and index.expression_ids("frame_0002") == []
    assert index.embedding_dim == DIM


def expect_problem(root: Path, path: Path, *words: str, require=ALL) -> SidecarError:
    with pytest.raises(SidecarError) as info:
        validate(root, require)
    message = str(info.value)
    assert str(path) in message, message
    line = next(line for line in message.splitlines() if str(path) in line)
    for word in words:
        assert word in line, line
    assert "Fix:" in message
    return info.value


def test_missing_file(dataset: Path):
    path = layout.semantic_path(dataset, "frame_0002")
    path.unlink()
    expect_problem(dataset, path, "missing file")


def test_size_mismatch(dataset: Path):
    sidecars.write_semantics(dataset, "frame_0001", np.zeros((12, 16), dtype=np.int64))
    expect_problem(dataset, layout.semantic_path(dataset, "frame_0001"), "size mismatch", "12x16", "16x16")


def test_unknown_object_id(dataset: Path):
    sidecars.write_instances(dataset, "frame_0003", np.array([1, 7]), np.ones((2, SIZE, SIZE), dtype=bool))
    expect_problem(dataset, layout.instance_path(dataset, "frame_0003"), "unknown object id", "7")


def test_unknown_class_index(dataset: Path):
    sidecars.write_semantics(dataset, "frame_0000", np.full((SIZE, SIZE), 5))
    err = expect_problem(dataset, layout.semantic_path(dataset, "frame_0000"), "unknown class index", "5")
    assert len(err.problems) == 1


def test_malformed_json(dataset: Path):
    path = layout.sidecar_root(dataset) / layout.SCENE_FILE
    path.write_text('{"objects": [')
    expect_problem(dataset, path, "malformed JSON")


def test_truncated_npz(dataset: Path):
    path = layout.instance_path(dataset, "frame_0001")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_problem(dataset, path, "malformed")


def test_expression_with_unknown_frame(dataset: Path):
    sidecars.write_expressions(dataset, [{**EXPRESSIONS[0], "frames": ["frame_0000", "frame_9999"]}])
    path = layout.sidecar_root(dataset) / layout.EXPRESSIONS_FILE
    expect_problem(dataset, path, "unknown frame", "frame_9999")


def test_expression_with_unknown_object(dataset: Path):
    sidecars.write_expressions(dataset, [{**EXPRESSIONS[0], "object_ids": [3]}])
    expect_problem(dataset, layout.sidecar_root(dataset) / layout.EXPRESSIONS_FILE, "unknown object id", "[3]")


def test_all_problems_reported_at_once(dataset: Path):
    missing = layout.part_path(dataset, "frame_0000")
    missing.unlink()
    sidecars.write_instances(dataset, "frame_0002", np.array([9]), np.ones((1, SIZE, SIZE), dtype=bool))
    sidecars.write_embeddings(dataset, "frame_0003", np.array([1, 2]), np.zeros((2, DIM + 1)), provider="x")
    with pytest.raises(SidecarError) as info:
        validate(dataset)
    paths = [path for path, _ in info.value.problems]
    assert str(missing) in paths
    assert str(layout.instance_path(dataset, "frame_0002")) in paths
    assert str(layout.embedding_path(dataset, "frame_0003")) in paths
    assert str(info.value).startswith(f"{len(paths)} sidecar problem(s)")


def test_only_requested_kinds_are_checked(dataset: Path):
    layout.embedding_path(dataset, "frame_0001").unlink()
    assert validate(dataset, require=("instances", "semantics")).kinds == ("instances", "semantics")
    with pytest.raises(ValueError, match="unknown sidecar kind"):
        validate(dataset, require=("depth",))


# ----- mask-number instance ids (SAM masks from gs-preprocess) ------------------------------------------------


def make_sam_style(root: Path, manifest: bool = True, scene: bool = False) -> Path:
    """Turn the dataset into what `gs-preprocess --masks sam` leaves: per-image mask numbers 1..3, embeddings with the
    same ids, no scene.json / expressions, and (optionally) a manifest saying the ids are mask numbers."""
    side = layout.sidecar_root(root)
    for name in (layout.SCENE_FILE, layout.EXPRESSIONS_FILE):
        (side / name).unlink(missing_ok=True)
    for i in range(N_FRAMES):
        masks = np.zeros((3, SIZE, SIZE), dtype=bool)
        masks[0, :8], masks[1, :, :8], masks[2, 4 + i : 12, 4:12] = True, True, True  # overlapping
        sidecars.write_instances(root, stem(i), np.arange(1, 4), masks)
        features = np.random.default_rng(i).normal(size=(3, DIM)).astype(np.float16)
        sidecars.write_embeddings(root, stem(i), np.array([3, 1, 2]), features, provider="clip:tiny")
    if manifest:
        (side / "preprocess.json").write_text(json.dumps({"version": 1, "instance_ids": "masks", "images": {}}))
    if scene:
        sidecars.write_scene_meta(root, SCENE)  # objects 1, 2: mask number 3 is no object
    return root


SAM_KINDS = ("instances", "embeddings")


def test_mask_number_ids_need_no_scene_json(dataset: Path):
    make_sam_style(dataset)
    index = validate(dataset, require=SAM_KINDS)
    assert index.instance_ids == "masks" and index.scene == {} and index.object_ids == []
    assert index.embedding_dim == DIM
    make_sam_style(dataset, scene=True)  # a scene.json, when there is one, is not matched against mask numbers
    assert validate(dataset, require=SAM_KINDS).object_ids == [1, 2]
    # ground-truth datasets keep the default, checked against scene objects
    assert validate(make_dataset(dataset.parent / "gt"), require=SAM_KINDS).instance_ids == "objects"


def test_mask_number_ids_load_through_datamanager(dataset: Path):
    make_sam_style(dataset)
    dm = manager(dataset, sidecars=SAM_KINDS)
    assert dm.sidecar_index.instance_ids == "masks" and dm.train_dataset.metadata["scene"] == {}
    camera, data = dm.next_train(0)
    i = int(dm.train_stems[camera.metadata["cam_idx"]][-4:])
    _, masks = sidecars.read_instances(layout.instance_path(dataset, stem(i)))
    assert data["instance_ids"].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(data["instance_masks"].numpy(), masks)
    assert data["embedding_ids"].tolist() == [1, 2, 3]  # written as [3, 1, 2], delivered aligned with the masks
    _, features, _ = sidecars.read_embeddings(layout.embedding_path(dataset, stem(i)))
    np.testing.assert_allclose(data["embeddings"].numpy(), features[[1, 2, 0]].astype(np.float32))
    _, data = dm.next_eval_image(0)
    assert data["instance_ids"].tolist() == [1, 2, 3]


def test_mask_number_ids_without_manifest_fail(dataset: Path):
    make_sam_style(dataset, manifest=False)
    scene_path = layout.sidecar_root(dataset) / layout.SCENE_FILE
    err = expect_problem(dataset, scene_path, "missing file (scene meta", '"instance_ids": "masks"', require=SAM_KINDS)
    assert len(err.problems) == 1
    make_sam_style(dataset, manifest=False, scene=True)
    with pytest.raises(SidecarError) as info:
        validate(dataset, require=SAM_KINDS)
    reasons = dict(info.value.problems)
    for i in range(N_FRAMES):
        for path in (layout.instance_path(dataset, stem(i)), layout.embedding_path(dataset, stem(i))):
            assert reasons[str(path)].startswith("unknown object id(s) [3] (not in scene.json objects)")
    assert '"instance_ids": "masks"' in reasons[str(layout.instance_path(dataset, stem(0)))]
    (layout.sidecar_root(dataset) / "preprocess.json").write_text(json.dumps({"instance_ids": "objects"}))
    with pytest.raises(SidecarError, match=r"unknown object id\(s\) \[3\]"):  # an "objects" manifest: as with none
        validate(dataset, require=SAM_KINDS)


def test_mask_number_ids_still_check_everything_else(dataset: Path):
    make_sam_style(dataset)
    missing = layout.embedding_path(dataset, stem(0))
    missing.unlink()
    sidecars.write_instances(dataset, stem(1), np.arange(1, 4), np.ones((3, 12, SIZE), dtype=bool))
    sidecars.write_embeddings(dataset, stem(2), np.array([1, 2]), np.zeros((2, DIM), np.float32), provider="x")
    sidecars.write_embeddings(dataset, stem(3), np.arange(1, 4), np.zeros((3, DIM + 1), np.float32), provider="x")
    with pytest.raises(SidecarError) as info:
        validate(dataset, require=SAM_KINDS)
    reasons = dict(info.value.problems)
    assert len(reasons) == 4 and "Fix:" in str(info.value)
    assert reasons[str(missing)] == "missing file"
    assert "size mismatch" in reasons[str(layout.instance_path(dataset, stem(1)))]
    assert "differ from instances" in reasons[str(layout.embedding_path(dataset, stem(2)))]
    assert f"feature size {DIM + 1} differs" in reasons[str(layout.embedding_path(dataset, stem(3)))]
    # duplicate and background ids are still wrong for mask numbers
    make_sam_style(dataset)
    sidecars.write_instances(dataset, stem(1), np.array([0, 2, 2]), np.ones((3, SIZE, SIZE), dtype=bool))
    with pytest.raises(SidecarError) as info:
        validate(dataset, require=("instances",))
    path = str(layout.instance_path(dataset, stem(1)))
    assert [(p, r.split(" [")[0].split(";")[0]) for p, r in info.value.problems] == [
        (path, "duplicate mask ids"),
        (path, "mask ids must be >= 1 (0 is background)"),
    ]


def test_mask_number_ids_other_kinds_still_need_scene_json(dataset: Path):
    make_sam_style(dataset)
    scene_path = layout.sidecar_root(dataset) / layout.SCENE_FILE
    err = expect_problem(dataset, scene_path, "missing file (scene meta", require=("instances", "semantics"))
    assert "instance_ids" not in str(err)  # no hint: semantics need scene.json whatever the ids are


@pytest.mark.parametrize("text, words", [("{oops", "malformed JSON"), ('{"instance_ids": "sam"}', "must be one of")])
def test_bad_manifest_is_reported(dataset: Path, text: str, words: str):
    make_sam_style(dataset, scene=True)
    path = layout.sidecar_root(dataset) / "preprocess.json"
    path.write_text(text)
    expect_problem(dataset, path, words, require=SAM_KINDS)
    assert validate(dataset, require=("parts",)).kinds == ("parts",)  # only read when instance ids matter


def test_size_compatible_rule():
    assert size_compatible((16, 16), (16, 16)) and size_compatible((16, 16), (8, 8))
    assert size_compatible((15, 21), (7, 10))  # odd sizes halved with rounding
    assert not size_compatible((8, 8), (16, 16)) and not size_compatible((12, 16), (16, 16))


# ----- datamanager ----------------------------------------------------------------------------------------------


def check_batch(data: Dict, i: int, hw=(SIZE, SIZE)):
    """Compare a batch's sidecar tensors with the ground truth of frame i (nearest-resized to hw)."""
    truth = frame_truth(i)
    rows = ((np.arange(hw[0]) + 0.5) * SIZE / hw[0]).astype(int)
    cols = ((np.arange(hw[1]) + 0.5) * SIZE / hw[1]).astype(int)
    assert data["image"].shape == (*hw, 3)
    assert data["instance_ids"].dtype == torch.long and data["instance_ids"].tolist() == [1, 2]
    assert data["instance_masks"].dtype == torch.bool
    np.testing.assert_array_equal(data["instance_masks"].numpy(), truth["masks"][:, rows][:, :, cols])
    assert data["semantics"].dtype == torch.long and data["parts"].dtype == torch.long
    np.testing.assert_array_equal(data["semantics"].numpy(), truth["semantics"][rows][:, cols])
    np.testing.assert_array_equal(data["parts"].numpy(), truth["parts"][rows][:, cols])
    expected = [k for k, e in enumerate(EXPRESSIONS) if stem(i) in e["frames"]]
    assert data["expression_ids"].dtype == torch.long and data["expression_ids"].tolist() == expected
    # written in reverse order; delivered aligned with instance_ids
    assert data["embeddings"].dtype == torch.float32 and data["embedding_ids"].tolist() == [1, 2]
    np.testing.assert_allclose(data["embeddings"].numpy(), truth["features"])


def test_datamanager_delivers_sidecars(dataset: Path):
    dm = manager(dataset)
    assert len(dm.train_dataset) + len(dm.eval_dataset) == N_FRAMES  # no view dropped
    assert len(dm.cached_train) == len(dm.train_dataset) == 3
    assert dm.eval_stems == ["frame_0000"]
    meta = dm.train_dataset.metadata
    assert meta["scene"]["classes"] == SCENE["classes"] and meta["expressions"] == EXPRESSIONS
    seen = set()
    for step in range(len(dm.train_dataset)):
        camera, data = dm.next_train(step)
        idx = camera.metadata["cam_idx"]
        seen.add(idx)
        check_batch(data, int(dm.train_stems[idx][-4:]))
    assert seen == {0, 1, 2}
    camera, data = dm.next_eval_image(0)
    check_batch(data, 0)
    ((camera, data),) = dm.fixed_indices_eval_dataloader
    check_batch(data, 0)


def test_datamanager_accepts_transforms_json_path(dataset: Path):
    dm = manager(dataset, data=dataset / "transforms.json", sidecars=("semantics",))
    assert dm.sidecar_index.root == dataset
    _, data = dm.next_train(0)
    assert "semantics" in data and "instance_masks" not in data


def test_datamanager_reports_bad_sidecars_at_startup(dataset: Path):
    layout.instance_path(dataset, "frame_0000").unlink()  # an eval frame: eval split is validated too
    with pytest.raises(SidecarError, match="missing file"):
        manager(dataset)
    with pytest.raises(ValueError, match="unknown sidecar kind"):
        manager(dataset, sidecars=("masks",))


def test_set_train_image_changes_next_train(dataset: Path):
    dm = manager(dataset, sidecars=(), cache_images_type="float32")
    target = dm.train_index("frame_0002")
    edited = torch.full((SIZE, SIZE, 3), 0.25)
    dm.set_train_image(target, edited)
    hits = 0
    for step in range(2 * len(dm.train_dataset)):
        camera, data = dm.next_train(step)
        if camera.metadata["cam_idx"] == target:
            torch.testing.assert_close(data["image"], edited)
            hits += 1
        else:
            assert not torch.allclose(data["image"], edited)
    assert hits == 2
    with pytest.raises(ValueError, match="shape"):
        dm.set_train_image(target, torch.zeros(8, 8, 3))


def test_set_train_image_uint8_cache(dataset: Path):
    dm = manager(dataset, sidecars=(), cache_images_type="uint8")
    dm.set_train_image(0, torch.full((SIZE, SIZE, 3), 0.5))
    assert dm.get_train_image(0).dtype == torch.uint8 and int(dm.get_train_image(0)[0, 0, 0]) == 128


def test_eval_frames_selects_named_training_frames(dataset: Path):
    dm = manager(dataset, eval_frames=("frame_0002", "frame_0001.png"))
    assert dm.eval_stems == ["frame_0002", "frame_0001"]
    assert set(dm.eval_stems) <= set(dm.train_stems)
    batches = dm.fixed_indices_eval_dataloader
    assert len(batches) == 2
    for (camera, data), i in zip(batches, (2, 1)):
        check_batch(data, i)
        train_camera = dm.train_dataset.cameras[dm.train_index(stem(i))]
        torch.testing.assert_close(camera.camera_to_worlds[0], train_camera.camera_to_worlds)
    with pytest.raises(ValueError, match="frame_0042"):
        manager(dataset, eval_frames=("frame_0042",))


def test_downscaled_images_get_resized_sidecars(tmp_path: Path):
    root = make_dataset(tmp_path / "scene", downscaled=True)
    dm = manager(root, downscale_factor=2)
    camera, data = dm.next_train(0)
    check_batch(data, int(dm.train_stems[camera.metadata["cam_idx"]][-4:]), hw=(8, 8))
    dm = manager(root, camera_res_scale_factor=0.5)  # InputDataset resize instead of images_2
    camera, data = dm.next_train(0)
    check_batch(data, int(dm.train_stems[camera.metadata["cam_idx"]][-4:]), hw=(8, 8))


def test_resize_matches_pil_nearest():
    from gsstudio_ext.data.sidecar_dataset import resize_nearest

    labels = np.random.default_rng(4).integers(0, 250, size=(16, 12)).astype(np.uint8)
    for hw in ((8, 6), (5, 7), (16, 12)):
        pil = np.asarray(Image.fromarray(labels).resize((hw[1], hw[0]), resample=Image.Resampling.NEAREST))
        np.testing.assert_array_equal(resize_nearest(torch.from_numpy(labels), hw).numpy(), pil)


def test_config_defaults():
    from gsstudio_ext.data.datamanager import SidecarDataManager, SidecarDataManagerConfig

    config = SidecarDataManagerConfig()
    assert config._target is SidecarDataManager and config.cache_images == "gpu" and config.cache_images_type == "uint8"
    assert config.dataparser.load_3D_points is True and config.sidecars == () and config.eval_frames == ()
