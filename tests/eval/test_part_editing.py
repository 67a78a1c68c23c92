"""Part-editing metrics on constructed embeddings and images, the tiny open_clip path, and the edit report files."""

from __future__ import annotations

import json
import math
from typing import Dict, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from gsstudio_ext.eval.part_editing import (
    REPORT_GRID,
    REPORT_JSON,
    REPORT_MD,
    clip_directional_similarity,
    clip_score,
    locality,
    part_ious,
    part_miou,
    write_edit_report,
)
from gsstudio_ext.models.image_text import TinyImageTextConfig


class StubEncoder:
    """Image embedding = mean RGB of the image (3-d, unnormalised); text embedding from a fixed table."""

    def __init__(self, texts: Dict[str, Sequence[float]]) -> None:
        self.texts = texts

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([list(self.texts[t]) for t in texts])


def _flat(colour: Sequence[float], n: int = 2, size: int = 8) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_clip_directional_similarity_constructed() -> None:
    # unit-norm image features (0.6, 0.8, 0) -> (0.8, 0.6, 0): direction (0.2, -0.2, 0) ~ (1, -1, 0)
    src, edit = _flat([0.6, 0.8, 0.0]), _flat([0.8, 0.6, 0.0])
    aligned = StubEncoder({"a": [0.0, 1.0, 0.0], "b": [1.0, 0.0, 0.0]})
    assert clip_directional_similarity(aligned, src, edit, "a", "b") == pytest.approx(1.0, abs=1e-6)
    assert clip_directional_similarity(aligned, src, edit, "b", "a") == pytest.approx(-1.0, abs=1e-6)
    # text direction (1, 0, -1)/.. against image direction (1, -1, 0)/..: cos = 1/2
    half = StubEncoder({"a": [0.0, 0.0, 1.0], "b": [1.0, 0.0, 0.0]})
    assert clip_directional_similarity(half, src, edit, "a", "b") == pytest.approx(0.5, abs=1e-6)
    # features are L2-normalised before differencing: scaling the edited image's brightness changes nothing
    assert clip_directional_similarity(aligned, src, edit * 0.5, "a", "b") == pytest.approx(1.0, abs=1e-6)
    # an unchanged image has no direction: 0
    assert clip_directional_similarity(aligned, src, src.clone(), "a", "b") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="pair up"):
        clip_directional_similarity(aligned, src, edit[:1], "a", "b")


def test_clip_score_constructed() -> None:
    enc = StubEncoder({"red": [1.0, 0.0, 0.0]})
    images = torch.cat([_flat([1.0, 0.0, 0.0], 1), _flat([0.0, 1.0, 0.0], 1)])
    assert clip_score(enc, images, "red") == pytest.approx(0.5, abs=1e-6)  # mean of cos 1 and cos 0
    assert clip_score(enc, _flat([0.3, 0.0, 0.4], 1), "red") == pytest.approx(0.6, abs=1e-6)


def test_tiny_open_clip_runs_through_the_metrics() -> None:
    torch.manual_seed(0)
    enc = TinyImageTextConfig().setup()
    images = torch.rand(3, 3, 40, 48)
    score = clip_score(enc, images, "a red mug")
    img = enc.encode_images(images)
    txt = enc.encode_text(["a red mug"])[0]
    assert score == pytest.approx(float((img @ txt).mean()), abs=1e-6) and -1.0 <= score <= 1.0
    edited = images.clone()
    edited[:, 0] = 1.0
    cd = clip_directional_similarity(enc, images, edited, "a mug", "a red mug")
    assert -1.0 <= cd <= 1.0 and math.isfinite(cd)
    assert clip_directional_similarity(enc, images, images, "a mug", "a red mug") == pytest.approx(0.0, abs=1e-6)


def test_locality_values() -> None:
    torch.manual_seed(0)
    before = torch.rand(2, 3, 10, 10)
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[:, 4:6, 4:6] = True
    assert locality(before, before.clone(), masks, dilate_px=1) == 0.0
    after = before.clone()
    after[:, :, 4:6, 4:6] = 1 - after[:, :, 4:6, 4:6]  # a change inside the part only
    assert locality(before, after, masks, dilate_px=0) == 0.0
    after[0, 0, 0, :] += 0.3  # red +0.3 along row 0 of view 0: 10 of the 2 x (100 - 16) outside pixels
    expected = 10 * 0.3 / 3 / (2 * (100 - 16))  # dilated by 1: 4x4 block per view
    assert locality(before, after, masks, dilate_px=1) == pytest.approx(expected, rel=1e-5)
    after[0, :, 3, 3] += 0.5  # in the 1-px dilation ring: ignored with dilate_px=1, counted with 0
    assert locality(before, after, masks, dilate_px=1) == pytest.approx(expected, rel=1e-5)
    assert locality(before, after, masks, dilate_px=0) > expected
    with pytest.raises(ValueError, match="every pixel"):
        locality(before, after, torch.ones(2, 10, 10, dtype=torch.bool), dilate_px=0)


def test_part_miou_constructed() -> None:
    gt = torch.tensor([[0, 1, 1, 2], [0, 1, 1, 2], [-1, 3, 3, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 2], [2, 3, 3, 0]])
    # part 1: inter 3, union 5; part 2: inter 1, union 2; part 3: inter 2, union 2; the -1 GT pixel is ignored
    ious = part_ious(pred, gt, num_parts=3)
    assert ious == pytest.approx({1: 0.6, 2: 0.5, 3: 1.0})
    assert part_miou(pred, gt, num_parts=3) == pytest.approx(0.7)
    # with background: label 0 inter 3 (of gt {0,0,0}, pred {0,0,0,0}) union 4
    assert part_miou(pred, gt, 3, ignore_background=False) == pytest.approx((0.75 + 0.6 + 0.5 + 1.0) / 4)
    assert part_miou(gt.clamp_min(0), gt.clamp_min(0), 3) == 1.0
    assert part_ious(pred, gt, num_parts=5) == ious  # parts 4, 5 in neither map: skipped
    assert math.isnan(part_miou(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 2))


def test_write_edit_report(tmp_path) -> None:
    torch.manual_seed(0)
    before = torch.rand(3, 3, 16, 20)
    after = before.clone()
    masks = torch.zeros(3, 16, 20, dtype=torch.bool)
    masks[:, 4:10, 5:12] = True
    after[:, 0][masks] = 1.0
    metrics = {"clip": 0.25, "clip_dir": 0.2, "locality": locality(before, after, masks), "part_miou": math.nan}
    path = write_edit_report(tmp_path / "out", metrics, before, after, masks, "procedural", "a red nose")
    assert path == tmp_path / "out" / REPORT_JSON
    report = json.loads(path.read_text())
    assert set(report) == {"prompt", "provider", "metrics", "num_views", "grid", "grid_columns"}
    assert report["provider"] == "procedural" and report["prompt"] == "a red nose" and report["num_views"] == 3
    assert report["metrics"] == {"clip": 0.25, "clip_dir": 0.2, "locality": 0.0, "part_miou": None}
    md = (tmp_path / "out" / REPORT_MD).read_text()
    assert "procedural" in md and "a red nose" in md and "| clip_dir | 0.2000 |" in md and REPORT_GRID in md
    grid = np.asarray(Image.open(tmp_path / "out" / REPORT_GRID))
    assert grid.shape == (3 * 16, 4 * 20, 3)
    assert np.array_equal(grid[:16, :20], (before[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp files left
