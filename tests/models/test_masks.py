"""Mask generators (tiny SAM through the real automatic generator, SAM errors) and AG2aussian mask NMS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gsstudio_ext.core.masks import drop_small_masks, mask_nms, pairwise_mask_iou
from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.masks import MaskProposals, SamAutomaticConfig, TinySamConfig
from gsstudio_ext.models.registry import mask_generator_config


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


# ---- mask NMS -------------------------------------------------------------------------------------------------------
def test_nms_removes_duplicates_keeps_distinct() -> None:
    a = _box(32, 32, 0, 16, 0, 16)
    a_dup = a.copy()
    a_dup[15, :16] = False  # IoU 0.94 with a
    b = _box(32, 32, 16, 32, 16, 32)
    masks = np.stack([a_dup, b, a])
    keep = mask_nms(masks, [0.90, 0.85, 0.95])
    assert keep.tolist() == [2, 1]  # the better-scored copy of a, then b; sorted by score


def test_nms_score_floor_and_threshold() -> None:
    a, b = _box(16, 16, 0, 8, 0, 8), _box(16, 16, 8, 16, 8, 16)
    assert mask_nms(np.stack([a, b]), [0.9, 0.7]).tolist() == [0]  # score <= 0.7 dropped
    assert mask_nms(np.stack([a, b]), [0.9, 0.7], score_thresh=0.5).tolist() == [0, 1]


def test_nms_drops_contained_masks() -> None:
    big = _box(32, 32, 0, 32, 0, 32)  # 1024 px
    part = _box(32, 32, 0, 8, 0, 8)  # 64 px, fully inside, covers 6 % of big
    half = _box(32, 32, 0, 32, 0, 20)  # covers 62 % of big: not "inner"
    keep = mask_nms(np.stack([part, big, half]), [0.95, 0.9, 0.8])
    assert keep.tolist() == [1, 2]  # the contained part goes, whatever its score
    keep_all = mask_nms(np.stack([part, big, half]), [0.95, 0.9, 0.8], inner_thresh=None)
    assert keep_all.tolist() == [0, 1, 2]


def test_nms_edge_cases() -> None:
    assert mask_nms(np.zeros((0, 4, 4), bool), []).numel() == 0
    with pytest.raises(ValueError, match="scores"):
        mask_nms(np.zeros((2, 4, 4), bool), [0.9])
    with pytest.raises(ValueError, match=r"\[M, H, W\]"):
        mask_nms(np.zeros((4, 4), bool), [0.9])
    t = torch.zeros(1, 4, 4, dtype=torch.bool)
    t[0, :2] = True
    assert mask_nms(t, torch.tensor([0.9])).tolist() == [0]


def test_pairwise_iou_chunked_matches_direct() -> None:
    rng = np.random.RandomState(0)
    masks = rng.rand(5, 17, 23) > 0.5
    iou = pairwise_mask_iou(masks).numpy()
    for i in range(5):
        for j in range(5):
            inter = (masks[i] & masks[j]).sum()
            union = (masks[i] | masks[j]).sum()
            assert iou[i, j] == pytest.approx(inter / union, abs=1e-6)


def test_drop_small_masks_with_alpha() -> None:
    masks = np.stack([_box(16, 16, 0, 8, 0, 8), _box(16, 16, 0, 5, 0, 5), _box(16, 16, 8, 16, 0, 16)])
    alpha = np.ones((16, 16), dtype=np.float32)
    alpha[8:, 4:] = 0.0  # leaves 8x4 = 32 px of the third mask
    kept, idx = drop_small_masks(masks, min_area=25, alpha=alpha)
    assert idx.tolist() == [0, 2]
    assert int(kept[1].sum()) == 32


# ---- tiny SAM through segment_anything's automatic generator -------------------------------------------------------
def test_tiny_sam_generates_boolean_masks() -> None:
    gen = TinySamConfig(box_nms_thresh=1.0).setup(device="cpu")
    assert gen.model is None and gen.generator is None
    props = gen.generate(_image(48, 64))
    from segment_anything.modeling import Sam

    assert isinstance(gen.model, Sam)  # the real model class, tiny dims
    assert isinstance(props, MaskProposals) and len(props) >= 2
    assert props.masks.dtype == bool and props.masks.shape[1:] == (48, 64)
    assert props.scores.shape == (len(props),)
    assert np.all(np.diff(props.scores) <= 1e-7)  # sorted by descending score
    assert np.allclose(props.scores, props.predicted_iou * props.stability_score)
    assert props.masks.reshape(len(props), -1).any(1).all()  # empty masks dropped
    sub = props.select(mask_nms(props.masks, props.scores, score_thresh=-1.0, iou_thresh=0.999, inner_thresh=None))
    assert 1 <= len(sub) <= len(props)


def test_tiny_sam_deterministic_and_not_module() -> None:
    img = _image(40, 40)
    a = TinySamConfig(seed=5).setup().generate(img)
    gen = TinySamConfig(seed=5).setup()
    b = gen.generate(img)
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.scores, b.scores)
    assert not isinstance(gen, torch.nn.Module)
    holder = torch.nn.Module()
    holder.masks = gen
    assert holder.state_dict() == {}


def test_generate_validates_image() -> None:
    gen = TinySamConfig().setup()
    with pytest.raises(ValueError, match="uint8"):
        gen.generate(np.random.rand(16, 16, 3).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        gen.generate(np.zeros((16, 16), dtype=np.uint8))


# ---- SAM with released checkpoints ----------------------------------------------------------------------------------
def test_sam_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_h_4b8939.pth"
    gen = SamAutomaticConfig(checkpoint=path).setup()
    assert gen.model is None
    with pytest.raises(MissingWeightsError, match="sam_vit_h_4b8939.pth") as err:
        gen.generate(_image(16, 16))
    msg = str(err.value)
    assert str(path) in msg and "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg


def test_sam_checkpoint_not_set() -> None:
    with pytest.raises(MissingWeightsError, match="sam_vit_b_01ec64.pth"):
        SamAutomaticConfig(model_type="vit_b").setup().generate(_image(16, 16))
    with pytest.raises(ValueError, match="model_type"):
        SamAutomaticConfig(model_type="vit_x", checkpoint=Path("x.pth")).setup().generate(_image(16, 16))


def test_registry() -> None:
    coarse = mask_generator_config("sam-coarse", checkpoint=Path("/w/sam_vit_h_4b8939.pth"))
    assert isinstance(coarse, SamAutomaticConfig) and coarse.min_mask_region_area == 100
    assert isinstance(mask_generator_config("tiny"), TinySamConfig)
