"""RL3DEdit geometry, Ph-Loss and rewards on a small rendered scene (9 ring cameras, 64 x 64, exact depth).

The scene: ~4.8k Gaussians (a textured ground disc and three blobs) with view-independent colours, rendered with the
project's CPU rasterizer, so every view is consistent with every other one through the rendered expected depth.
"""

from __future__ import annotations

import math
import sys
import types
from typing import List, Optional

import pytest
import torch
from rl3dedit_scene import ring_views  # tests/ is on sys.path (conftest's folder)

from gsstudio_ext.methods.rl3dedit.geometry import (
    ViewSet,
    depth_scale_to_cameras,
    invert_rigid,
    photometric_consistency,
    relative_pose_errors,
    relative_poses,
    ssim,
    umeyama,
    warp_views,
)
from gsstudio_ext.methods.rl3dedit.rewards import (
    GeometryVerifier,
    GeometryVerifierConfig,
    ReprojectionVerifierConfig,
    RewardConfig,
    RewardModel,
    normalize_confidence,
    pose_reward,
)
from gsstudio_ext.models.perceptual import TinyPerceptualConfig
from gsstudio_ext.models.vggt import (
    VGGT_INSTALL,
    GeometryPrediction,
    VGGTConfig,
    resize_for_vggt,
    vggt_input_size,
)

M, SIZE = 9, 64


@pytest.fixture(scope="module")
def views() -> ViewSet:
    return ring_views(M, SIZE)


def _shifted(images: torch.Tensor, view: int, pixels: int = 3) -> torch.Tensor:
    out = images.clone()
    out[view] = torch.roll(images[view], pixels, dims=-1)
    return out


def _rotation(axis: List[float], degrees: float) -> torch.Tensor:
    """4x4 rotation (Rodrigues)."""
    k = torch.tensor(axis) / torch.tensor(axis).norm()
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = math.radians(degrees)
    out = torch.eye(4)
    out[:3, :3] = torch.eye(3) + math.sin(t) * cross + (1 - math.cos(t)) * cross @ cross
    return out


class FixedVerifier(GeometryVerifier):
    """Returns a prescribed prediction and records what it was shown."""

    def __init__(self, prediction: GeometryPrediction, poses: bool = True) -> None:
        super().__init__(GeometryVerifierConfig())
        self.prediction, self.provides_poses, self.seen = prediction, poses, []

    def predict(self, images: torch.Tensor, views: ViewSet) -> GeometryPrediction:
        self.seen.append(images.clone())
        return self.prediction


def _model(verifier: Optional[GeometryVerifier] = None, **overrides) -> RewardModel:
    config = RewardConfig(verifier=ReprojectionVerifierConfig(), perceptual=TinyPerceptualConfig(), **overrides)
    return RewardModel(config, verifier=verifier)


# ======================================================================================================================
# geometry
# ======================================================================================================================
def test_relative_poses_ignore_world_frame_and_scale(views: ViewSet):
    rel = relative_poses(views.viewmats)
    assert rel.shape == (M - 1, 4, 4)
    assert torch.allclose(rel[0] @ views.viewmats[0], views.viewmats[1], atol=1e-5)
    assert torch.allclose(invert_rigid(views.viewmats) @ views.viewmats, torch.eye(4).expand(M, 4, 4), atol=1e-5)
    # VGGT-like cameras: the first frame is the world and the scale is unknown
    vggt_like = views.viewmats @ invert_rigid(views.viewmats[:1])
    vggt_like[:, :3, 3] *= 0.37
    assert relative_pose_errors(vggt_like, views.viewmats).abs().max() < 1e-8
    assert pose_reward(vggt_like, views.viewmats) == pytest.approx(1.0, abs=1e-6)


def test_warping_a_view_into_itself_is_the_identity(views: ViewSet):
    warp = warp_views(views.images, views.depths, views.Ks, views.Ks, torch.eye(4).expand(M, 4, 4), views.depths)
    assert warp.valid.all()
    assert (warp.image - views.images).abs().max() < 1e-5
    assert torch.allclose(ssim(views.images, views.images), torch.ones(1))


