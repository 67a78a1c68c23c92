"""gs-preprocess: masks (SAM / sidecars) + per-mask embeddings (CLIP crops / labels), cached by content hash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from gsstudio_ext.core.masks import pairwise_mask_iou
from gsstudio_ext.data import layout
from gsstudio_ext.data.embedding_sources import ClipCropEmbeddingConfig, LabelEmbeddingConfig
from gsstudio_ext.data.mask_sources import SamMaskSourceConfig, SidecarMaskSourceConfig
from gsstudio_ext.data.preprocess import list_images, load_manifest, manifest_path, preprocess_dataset
from gsstudio_ext.data.sidecars import SidecarError, read_embeddings, read_instances, read_scene_meta, write_embeddings
from gsstudio_ext.data.validate import validate_dataset
from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.image_text import TinyImageTextConfig
from gsstudio_ext.models.masks import SamAutomaticConfig, TinySamConfig
from gsstudio_ext.models.text import MiniLMTextConfig


def copy_scene(scene: Path, dst: Path, frames: Optional[int] = None) -> Path:
    """Copy the session scene (never modify it); optionally keep only the first ``frames`` frames."""
    shutil.copytree(scene, dst)
    if frames is not None:
        meta = json.loads((dst / "transforms.json").read_text())
        meta["frames"] = meta["frames"][:frames]
        kept = {f["file_path"] for f in meta["frames"]}
        for key in ("train_filenames", "val_filenames", "test_filenames"):
            meta[key] = [f for f in meta.get(key, []) if f in kept]
        (dst / "transforms.json").write_text(json.dumps(meta))
    return dst


def stems_of(data: Path) -> List[str]:
    return [p.stem for p in list_images(data)]


def mtimes(data: Path) -> Dict[str, int]:
    """mtime_ns of every sidecar file written by preprocessing (instances, embeddings, manifest)."""
    root = layout.sidecar_root(data)
    files = [*sorted((root / "instances").glob("*.npz")), *sorted((root / "embeddings").glob("*.npz"))]
    files += [manifest_path(data)] if manifest_path(data).exists() else []
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in files}


def tiny_sam(**overrides) -> SamMaskSourceConfig:
    # random tiny SAM: keep all of its (low-scored, heavily nested) proposals so that mask NMS has work to do; the
    # containment test would drop every one of these random masks, so it is off here (core tests cover it)
    generator = TinySamConfig(box_nms_thresh=1.0, stability_score_offset=0.0)
    return SamMaskSourceConfig(generator=generator, nms_score_thresh=0.0, nms_inner_thresh=None, **overrides)


def tiny_clip(**overrides) -> ClipCropEmbeddingConfig:
    return ClipCropEmbeddingConfig(encoder=TinyImageTextConfig(), **overrides)


def test_label_embeddings_are_minilm_encodings_of_object_names(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", frames=12)
    instance_files = sorted((layout.sidecar_root(data) / "instances").glob("*.npz"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in instance_files}

    report = preprocess_dataset(data, SidecarMaskSourceConfig(), LabelEmbeddingConfig(), progress=False)

    stems = stems_of(data)
    assert report.provider == "label:minilm" and report.embedding_dim == 384
    assert report.computed_masks == [] and report.computed_embeddings == stems
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in instance_files} == before  # untouched
    names = {int(o["id"]): o["name"] for o in read_scene_meta(data)["objects"]}
    encoder = MiniLMTextConfig().setup()
    for stem in stems:
        inst_ids, _ = read_instances(layout.instance_path(data, stem))
        ids, feats, provider = read_embeddings(layout.embedding_path(data, stem))
        assert provider == "label:minilm" and feats.dtype == np.float16
        assert ids.tolist() == inst_ids.tolist()
        direct = encoder.encode([names[int(i)] for i in ids])
        cos = (torch.from_numpy(feats.astype(np.float32)) * direct).sum(-1)
        assert torch.all(cos > 0.999), (stem, cos)
    # the full validator (object ids checked against scene.json) accepts the result
    images = list_images(data)
    validate_dataset(data, images, [(96, 96)] * len(images), require=("instances", "embeddings"))
    assert load_manifest(data)["instance_ids"] == "objects"


def test_label_embeddings_refuse_masks_without_object_ids(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", frames=2)
    with pytest.raises(ValueError, match="carry no object ids"):
        preprocess_dataset(data, tiny_sam(), LabelEmbeddingConfig(), progress=False)
    assert not manifest_path(data).exists()


def test_sam_clip_writes_valid_sidecars_and_caches_by_content(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", frames=4)
    stems = stems_of(data)
    gt_file = layout.instance_path(data, stems[0])
    gt_bytes = gt_file.read_bytes()
    with pytest.raises(FileExistsError, match="not written by gs-preprocess"):  # never silently replace GT masks
        preprocess_dataset(data, tiny_sam(), tiny_clip(), progress=False)
    assert gt_file.read_bytes() == gt_bytes and not manifest_path(data).exists()

    sam, clip = tiny_sam().setup(), tiny_clip().setup()  # sources (models load once) are reused across runs
    report = preprocess_dataset(data, sam, clip, force=True, progress=False)
    assert report.computed_masks == stems and report.computed_embeddings == stems
    assert report.provider == "clip:tiny" and report.embedding_dim == 32
    assert max(report.num_masks.values()) >= 3
    for stem in stems:
        ids, masks = read_instances(layout.instance_path(data, stem))
        emb_ids, feats, provider = read_embeddings(layout.embedding_path(data, stem))
        assert ids.tolist() == list(range(1, len(ids) + 1)) and masks.shape == (len(ids), 96, 96)
        assert masks.reshape(len(ids), -1).sum(1).min() > 25  # small masks dropped
        iou = pairwise_mask_iou(masks).fill_diagonal_(0.0)
        assert float(iou.max()) <= 0.8  # mask NMS held
        assert emb_ids.tolist() == ids.tolist() and provider == "clip:tiny"
        assert feats.dtype == np.float16 and feats.shape == (len(ids), 32)
        assert np.allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert load_manifest(data)["instance_ids"] == "masks"

    # same config, same images: nothing is rewritten
    snapshot = mtimes(data)
    again = preprocess_dataset(data, sam, clip, progress=False)
    assert again.all_cached and again.cached == stems
    assert mtimes(data) == snapshot

    # a touch (mtime only) is not a change: the cache keys on content
    image = list_images(data)[2]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert preprocess_dataset(data, sam, clip, progress=False).all_cached

    # editing one image recomputes only that image
    pixels = np.array(Image.open(image))
    pixels[:20, :20] = 255 - pixels[:20, :20]
    Image.fromarray(pixels).save(image)
    snapshot = mtimes(data)
    edited = preprocess_dataset(data, sam, clip, progress=False)
    assert edited.computed_masks == [image.stem] and edited.computed_embeddings == [image.stem]
    changed = {k for k, v in mtimes(data).items() if snapshot.get(k) != v}
    assert changed == {f"instances/{image.stem}.npz", f"embeddings/{image.stem}.npz", "preprocess.json"}

    # a changed mask config recomputes every mask; a changed embedding config every embedding (masks kept)
    sam = tiny_sam(nms_iou_thresh=0.5).setup()
    remasked = preprocess_dataset(data, sam, clip, progress=False)
    assert remasked.computed_masks == stems
    reembedded = preprocess_dataset(data, sam, tiny_clip(resize_mode="longest"), progress=False)
    assert reembedded.computed_masks == [] and reembedded.computed_embeddings == stems

    # SAM mask ids are mask numbers: label embeddings refuse them even through the sidecar source
    with pytest.raises(ValueError, match="mask numbers, not object ids"):
        preprocess_dataset(data, SidecarMaskSourceConfig(), LabelEmbeddingConfig(), progress=False)


def test_sam_every_kth_view_leaves_other_views_without_masks(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", frames=4)
    report = preprocess_dataset(data, tiny_sam(every_kth_view=2), tiny_clip(), force=True, progress=False)
    counts = [report.num_masks[s] for s in stems_of(data)]
    assert counts[0] > 0 and counts[2] > 0 and counts[1] == 0 and counts[3] == 0
    ids, feats, _ = read_embeddings(layout.embedding_path(data, stems_of(data)[1]))
    assert ids.shape == (0,) and feats.shape == (0, 32)


def test_missing_sam_checkpoint_names_the_file(default_scene: Path, tmp_path: Path) -> None:
    data = copy_scene(default_scene, tmp_path / "scene", frames=2)
    missing = tmp_path / "weights" / "sam_vit_h_4b8939.pth"
    sam = SamMaskSourceConfig(generator=SamAutomaticConfig(checkpoint=missing))
    with pytest.raises(MissingWeightsError, match="sam_vit_h_4b8939.pth") as err:
        preprocess_dataset(data, sam, tiny_clip(), force=True, progress=False)
    assert str(missing) in str(err.value) and "dl.fbaipublicfiles.com" in str(err.value)
    with pytest.raises(MissingWeightsError, match="--sam.checkpoint is not set"):
        preprocess_dataset(data, SamMaskSourceConfig(), tiny_clip(), force=True, progress=False)
    assert not manifest_path(data).exists() and not (layout.sidecar_root(data) / "embeddings").exists()


def test_image_listing(tmp_path: Path) -> None:
    (tmp_path / "colmap" / "images").mkdir(parents=True)
    for name in ("b.jpg", "a.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "colmap" / "images" / name)
    (tmp_path / "colmap" / "images" / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path / "colmap")] == ["a.png", "b.jpg"]
    (tmp_path / "ns").mkdir()
    (tmp_path / "ns" / "transforms.json").write_text(json.dumps({"frames": [{"file_path": "images/x.png"}]}))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        list_images(tmp_path / "ns")


def test_cli_end_to_end(default_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gsstudio_ext.cli.preprocess import main

    data = copy_scene(default_scene, tmp_path / "scene", frames=3)
    args = ["--data", str(data), "--masks", "sidecar", "--embeddings", "label", "--no-progress"]
    report = main(args)
    assert report.computed_embeddings == stems_of(data)
    assert "label-derived" in capsys.readouterr().out
    for stem in stems_of(data):
        assert read_embeddings(layout.embedding_path(data, stem))[2] == "label:minilm"
    # the installed console script: a second run finds everything cached
    exe = Path(sys.executable).with_name("gs-preprocess")
    done = subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "all cached" in done.stdout and "label:minilm" in done.stdout

    with pytest.raises(SystemExit) as exit_info:  # user error: clear message, status 2
        main(["--data", str(data), "--masks", "sam", "--sam.checkpoint", str(tmp_path / "nope.pth"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "sam_vit_h_4b8939.pth" in capsys.readouterr().out


def test_sam_masks_validate_without_scene_json(default_scene: Path, tmp_path: Path) -> None:
    # a real dataset has no scene.json: SAM mask numbers are validated without it, by the plain validator
    data = copy_scene(default_scene, tmp_path / "scene", frames=2)
    (layout.sidecar_root(data) / layout.SCENE_FILE).unlink()
    report = preprocess_dataset(data, tiny_sam(), tiny_clip(), force=True, progress=False)
    assert report.computed_masks == stems_of(data) and load_manifest(data)["instance_ids"] == "masks"
    images = list_images(data)
    index = validate_dataset(data, images, [(96, 96)] * len(images), require=("instances", "embeddings"))
    assert index.instance_ids == "masks" and index.scene == {}
    # broken output is still caught (here: embeddings no longer match the masks)
    ids, feats, provider = read_embeddings(layout.embedding_path(data, images[0].stem))
    write_embeddings(data, images[0].stem, ids[:-1], feats[:-1], provider)
    with pytest.raises(SidecarError, match="differ from instances"):
        validate_dataset(data, images, [(96, 96)] * len(images), require=("instances", "embeddings"))
    # without the manifest the ids are taken for object ids, which need scene.json
    manifest_path(data).unlink()
    with pytest.raises(SidecarError, match=r"missing file \(scene meta"):
        validate_dataset(data, images, [(96, 96)] * len(images), require=("instances", "embeddings"))
