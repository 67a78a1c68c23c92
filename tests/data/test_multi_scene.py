"""Multi-scene datasets: scene lists, fused Gaussian scenes, cameras in a run's frame, semantic maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from PIL import Image

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.ply import read_ply
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.data.multi_scene import load_scene_views, read_scene_list, to_run_frame
from gsstudio_ext.data.synthetic import class_list


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(((a - b) ** 2).mean()))


def test_scene_list_splits_and_classes(rtgs2_scenes: Path) -> None:
    entries, classes = read_scene_list(rtgs2_scenes)
    assert [e.split for e in entries] == ["train"] * 24 + ["unseen"] * 2
    assert classes == class_list()
    assert all(e.gaussians == e.root / "gaussians.ply" and e.gaussians.is_file() for e in entries)
    single, single_classes = read_scene_list(entries[0].root)
    assert [e.name for e in single] == [entries[0].root.name] and single_classes == classes


def test_missing_gaussians_is_a_clear_error(rtgs2_scenes: Path, tmp_path: Path) -> None:
    copy = tmp_path / "scene"
    shutil.copytree(rtgs2_scenes / "scene_000", copy)
    (copy / "gaussians.ply").unlink()
    with pytest.raises(FileNotFoundError, match="no trained Gaussians"):
        read_scene_list(copy)


def test_fused_gaussians_reproduce_the_views(rtgs2_scenes: Path) -> None:
    entry = read_scene_list(rtgs2_scenes)[0][0]
    scene = read_ply(entry.gaussians)
    assert 5_000 < scene.num_gaussians < 60_000
    white = torch.ones(3)  # gs-synth's sky
    for split in ("train", "test"):
        views = load_scene_views(entry, split)
        psnrs = []
        for i in range(0, len(views.stems), 3):
            cam = views.cameras[i : i + 1]
            out = render_scene(
                scene, viewmat_from_c2w(cam.camera_to_worlds), cam.get_intrinsics_matrices(), 64, 64, background=white
            )
            gt = np.asarray(Image.open(entry.root / "images" / f"{views.stems[i]}.png").convert("RGB")) / 255.0
            psnrs.append(_psnr(out.rgb[0].numpy(), gt))
        assert np.mean(psnrs) > 18.0, (split, psnrs)


def test_semantics_follow_the_cameras(rtgs2_scenes: Path) -> None:
    entry = read_scene_list(rtgs2_scenes)[0][0]
    views = load_scene_views(entry, "test")
    assert views.semantics is not None and views.semantics.shape == (len(views.stems), 64, 64)
    assert int(views.semantics.max()) < len(class_list()) and len(views.stems) == 6
    half = load_scene_views(entry, "test", downscale=2)
    assert half.semantics.shape[1:] == (32, 32) and int(half.cameras.width[0]) == 32


def test_run_frame_matches_nerfstudio_parser(rtgs2_scenes: Path, tmp_path: Path) -> None:
    """World-frame cameras moved by a run's dataparser_transforms.json equal what nerfstudio's default parser gives."""
    entry = read_scene_list(rtgs2_scenes)[0][0]
    outputs = NerfstudioDataParserConfig(data=entry.root).setup().get_dataparser_outputs("train")
    run = tmp_path / "run"
    run.mkdir()
    transform = {"transform": outputs.dataparser_transform.tolist(), "scale": float(outputs.dataparser_scale)}
    (run / "dataparser_transforms.json").write_text(json.dumps(transform))
    world = load_scene_views(entry, "train").cameras
    moved = to_run_frame(world, (outputs.dataparser_transform.float(), float(outputs.dataparser_scale)))
    assert torch.allclose(moved.camera_to_worlds, outputs.cameras.camera_to_worlds, atol=1e-5)