def test_ph_loss_is_low_for_consistent_renders_and_grows_with_a_shifted_view(views: ViewSet):
    images = views.images.clone().requires_grad_(True)
    consistent = photometric_consistency(images, views.depths, views.viewmats, views.Ks)
    consistent.backward()
    consistent = consistent.detach()
    assert images.grad.abs().sum() > 0  # differentiable (bilinear sampling and SSIM)
    losses = [
        float(photometric_consistency(_shifted(views.images, 4, s), views.depths, views.viewmats, views.Ks))
        for s in (1, 3, 5)
    ]
    # measured: 0.0195 consistent; 0.024 / 0.039 / 0.054 with view 4 shifted by 1 / 3 / 5 px
    assert float(consistent) < 0.025
    assert float(consistent) < losses[0] < losses[1] < losses[2]
    assert losses[1] > 1.8 * float(consistent)
    # without the occlusion test more (mismatched) pixels count and the loss is higher
    no_tau = photometric_consistency(views.images, views.depths, views.viewmats, views.Ks, tau=None)
    assert float(no_tau) > float(consistent)


def test_umeyama_recovers_a_similarity_and_the_depth_scale(views: ViewSet):
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(20, 3, generator=gen)
    rot = _rotation([0.3, -1.0, 0.5], 40.0)[:3, :3]
    scale, rot_fit, t_fit = umeyama(src, 2.5 * src @ rot.T + torch.tensor([1.0, -2.0, 0.5]))
    assert float(scale) == pytest.approx(2.5, rel=1e-5)
    assert torch.allclose(rot_fit, rot, atol=1e-5) and torch.allclose(t_fit, torch.tensor([1.0, -2.0, 0.5]), atol=1e-5)
    # up-to-scale cameras (first frame as world, translations x 0.2) need depth x 5 to match the scene
    pred = views.viewmats @ invert_rigid(views.viewmats[:1])
    pred[:, :3, 3] *= 0.2
    assert float(depth_scale_to_cameras(pred, views.viewmats)) == pytest.approx(5.0, rel=1e-4)


# ======================================================================================================================
# verifier and rewards
# ======================================================================================================================
def test_reprojection_verifier_confidence_drops_around_a_shifted_view(views: ViewSet):
    verifier = ReprojectionVerifierConfig().setup()
    good = verifier.predict(views.images, views)
    bad = verifier.predict(_shifted(views.images, 4), views)
    assert good.extrinsics is None and good.depth is views.depths
    assert good.depth_conf.min() >= 1.0 and good.depth_conf.max() <= 5.0
    per_view_drop = good.depth_conf.mean((1, 2)) - bad.depth_conf.mean((1, 2))
    assert per_view_drop.argmax() == 4
    assert per_view_drop[[3, 4, 5]].min() > 0.2 and per_view_drop[[0, 1, 7, 8]].abs().max() < 1e-6


def test_consistent_views_score_higher_than_a_shifted_view(views: ViewSet):
    model = _model()
    reference = model.reference(views)
    group = torch.stack([views.images, _shifted(views.images, 2), _shifted(views.images, 4)])
    r = model(group, 4, views.images[4], views, reference)
    # rollout 0: the source renders (the ratio normalisation gives exactly 1), anchor identical -> R = 1
    assert r["depth"][0] == pytest.approx(1.0, abs=1e-6) and r["point"][0] == pytest.approx(1.0, abs=1e-6)
    assert r["anchor"][0] == pytest.approx(1.0, abs=1e-6) and r["reward"][0] == pytest.approx(1.0, abs=1e-6)
    assert r["pose"].isnan().all()  # no pose estimate: r_T skipped, the weights renormalised over D, P, a
    assert torch.allclose(r["reward"], (r["depth"] + r["point"] + r["anchor"]) / 3)
    # rollout 1: view 2 shifted by 3 px -> lower confidence, anchor untouched
    assert r["depth"][1] < 0.95 and r["anchor"][1] == pytest.approx(1.0, abs=1e-6) and r["reward"][1] < r["reward"][0]
    # rollout 2: the anchor view is shifted, but the verifier sees the reference in its place -> only r_a drops
    assert r["depth"][2] == pytest.approx(1.0, abs=1e-6) and r["anchor"][2] < 0.9
    single = model(views.images, 4, views.images[4], views, reference)
    assert single["reward"].shape == () and float(single["reward"]) == pytest.approx(1.0, abs=1e-6)


