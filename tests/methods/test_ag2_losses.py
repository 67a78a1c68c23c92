"""AG2aussian's losses on hand-made inputs."""

import itertools
import math

import pytest
import torch

from gsstudio_ext.methods.ag2aussian import losses


def _masks():
    masks = torch.zeros(3, 4, 6, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, :, 2:4] = True
    masks[2, :, 4:] = True
    return masks


def test_constant_features_per_mask_have_zero_smoothness_and_known_contrast():
    masks = _masks()
    means = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0]])
    features = torch.einsum("khw,kd->hwd", masks.float(), means)
    smooth, contrast = losses.mask_losses(features, masks, eps=1.0)
    assert smooth.item() == pytest.approx(0.0, abs=1e-7)
    d = torch.cdist(means, means)
    expected = []
    for i in range(3):
        others = [j for j in range(3) if j != i]
        inv = torch.tensor([1.0 / (d[i, j] + 1.0) for j in others])
        ranks = inv.argsort().argsort().float()
        expected += list((0.1 + 0.9 * ranks / 2) * inv)
    assert contrast.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)


def test_smoothness_is_mean_distance_to_the_mask_mean_over_all_entries():
    masks = torch.zeros(1, 1, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    features = torch.tensor([[[0.0], [2.0], [5.0], [5.0]]])
    smooth, contrast = losses.mask_losses(features, masks)
    assert smooth.item() == pytest.approx((1.0 + 1.0) / 4)
    assert contrast.item() == 0.0  # one mask: no pair, no NaN


def test_contrast_pushes_confusable_masks_apart():
    masks = _masks()
    means = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0]], requires_grad=True)
    features = torch.einsum("khw,kd->hwd", masks.float(), means)
    losses.mask_losses(features, masks)[1].backward()
    step = -means.grad
    # following the gradient moves masks 0 and 1 (the confusable pair) apart
    assert torch.dot(step[0] - step[1], means[0].detach() - means[1].detach()) > 0


def test_no_masks_give_zero():
    smooth, contrast = losses.mask_losses(torch.rand(4, 4, 3), torch.zeros(0, 4, 4, dtype=torch.bool))
    assert smooth.item() == 0.0 and contrast.item() == 0.0


def test_distortion_identity_matches_the_pairwise_sum():
    torch.manual_seed(0)
    w = torch.rand(6) * 0.2
    m = torch.rand(6)
    pairwise = sum(w[i] * w[j] * (m[i] - m[j]) ** 2 for i, j in itertools.product(range(6), range(6)) if j < i)
    moments = torch.stack([(w * m).sum(), (w * m * m).sum()]).view(1, 1, 2)
    alpha = w.sum().view(1, 1, 1)
    assert losses.distortion_from_moments(moments, alpha).item() == pytest.approx(pairwise.item(), rel=1e-5)


def test_ndc_depth_maps_near_to_zero_and_far_to_one():
    z = torch.tensor([0.2, 100.0])
    assert torch.allclose(losses.ndc_depth(z, 0.2, 100.0), torch.tensor([0.0, 1.0]), atol=1e-6)


def test_child_regulariser_is_zero_inside_and_positive_outside():
    radius, both = torch.ones(2), torch.ones(2, dtype=torch.bool)
    inside = torch.tensor([[0.5, 0, 0], [0, 0.2, 0]])
    outside = torch.tensor([[2.0, 0, 0], [0, 0.2, 0]])
    assert losses.child_in_anchor_loss(inside, torch.full((2, 3), 0.5), radius, both).item() == 0.0
    big = losses.child_in_anchor_loss(outside, torch.full((2, 3), 1.5), radius, both)
    # exp(relu(2 - 1)) - 1 for the far child, relu(1.5 - 1) for both, averaged over the 2 visible children
    assert big.item() == pytest.approx((math.e - 1 + 0.5 + 0.5) / 2)
    # Invisible children do not count (the far one is hidden here).
    only_near = losses.child_in_anchor_loss(outside, torch.full((2, 3), 0.5), radius, torch.tensor([False, True]))
    assert only_near.item() == 0.0


def test_feature_map_is_divided_by_alpha_and_zeroed_where_transparent():
    features = torch.tensor([[[0.5, 0.5]], [[0.05, 0.05]]])
    alpha = torch.tensor([[[0.5]], [[0.05]]])
    out = losses.normalized_feature_map(features, alpha, alpha_min=0.1)
    assert torch.equal(out, torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]))


def test_model_adds_every_scheduled_loss_once_its_stage_starts(default_scene):
    """Past every start step, one training step yields finite mask, distortion, alpha, child and graph losses."""
    from gsstudio_ext.methods.ag2aussian.config import SHORT_SCHEDULE, ag2_trainer_config
    from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig

    config = ag2_trainer_config(AG2ModelConfig(**{**SHORT_SCHEDULE, "graph_from": 0}), max_steps=10)
    config.pipeline.datamanager.data = default_scene
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    model = pipeline.model
    model.step = 1000
    model.optimizers = {}
    camera, batch = pipeline.datamanager.next_train(0)
    outputs = model.get_outputs(camera)
    loss_dict = model.get_loss_dict(outputs, batch)
    assert {"main_loss", "mask", "distortion", "alpha", "child_reg", "graph"} <= set(loss_dict)
    assert all(torch.isfinite(v) for v in loss_dict.values())
    sum(loss_dict.values()).backward()
    assert model.gauss_params["anchor_feat"].grad.abs().sum() > 0
