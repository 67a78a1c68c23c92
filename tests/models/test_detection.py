"""Open-vocabulary box detectors (tiny Grounding DINO, real-weights loading) and box-prompted SAM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gsstudio_ext.models.box_masks import SamBoxConfig, TinySamBoxConfig
from gsstudio_ext.models.detection import (
    BERT_SPECIAL_IDS,
    GroundingDinoConfig,
    TinyGroundingDinoConfig,
    grounding_caption,
    tiny_bert_tokenizer,
)
from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.registry import box_segmenter_config, detector_config


def _image(h: int = 72, w: int = 96, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def _sharing(detector, **overrides):
    """A detector with other thresholds that reuses ``detector``'s loaded model (no rebuild)."""
    other = replace(detector.config, **overrides).setup()
    other.model, other.processor = detector.load().model, detector.processor
    return other


@pytest.fixture(scope="module")
def tiny_detector():
    return TinyGroundingDinoConfig().setup(device="cpu")


# ---- tiny Grounding DINO ---------------------------------------------------------------------------------------------
def test_tiny_detector_boxes_inside_image_and_sorted(tiny_detector) -> None:
    assert not isinstance(tiny_detector, torch.nn.Module)
    boxes, scores = tiny_detector.detect(_image(), "The red mug on the left")
    from transformers import GroundingDinoForObjectDetection

    assert isinstance(tiny_detector.model, GroundingDinoForObjectDetection)  # the real model class, tiny sizes
    k = len(scores)
    assert 1 <= k <= tiny_detector.config.num_queries
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and boxes.shape == (k, 4)
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= 96) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 3] <= 72)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])  # non-empty
    assert np.all(np.diff(scores) <= 0) and np.all(scores > 0.35) and np.all(scores <= 1.0)


def test_tiny_detector_thresholds_and_determinism(tiny_detector) -> None:
    img = _image(seed=3)
    boxes, scores = tiny_detector.detect(img, "a duck")
    again = TinyGroundingDinoConfig().setup().detect(img, "a duck")  # rebuilt from the same seed
    assert np.array_equal(boxes, again[0]) and np.array_equal(scores, again[1])
    assert np.array_equal(tiny_detector.detect(img, "A duck.")[0], boxes)  # same caption after normalisation
    other = TinyGroundingDinoConfig(seed=1).setup().detect(img, "a duck")
    assert not np.array_equal(other[0][:1], boxes[:1])
    few = _sharing(tiny_detector, max_detections=3).detect(img, "a duck")
    assert np.array_equal(few[0], boxes[:3])
    cut = float(np.median(scores))
    kept = _sharing(tiny_detector, box_threshold=cut).detect(img, "a duck")
    assert np.array_equal(kept[1], scores[scores > cut]) and 1 <= len(kept[1]) < len(scores)
    none = _sharing(tiny_detector, text_threshold=1.0).detect(img, "a duck")  # no phrase token can pass
    assert none[0].shape == (0, 4) and none[1].shape == (0,)


def test_detect_validates_inputs(tiny_detector) -> None:
    with pytest.raises(ValueError, match="empty detection text"):
        tiny_detector.detect(_image(), "   ")
    with pytest.raises(ValueError, match="uint8"):
        tiny_detector.detect(_image().astype(np.float32), "a mug")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        tiny_detector.detect(_image()[..., 0], "a mug")
    assert grounding_caption("  The Red Mug ") == "the red mug." and grounding_caption("a cup.") == "a cup."


def test_tiny_tokenizer_uses_bert_delimiter_ids() -> None:
    tok = tiny_bert_tokenizer()
    ids = tok("Mug. Duck?")["input_ids"]
    assert ids[0] == BERT_SPECIAL_IDS["[CLS]"] and ids[-1] == BERT_SPECIAL_IDS["[SEP]"]
    assert BERT_SPECIAL_IDS["."] in ids and BERT_SPECIAL_IDS["?"] in ids
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["m", "##u", "##g"]
    assert BERT_SPECIAL_IDS["[UNK]"] not in ids


# ---- real-weights loading --------------------------------------------------------------------------------------------
def test_grounding_dino_loads_a_local_folder(tiny_detector, tmp_path: Path) -> None:
    tiny_detector.load()
    folder = tmp_path / "gdino"
    tiny_detector.model.save_pretrained(folder)
    tiny_detector.processor.save_pretrained(folder)
    real = GroundingDinoConfig(model_name_or_path=str(folder)).setup()
    img = _image(seed=5)
    boxes, scores = real.detect(img, "the chair")
    ref_boxes, ref_scores = tiny_detector.detect(img, "the chair")
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_grounding_dino_missing_weights_are_clear(tmp_path: Path) -> None:
    det = GroundingDinoConfig().setup()
    with pytest.raises(MissingWeightsError) as err:
        det.detect(_image(), "the mug")
    msg = str(err.value)
    assert "IDEA-Research/grounding-dino-tiny" in msg and "huggingface-cli download" in msg
    assert "allow_download" in msg and det.model is None
    missing = tmp_path / "no_such_model"
    with pytest.raises(MissingWeightsError, match="no such folder"):
        GroundingDinoConfig(model_name_or_path=str(missing)).setup().detect(_image(), "the mug")


# ---- box-prompted SAM ------------------------------------------------------------------------------------------------
def test_tiny_sam_box_masks() -> None:
    seg = TinySamBoxConfig().setup()
    assert seg.model is None
    img = _image(48, 64)
    boxes = np.array([[4, 4, 30, 40], [20, 10, 64, 48]], dtype=np.float32)
    masks = seg.segment_boxes(img, boxes)
    from segment_anything.modeling import Sam

    assert isinstance(seg.model, Sam)
    assert masks.dtype == bool and masks.shape == (2, 48, 64)
    one = seg.segment_box(img, boxes[1])
    assert one.dtype == bool and one.shape == (48, 64) and np.array_equal(one, masks[1])
    assert seg.segment_boxes(img, np.zeros((0, 4))).shape == (0, 48, 64)
    again = TinySamBoxConfig().setup().segment_boxes(img, boxes)
    assert np.array_equal(again, masks)  # seeded weights
    multi = TinySamBoxConfig(multimask_output=True).setup().segment_boxes(img, boxes)
    assert multi.shape == (2, 48, 64) and multi.dtype == bool
    with pytest.raises(ValueError, match="uint8"):
        seg.segment_box(img.astype(np.float32), boxes[0])


def test_sam_box_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="SamBoxConfig.checkpoint is not set"):
        SamBoxConfig().setup().segment_box(_image(16, 16), [0, 0, 8, 8])
    path = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(MissingWeightsError) as err:
        SamBoxConfig(checkpoint=path, model_type="vit_b").setup().segment_box(_image(16, 16), [0, 0, 8, 8])
    assert str(path) in str(err.value) and "dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in str(
        err.value
    )


def test_registry_names() -> None:
    assert isinstance(detector_config("grounding-dino"), GroundingDinoConfig)
    tiny = detector_config("tiny", box_threshold=0.5)
    assert isinstance(tiny, TinyGroundingDinoConfig) and tiny.box_threshold == 0.5
    assert GroundingDinoConfig().box_threshold == 0.35 and GroundingDinoConfig().text_threshold == 0.25
    sam = box_segmenter_config("sam", checkpoint=Path("/w/sam.pth"))
    assert isinstance(sam, SamBoxConfig) and sam.model_type == "vit_h"
    assert isinstance(box_segmenter_config("tiny"), TinySamBoxConfig)
    with pytest.raises(ValueError, match="unknown detector"):
        detector_config("owl-vit")
