"""ag2aussian-ext trained by nerfstudio's Trainer on the default synthetic scene (CPU, compressed schedule)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gsstudio_ext.methods.ag2aussian.config import SHORT_SCHEDULE, ag2_trainer_config
from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig
from gsstudio_ext.methods.base.training import load_run, prepare_config, train

STEPS = 200


@pytest.fixture(scope="module")
def trained(default_scene: Path, tmp_path_factory: pytest.TempPathFactory):
    """The default scene with label embeddings (GT masks + object names through MiniLM), trained 200 steps."""
    from gsstudio_ext.data.embedding_sources import LabelEmbeddingConfig
    from gsstudio_ext.data.mask_sources import SidecarMaskSourceConfig
    from gsstudio_ext.data.preprocess import preprocess_dataset

    scene = tmp_path_factory.mktemp("ag2_scene") / "scene"
    shutil.copytree(default_scene, scene)
    preprocess_dataset(scene, SidecarMaskSourceConfig(), LabelEmbeddingConfig(), progress=False)
    model = AG2ModelConfig(**SHORT_SCHEDULE, densify_until=STEPS - 50)
    config = ag2_trainer_config(model, max_steps=STEPS)
    config.pipeline.datamanager.sidecars = ("instances", "embeddings")
    config = prepare_config(config, scene, tmp_path_factory.mktemp("ag2"), max_steps=STEPS, device="cpu")
    return train(config)


@pytest.mark.slow
def test_reconstructs_held_out_views(trained):
    trainer, _ = trained
    metrics = trainer.pipeline.get_average_eval_image_metrics()
    assert metrics["psnr"] >= 24.0, metrics


@pytest.mark.slow
def test_instance_features_separate_the_objects(trained):
    """On held-out views each object's pixels are closest to their own object's mean feature (>= 90%), and object
    means lie far apart on the unit sphere."""
    trainer, _ = trained
    pipeline = trainer.pipeline
    pipeline.eval()
    correct = total = 0
    for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
        features = pipeline.model.get_outputs_for_camera(camera)["instance"]
        masks = [m for m in batch["instance_masks"] if m.sum() >= 20]
        means = torch.stack([features[m].mean(dim=0) for m in masks])
        for index, mask in enumerate(masks):
            correct += int((torch.cdist(features[mask], means).argmin(dim=1) == index).sum())
            total += int(mask.sum())
        apart = torch.cdist(means, means) + torch.eye(len(masks)) * 10
        assert apart.min() > 0.5, apart.min()
    assert correct / total >= 0.9, correct / total


@pytest.mark.slow
def test_anchor_layout_reloads_from_the_checkpoint(trained):
    trainer, config_path = trained
    model = trainer.pipeline.model
    _, reloaded = load_run(config_path)
    assert reloaded.model.num_anchors == model.num_anchors and reloaded.model.num_points == model.num_points
    camera, _ = trainer.pipeline.datamanager.fixed_indices_eval_dataloader[0]
    trainer.pipeline.eval()
    before = model.get_outputs_for_camera(camera)
    after = reloaded.model.get_outputs_for_camera(camera)
    for key in ("rgb", "instance", "accumulation"):
        assert torch.equal(before[key], after[key]), key


def _object_centre_pixel(mask: torch.Tensor) -> tuple:
    """A pixel deep inside the mask: the one farthest from the mask border (chessboard distance by erosion)."""
    import torch.nn.functional as F

    depth = torch.zeros(mask.shape)
    current = mask.float()[None, None]
    while current.sum() > 0:
        depth += current[0, 0]
        current = -F.max_pool2d(-current, 3, stride=1, padding=1)
    flat = int(depth.flatten().argmax())
    return flat % mask.shape[1], flat // mask.shape[1]


@pytest.mark.slow
def test_click_on_each_object_selects_it(trained):
    """Clicking the centre of each object in a held-out view selects Gaussians that render to its GT mask."""
    from gsstudio_ext.core.metrics import mask_iou
    from gsstudio_ext.methods.ag2aussian.queries import select_by_click

    trainer, _ = trained
    pipeline = trainer.pipeline
    model = pipeline.model
    camera, batch = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    ious = {}
    for object_id, mask in zip(batch["instance_ids"].tolist(), batch["instance_masks"]):
        if mask.sum() < 20:
            continue
        x, y = _object_centre_pixel(mask)
        model.selection = select_by_click(model, camera, x, y)
        model.eval()
        rendered = model.get_outputs_for_camera(camera)["selection"][..., 0] > 0.5
        ious[object_id] = mask_iou(rendered.cpu().numpy(), mask.cpu().numpy())
    model.selection = None
    assert len(ious) >= 5 and min(ious.values()) >= 0.8, ious


@pytest.mark.slow
def test_text_query_by_object_name_selects_that_object(trained):
    """Label embeddings are attached to super-anchors in one render per view; each object's name selects it."""
    from gsstudio_ext.core.metrics import mask_iou
    from gsstudio_ext.data.embedding_sources import text_query_encoder
    from gsstudio_ext.methods.ag2aussian.language import associate_language, select_by_text

    trainer, _ = trained
    pipeline = trainer.pipeline
    model = pipeline.model
    language = associate_language(model, pipeline.datamanager)
    assert language.provider == "label:minilm"
    encode = text_query_encoder(language.provider)
    names = {obj["id"]: obj["name"] for obj in pipeline.datamanager.train_dataset.metadata["scene"]["objects"]}
    camera, batch = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    ious = {}
    for object_id, mask in zip(batch["instance_ids"].tolist(), batch["instance_masks"]):
        if mask.sum() < 20:
            continue
        model.selection = select_by_text(model, language, encode, names[object_id])
        model.eval()
        rendered = model.get_outputs_for_camera(camera)["selection"][..., 0] > 0.5
        ious[names[object_id]] = mask_iou(rendered.cpu().numpy(), mask.cpu().numpy())
    good = sum(iou >= 0.7 for iou in ious.values())
    assert len(ious) >= 5 and good >= 0.9 * len(ious), ious
    unrelated = select_by_text(model, language, encode, "a violin concerto in a snowy forest")
    assert not unrelated.any()
    with pytest.raises(ValueError, match="empty text query"):
        select_by_text(model, language, encode, "  ")
    model.selection = None