def test_pose_reward_is_one_for_exact_cameras_and_falls_with_rotation_error(views: ViewSet):
    gt = views.viewmats
    t3 = relative_poses(gt)[3, :3, 3]
    t3 = t3 / t3.norm()
    rewards = []
    for degrees in (0.0, 2.0, 5.0, 10.0):
        pred = gt.clone()
        delta = _rotation([1.0, 0.2, 0.0], degrees)  # about camera 4's own centre (applied in its frame)
        pred[4] = delta @ gt[4]
        r_t = float(pose_reward(pred @ invert_rigid(pred[:1]), gt))  # VGGT frame: first camera is the world
        # pairs (3, 4) and (4, 5) change: 4 (1 - cos) each for R, and pair (3, 4)'s unit translation turns with delta
        theta = math.radians(degrees)
        expected = 8 * (1 - math.cos(theta)) + float((delta[:3, :3] @ t3 - t3).square().sum())
        assert r_t == pytest.approx(math.exp(-expected / (M - 1)), rel=1e-4)
        rewards.append(r_t)
    assert rewards[0] == pytest.approx(1.0, abs=1e-6)
    assert rewards[0] > rewards[1] > rewards[2] > rewards[3]  # measured: 1, 0.99939, 0.99617, 0.98479


def test_composite_uses_the_paper_weights_and_the_anchor_replacement(views: ViewSet):
    conf = torch.full((M, SIZE, SIZE), 3.0)
    pred = GeometryPrediction(views.depths, conf, 2 * conf, views.viewmats.clone(), views.Ks)
    verifier = FixedVerifier(pred)
    model = _model(verifier, normalization="clip", conf_max=10.0)
    edited = views.images.clone()
    edited[6] = 0.5
    r = model(edited, 6, views.images[6], views)
    assert len(verifier.seen) == 1 and torch.equal(verifier.seen[0][6], views.images[6])  # anchor replaced
    assert torch.equal(verifier.seen[-1][5], edited[5])
    assert float(r["depth"]) == pytest.approx(0.3) and float(r["point"]) == pytest.approx(0.6)
    assert float(r["pose"]) == pytest.approx(1.0, abs=1e-6)
    r_a = math.exp(-5.0 * float(r["lpips"]))
    assert float(r["anchor"]) == pytest.approx(r_a, rel=1e-5) and r_a < 1.0
    assert float(r["reward"]) == pytest.approx(0.25 * (0.3 + 0.6 + 1.0 + r_a), rel=1e-5)
    # a verifier without poses: r_T is dropped and the remaining weights renormalised
    verifier.prediction = pred._replace(extrinsics=None)
    r = model(edited, 6, views.images[6], views)
    assert float(r["reward"]) == pytest.approx((0.3 + 0.6 + r_a) / 3, rel=1e-5)
    weighted = _model(FixedVerifier(pred), normalization="clip", depth_weight=0.4, point_weight=0.4, pose_weight=0.1,
                      anchor_weight=0.1)(edited, 6, views.images[6], views)  # fmt: skip
    assert float(weighted["reward"]) == pytest.approx(0.4 * 0.3 + 0.4 * 0.6 + 0.1 + 0.1 * r_a, rel=1e-5)


def test_confidence_normalisations():
    conf = torch.tensor([[[1.0, 3.0], [5.0, 11.0]]])  # mean 5
    assert float(normalize_confidence(conf, "none")) == pytest.approx(5.0)
    assert float(normalize_confidence(conf, "log1p")) == pytest.approx(
        sum(math.log1p(c - 1) for c in (1, 3, 5, 11)) / 4
    )
    assert float(normalize_confidence(conf, "ratio", torch.tensor(5.0))) == pytest.approx(1.0)
    assert float(normalize_confidence(conf, "ratio", torch.tensor(4.0))) == pytest.approx(1.25)
    assert float(normalize_confidence(conf, "ratio", torch.tensor(2.0))) == pytest.approx(1.5)  # clipped
    assert float(normalize_confidence(conf, "clip", conf_max=5.0)) == pytest.approx((0.2 + 0.6 + 1 + 1) / 4)
    with pytest.raises(ValueError, match="reference"):
        normalize_confidence(conf, "ratio")
    with pytest.raises(ValueError, match="normalization"):
        normalize_confidence(conf, "softmax")


