"""gs-refer-masks: pseudo target masks of referring expressions (detector box + SAM), as sidecars, cached."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from gsstudio_ext.cli.refer_masks import main as refer_masks_main
from gsstudio_ext.data import layout
from gsstudio_ext.data.preprocess import list_images
from gsstudio_ext.data.referring_masks import (
    make_referring_masks,
    manifest_path,
    read_expression_file,
)
from gsstudio_ext.data.sidecar_dataset import load_sidecars
from gsstudio_ext.data.sidecars import SidecarError, read_expressions, read_instances, read_scene_meta, write_instances
from gsstudio_ext.data.validate import validate_dataset
from gsstudio_ext.models.box_masks import TinySamBoxConfig
from gsstudio_ext.models.detection import GroundingDinoConfig, TinyGroundingDinoConfig
from gsstudio_ext.models.errors import MissingWeightsError

FRAMES = 4
GT_FILES = (layout.SCENE_FILE, layout.EXPRESSIONS_FILE, layout.INSTANCES_DIR)


def copy_scene(scene: Path, dst: Path, keep_gt: bool = False) -> Path:
    """The first FRAMES frames of the session scene; without keep_gt, as a "real" scene (no object sidecars)."""
    shutil.copytree(scene, dst)
    meta = json.loads((dst / "transforms.json").read_text())
    meta["frames"] = meta["frames"][:FRAMES]
    for key in ("train_filenames", "val_filenames", "test_filenames"):
        meta.pop(key, None)
    (dst / "transforms.json").write_text(json.dumps(meta))
    if not keep_gt:
        for name in GT_FILES:
            path = layout.sidecar_root(dst) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dst


def sidecar_mtimes(data: Path) -> Dict[str, int]:
    root = layout.sidecar_root(data)
    files = [*sorted((root / "instances").glob("*.npz")), root / layout.SCENE_FILE, root / layout.EXPRESSIONS_FILE]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in [*files, manifest_path(data)]}


def validate(data: Path):
    images = list_images(data)
    return validate_dataset(data, images, [(96, 96)] * len(images), require=("instances", "expressions"))


# ---- a detector that knows the ground truth, and a segmenter that fills the box -------------------------------------
@dataclass
class GTBoxSettings:
    margin: int = 0
    """Pixels added around the true box (a config knob: changing it must invalidate the cache)."""


class GTBoxDetector:
    """Returns the ground-truth box of the object named "the <name>" (scene.json names), plus a worse decoy box."""

    def __init__(self, scene: Path, margin: int = 0) -> None:
        self.config = GTBoxSettings(margin)
        self.ids = {o["name"]: int(o["id"]) for o in read_scene_meta(scene)["objects"]}
        self.truth: Dict[bytes, Tuple[np.ndarray, np.ndarray]] = {}
        for path in list_images(scene):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            self.truth[rgb.tobytes()] = read_instances(layout.instance_path(scene, path.stem))
        self.calls = 0

    def detect(self, image: np.ndarray, text: str) -> Tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        none = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        target = self.ids.get(text.removeprefix("the "))
        if target is None or image.tobytes() not in self.truth:
            return none
        ids, masks = self.truth[image.tobytes()]
        if target not in ids.tolist() or not masks[ids.tolist().index(target)].any():
            return none
        box = gt_box(masks[ids.tolist().index(target)], self.config.margin)
        decoy = np.array([0, 0, 3, 3], np.float32)
        return np.stack([box, decoy]).astype(np.float32), np.array([0.9, 0.5], np.float32)


class BoxFill:
    """Segmenter whose mask is exactly the box (pixel edges)."""

    def segment_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(boxes), *image.shape[:2]), dtype=bool)
        for m, (x0, y0, x1, y1) in zip(out, np.round(boxes).astype(int)):
            m[y0:y1, x0:x1] = True
        return out


def gt_box(mask: np.ndarray, margin: int = 0) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [
            max(xs.min() - margin, 0),
            max(ys.min() - margin, 0),
            min(xs.max() + 1 + margin, w),
            min(ys.max() + 1 + margin, h),
        ],
        np.float32,
    )


def box_mask(box: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    return BoxFill().segment_boxes(np.zeros((*hw, 3), np.uint8), box[None])[0]


@pytest.fixture(scope="module")
def tiny_models():
    return TinyGroundingDinoConfig().setup(), TinySamBoxConfig().setup()


# ---- tiny models end to end ----------------------------------------------------------------------------------------
def test_tiny_models_write_valid_sidecars_that_load_and_cache(default_scene: Path, tmp_path: Path, tiny_models) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from gsstudio_ext.data.datamanager import SidecarDataManagerConfig

    data = copy_scene(default_scene, tmp_path / "scene")
    texts = ["the red car", "a small mug on the left"]
    detector, segmenter = tiny_models
    report = make_referring_masks(data, texts, detector, segmenter, progress=False)
    stems = [p.stem for p in list_images(data)]
    assert report.stems == stems and report.computed == stems and report.written == stems
    assert report.detections == FRAMES * 2 and report.expressions == texts

    scene = read_scene_meta(data)
    assert [(o["id"], o["name"], o["class"]) for o in scene["objects"]] == [
        (1, texts[0], "referring"),
        (2, texts[1], "referring"),
    ]
    assert scene["classes"] == ["background", "referring"]
    exprs = read_expressions(data)
    assert [(e["id"], e["text"], e["object_ids"], e["kind"]) for e in exprs] == [
        (0, texts[0], [1], "pseudo"),
        (1, texts[1], [2], "pseudo"),
    ]
    found = 0
    for stem in stems:
        ids, masks = read_instances(layout.instance_path(data, stem))
        assert masks.dtype == bool and masks.shape == (len(ids), 96, 96) and set(ids.tolist()) <= {1, 2}
        assert masks.reshape(len(ids), -1).any(1).all()  # no empty target masks
        for k, e in enumerate(exprs):
            assert (stem in e["frames"]) == (k + 1 in ids.tolist())
        found += len(ids)
    assert found == sum(len(f) for f in report.frames.values()) >= FRAMES  # the random tiny detector finds boxes
    index = validate(data)
    for stem in stems:  # load_sidecars gives every view its targets
        got = load_sidecars(index, stem, (96, 96))
        ids, masks = read_instances(layout.instance_path(data, stem))
        assert got["instance_ids"].tolist() == ids.tolist() and torch.equal(
            got["instance_masks"], torch.from_numpy(masks)
        )
        assert got["expression_ids"].tolist() == [i - 1 for i in ids.tolist()]

    parser = NerfstudioDataParserConfig(data=data, eval_mode="interval", eval_interval=4, load_3D_points=False)
    dm = SidecarDataManagerConfig(dataparser=parser, sidecars=("instances", "expressions")).setup(device="cpu")
    assert [e["text"] for e in dm.train_dataset.metadata["expressions"]] == texts
    for i, stem in enumerate(dm.train_stems):
        ids, masks = read_instances(layout.instance_path(data, stem))
        assert dm.cached_train[i]["instance_ids"].tolist() == ids.tolist()
        assert torch.equal(dm.cached_train[i]["instance_masks"].cpu(), torch.from_numpy(masks))

    before = sidecar_mtimes(data)
    again = make_referring_masks(data, None, detector, segmenter, progress=False)  # expressions from the last run
    assert again.all_cached and again.detections == 0 and again.computed == [] and again.expressions == texts
    assert sidecar_mtimes(data) == before  # nothing rewritten, manifest included
    assert again.frames == report.frames


# ---- a good detector gives the right masks -------------------------------------------------------------------------
def test_gt_detector_and_box_fill_give_gt_boxes(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene")
    names = [o["name"] for o in read_scene_meta(default_scene)["objects"]]
    texts = [f"the {n}" for n in names] + ["the giraffe"]
    report = make_referring_masks(data, texts, GTBoxDetector(default_scene), BoxFill(), progress=False)
    assert report.not_found == ["the giraffe"] and report.detections == FRAMES * len(texts)
    checked = 0
    for stem in report.stems:
        gt_ids, gt_masks = read_instances(layout.instance_path(default_scene, stem))
        gt = {int(i): m for i, m in zip(gt_ids.tolist(), gt_masks) if m.any()}
        ids, masks = read_instances(layout.instance_path(data, stem))
        visible = [k for k in range(len(names)) if k + 1 in gt]
        assert ids.tolist() == [k + 1 for k in visible]  # expression k names scene object k + 1 here
        for row, k in enumerate(visible):
            assert np.array_equal(masks[row], box_mask(gt_box(gt[k + 1]), (96, 96)))  # the best box, not the decoy
            checked += 1
    assert checked >= 2 * FRAMES
    exprs = read_expressions(data)
    assert exprs[-1]["frames"] == [] and exprs[-1]["object_ids"] == [len(texts)]
    validate(data)


# ---- caching -------------------------------------------------------------------------------------------------------
def test_cache_recomputes_exactly_what_changed(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene")
    stems = [p.stem for p in list_images(data)]
    texts = ["the mug", "the duck", "the car"]
    det, fill = GTBoxDetector(default_scene), BoxFill()
    make_referring_masks(data, texts, det, fill, progress=False)

    # an edited image: only its stem is redone (all expressions on it)
    image = list_images(data)[2]
    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(image)
    report = make_referring_masks(data, texts, det, fill, progress=False)
    assert report.computed == [stems[2]] and report.detections == len(texts) and report.written == [stems[2]]
    assert read_instances(layout.instance_path(data, stems[2]))[0].tolist() == []  # the fake knows only GT images

    # a new detector setting: every stem
    wider = GTBoxDetector(default_scene, margin=2)
    report = make_referring_masks(data, texts, wider, fill, progress=False)
    assert report.computed == stems and report.detections == FRAMES * len(texts)

    # one more expression: only it is detected; the others keep their masks and ids
    old = {s: read_instances(layout.instance_path(data, s)) for s in stems}
    report = make_referring_masks(data, [*texts, "the chair"], wider, fill, progress=False)
    assert report.detections == FRAMES and report.computed == stems
    for s in stems:
        ids, masks = read_instances(layout.instance_path(data, s))
        keep = [i for i in ids.tolist() if i <= len(texts)]
        assert keep == old[s][0].tolist() and np.array_equal(masks[: len(keep)], old[s][1])

    # reordered expressions: no detection, files rewritten with the new ids
    reordered = ["the chair", "the car", "the duck", "the mug"]
    report = make_referring_masks(data, reordered, wider, fill, progress=False)
    assert report.detections == 0 and report.computed == [] and report.written
    mug = read_expressions(data)[3]
    assert mug["text"] == "the mug" and mug["object_ids"] == [4]
    for s in stems:
        ids, masks = read_instances(layout.instance_path(data, s))
        if 1 in old[s][0].tolist():  # the mug was object 1, now 4
            assert np.array_equal(masks[ids.tolist().index(4)], old[s][1][old[s][0].tolist().index(1)])
    validate(data)
    report = make_referring_masks(data, reordered, wider, fill, progress=False)
    assert report.all_cached


# ---- refusals and errors -------------------------------------------------------------------------------------------
def test_refuses_foreign_sidecars_unless_overwrite(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", keep_gt=True)
    before = {p: p.read_bytes() for p in sorted(layout.sidecar_root(data).rglob("*")) if p.is_file()}
    det, fill = GTBoxDetector(default_scene), BoxFill()
    with pytest.raises(FileExistsError, match="not written by gs-refer-masks") as err:
        make_referring_masks(data, ["the mug"], det, fill, progress=False)
    assert "instances/frame_00000.npz" in str(err.value) and "overwrite" in str(err.value)
    assert {p: p.read_bytes() for p in before} == before and not manifest_path(data).exists()
    assert det.calls == 0

    report = make_referring_masks(data, ["the mug"], det, fill, overwrite=True, progress=False)
    assert report.computed == report.stems and any("semantics" in w for w in report.warnings)
    assert [o["name"] for o in read_scene_meta(data)["objects"]] == ["the mug"]
    validate(data)

    # a hand-edited instance file is not ours any more
    stem = report.stems[1]
    write_instances(data, stem, np.array([1]), np.ones((1, 96, 96), bool))
    with pytest.raises(FileExistsError, match=f"instances/{stem}.npz"):
        make_referring_masks(data, ["the mug"], det, fill, progress=False)
    report = make_referring_masks(data, ["the mug"], det, fill, overwrite=True, progress=False)
    assert report.computed == [stem]


def test_missing_weights_fail_before_writing(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene")
    with pytest.raises(MissingWeightsError) as err:
        make_referring_masks(data, ["the mug"], GroundingDinoConfig(), BoxFill(), progress=False)
    assert "IDEA-Research/grounding-dino-tiny" in str(err.value) and "huggingface-cli download" in str(err.value)
    with pytest.raises(MissingWeightsError, match="sam_vit_h_4b8939.pth"):
        make_referring_masks(data, ["the mug"], GTBoxDetector(default_scene), None, progress=False)
    assert sorted(p.name for p in layout.sidecar_root(data).iterdir()) == ["parts", "semantics"]  # nothing written


def test_expression_inputs(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene")
    det, fill = GTBoxDetector(default_scene), BoxFill()
    with pytest.raises(ValueError, match="no referring expressions given"):
        make_referring_masks(data, [], det, fill, progress=False)
    with pytest.raises(ValueError, match="no referring expressions given"):
        make_referring_masks(data, None, det, fill, progress=False)  # no earlier run to reuse
    with pytest.raises(ValueError, match="empty"):
        make_referring_masks(data, ["the mug", "  "], det, fill, progress=False)
    listing = tmp_path / "expressions.txt"
    listing.write_text("# targets\n\nthe mug\n  the   duck \nthe mug\n")
    assert read_expression_file(listing) == ["the mug", "the   duck", "the mug"]
    report = make_referring_masks(data, read_expression_file(listing), det, fill, progress=False)
    assert report.expressions == ["the mug", "the duck"] and "repeated" in report.warnings[0]
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no referring expressions given"):
        make_referring_masks(data, read_expression_file(tmp_path / "blank.txt"), det, fill, progress=False)
    assert not any(p.name.endswith(".tmp") for p in layout.sidecar_root(data).rglob("*"))


def test_pseudo_kind_is_valid_and_unknown_kinds_are_not(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene")
    make_referring_masks(data, ["the mug"], GTBoxDetector(default_scene), BoxFill(), progress=False)
    assert read_expressions(data)[0]["kind"] == "pseudo"
    validate(data)
    path = layout.sidecar_root(data) / layout.EXPRESSIONS_FILE
    exprs = json.loads(path.read_text())
    exprs[0]["kind"] = "guess"
    path.write_text(json.dumps(exprs))
    with pytest.raises(SidecarError, match="unknown kind 'guess'"):
        validate(data)


# ---- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_tiny_then_cached(default_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", keep_gt=True)
    listing = tmp_path / "e.txt"
    listing.write_text("the duck\n")
    args: List[str] = ["--data", str(data), "--expressions", str(listing), "--detector", "tiny", "--segmenter", "tiny"]
    with pytest.raises(SystemExit) as err:
        refer_masks_main([*args, "--no-progress"])
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().out.replace("\n", "")
    report = refer_masks_main([*args, "--overwrite", "--no-progress"])
    assert report.detections == FRAMES and report.expressions == ["the duck"]
    again = refer_masks_main(["--data", str(data), "--detector", "tiny", "--segmenter", "tiny", "--no-progress"])
    assert again.all_cached and "all cached" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:  # real weights are not on this machine
        refer_masks_main(["--data", str(data), "--no-progress"])
    assert err.value.code == 2 and "grounding-dino-tiny" in capsys.readouterr().out