# ======================================================================================================================
# VGGT provider (no package, no weights here: sizing, error message, post-processing with stand-ins)
# ======================================================================================================================
def test_vggt_input_size_follows_width_518_and_patch_14():
    assert vggt_input_size(341, 341) == (518, 518)
    assert vggt_input_size(64, 96) == (350, 518)  # round(64 * 518 / 96 / 14) = 25 patches
    x = torch.rand(2, 3, 64, 96)
    y = resize_for_vggt(x)
    assert y.shape == (2, 3, 350, 518) and y.min() >= 0 and y.max() <= 1
    assert abs(float(y.mean()) - float(x.mean())) < 0.01


def test_vggt_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "vggt", None)
    provider = VGGTConfig().setup()
    with pytest.raises(ImportError, match="not on PyPI") as info:
        provider.predict(torch.rand(2, 3, 28, 28))
    assert VGGT_INSTALL in str(info.value)


def test_vggt_outputs_are_brought_back_to_the_input_size(monkeypatch: pytest.MonkeyPatch):
    def pose_encoding_to_extri_intri(pose_enc, image_size_hw):  # stand-in with VGGT's conventions
        b, s = pose_enc.shape[:2]
        extr = torch.eye(4)[:3].expand(b, s, 3, 4).clone()
        extr[..., :3, 3] = pose_enc[..., :3]
        h, w = image_size_hw
        intr = torch.zeros(b, s, 3, 3)
        intr[..., 0, 0] = (w / 2) / torch.tan(pose_enc[..., 8] / 2)
        intr[..., 1, 1] = (h / 2) / torch.tan(pose_enc[..., 7] / 2)
        intr[..., 0, 2], intr[..., 1, 2], intr[..., 2, 2] = w / 2, h / 2, 1.0
        return extr, intr

    class StandIn(torch.nn.Module):
        def forward(self, images):
            s, _, h, w = images.shape
            pose = torch.zeros(1, s, 9)
            pose[..., 0] = torch.arange(s, dtype=torch.float32)
            pose[..., 7:] = math.radians(60)
            return {
                "pose_enc": pose,
                "depth": torch.full((1, s, h, w, 1), 2.0),
                "depth_conf": 1 + torch.rand(1, s, h, w),
                "world_points_conf": torch.full((1, s, h, w), 3.0),
            }

    pose_module = types.ModuleType("vggt.utils.pose_enc")
    pose_module.pose_encoding_to_extri_intri = pose_encoding_to_extri_intri
    for name in ("vggt", "vggt.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vggt.utils.pose_enc", pose_module)
    provider = VGGTConfig().setup()
    provider.model = StandIn()
    pred = provider.predict(torch.rand(3, 3, 48, 64))
    assert pred.depth.shape == pred.depth_conf.shape == pred.point_conf.shape == (3, 48, 64)
    assert torch.allclose(pred.depth, torch.full_like(pred.depth, 2.0)) and pred.depth_conf.min() >= 1.0
    assert pred.extrinsics.shape == (3, 4, 4) and torch.equal(
        pred.extrinsics[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(3, 4)
    )
    assert pred.extrinsics[2, 0, 3] == 2.0
    focal = 32 / math.tan(math.radians(30))  # 60 degrees horizontal field of view at width 64
    assert float(pred.intrinsics[0, 0, 0]) == pytest.approx(focal, rel=1e-5)
    assert float(pred.intrinsics[0, 0, 2]) == pytest.approx(32.0) and float(pred.intrinsics[0, 1, 2]) == pytest.approx(
        24.0
    )
