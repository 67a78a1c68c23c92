"""RT-GS2 Stage A: inputs, pair samples, PointInfoNCE and the training loop."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import pytest
import torch
from test_rtgs2_pairs import box_scene, orbit_cameras  # same folder (pytest puts it on sys.path)
from torch import Tensor, nn

from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.sh import RGB2SH
from gsstudio_ext.methods.rtgs2.pairs import PairMiningConfig, ViewPair, mine_pairs
from gsstudio_ext.methods.rtgs2.ssl import (
    SSLConfig,
    gaussian_inputs,
    make_pair_sample,
    point_info_nce,
    ssl_loss,
    train_backbone,
    voxel_subsample,
)


class StandInBackbone(nn.Module):
    """Per-point MLP with PointBackbone's forward signature (used when the real backbone is not importable)."""

    def __init__(self, out_dim: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, out_dim))

    def forward(self, coords: Tensor, feats: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        return self.mlp(feats)


def tiny_backbone() -> nn.Module:
    """The real tiny PointBackbone when it imports, else the stand-in; both map [N, 10] -> [N, 32]."""
    try:
        from gsstudio_ext.methods.rtgs2.backbone import PointBackbone, PointBackboneConfig
    except ImportError:
        return StandInBackbone()
    return PointBackbone(PointBackboneConfig.tiny())


@pytest.fixture(scope="module")
def scene() -> GaussianScene:
    """The box scene with strongly varied per-Gaussian colours: an appearance cue a tiny backbone can pick up in a
    hundred steps (geometric cues under random rotations need far longer training)."""
    return box_scene(colour_noise=0.3)


@pytest.fixture(scope="module")
def pairs(scene: GaussianScene) -> List[ViewPair]:
    return mine_pairs(scene, orbit_cameras(), PairMiningConfig(anchor_every=6, min_gap=2))


def test_gaussian_inputs_exact_values() -> None:
    rgb = torch.tensor([[0.2, 0.5, 0.9], [0.0, 1.0, 0.3]])
    dc = RGB2SH(rgb)
    dc[1, 0] = -5.0  # 0.282 * -5 + 0.5 < 0 -> clamped to 0
    dc[1, 1] = 5.0  # > 1 -> clamped to 1
    scene = GaussianScene(
        means=torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]),
        quats=torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]),
        log_scales=torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.5, -0.5]]),
        opacity_logits=torch.tensor([0.0, math.log(3.0)]),
        sh_dc=dc,
        sh_rest=torch.zeros(2, 0, 3),
    )
    out = gaussian_inputs(scene)
    expected = torch.tensor(
        [[1.0, 2.0, 3.0, 0.2, 0.5, 0.9, 0.5, -1.0, -2.0, -3.0], [-1.0, 0.0, 0.5, 0.0, 1.0, 0.3, 0.75, 0.0, 0.5, -0.5]]
    )
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(gaussian_inputs(scene, torch.tensor([1])), expected[1:], atol=1e-5)


def test_voxel_subsample_one_per_voxel() -> None:
    torch.manual_seed(0)
    points = torch.rand(2000, 3)
    ids = voxel_subsample(points, 0.25, torch.Generator().manual_seed(1))
    cells = torch.floor(points / 0.25).long()
    occupied = torch.unique(cells, dim=0).shape[0]
    assert ids.shape[0] == occupied == 64  # 4 x 4 x 4 voxels, all occupied by 2000 points
    assert torch.unique(cells[ids], dim=0).shape[0] == occupied
    other = voxel_subsample(points, 0.25, torch.Generator().manual_seed(2))
    assert not torch.equal(ids, other)  # the representative is random


def test_pair_sample_structure_and_augmentation(scene: GaussianScene, pairs: List[ViewPair]) -> None:
    torch.manual_seed(0)
    config = SSLConfig(voxel_size=0.15)
    pair = pairs[1]
    sample = make_pair_sample(scene, pair, config, torch.Generator().manual_seed(3))
    m = sample.ids.shape[0]
    assert sample.coords.shape == (m, 3) and sample.feats.shape == (m, 10) and sample.batch.shape == (m,)
    first, second = sample.ids[sample.batch == 0], sample.ids[sample.batch == 1]
    assert bool(pair.visible_first[first].all()) and bool(pair.visible_second[second].all())
    # one voxel-subsampled set: the union of both views holds at most one Gaussian per voxel
    union = torch.unique(sample.ids)
    cells = torch.floor(scene.means[union] / 0.15).long()
    assert torch.unique(cells, dim=0).shape[0] == union.shape[0]
    assert union.shape[0] < 0.9 * scene.num_gaussians
    # correspondences: same Gaussian, query rows in view 0, key rows in view 1, all shared subsampled Gaussians
    assert sample.query.shape[0] > 50
    assert torch.equal(sample.ids[sample.query], sample.ids[sample.key])
    assert bool((sample.batch[sample.query] == 0).all()) and bool((sample.batch[sample.key] == 1).all())
    shared = set(first.tolist()) & set(second.tolist()) & set(pair.correspondences.tolist())
    assert set(sample.ids[sample.query].tolist()) == shared
    # augmentation: coords change, each view is a similarity transform (distances scaled by one s in range)
    original = gaussian_inputs(scene, sample.ids)
    assert torch.equal(sample.coords, sample.feats[:, :3])
    assert not torch.allclose(sample.coords, original[:, :3], atol=1e-2)
    scales = []
    for view in (0, 1):
        rows = (sample.batch == view).nonzero()[:, 0]
        d_aug = torch.cdist(sample.coords[rows], sample.coords[rows])
        d_orig = torch.cdist(original[rows, :3], original[rows, :3])
        far = d_orig > 0.05
        ratio = d_aug[far] / d_orig[far]
        assert float(ratio.max() - ratio.min()) < 1e-3
        s = float(ratio.mean())
        assert 0.6 <= s <= 1.2
        assert torch.allclose(sample.coords[rows].mean(dim=0), torch.zeros(3), atol=1e-4)  # centred
        shift = sample.feats[rows, 7:10] - original[rows, 7:10]
        assert torch.allclose(shift, torch.full_like(shift, math.log(s)), atol=1e-4)  # log(s) added
        jitter = sample.feats[rows, 3:7] - original[rows, 3:7]
        assert 0.005 < float(jitter.std()) < 0.03 and float(jitter.abs().max()) < 0.15
        assert float(sample.feats[rows, 3:7].min()) >= 0.0 and float(sample.feats[rows, 3:7].max()) <= 1.0
        scales.append(s)
    assert abs(scales[0] - scales[1]) > 1e-4  # views augmented independently


def test_info_nce_extremes_and_hand_checked_value() -> None:
    torch.manual_seed(0)
    k = 64
    feats = torch.randn(k, 32)
    rows = torch.arange(k)
    matched = torch.cat([feats, feats])  # key i = query i
    loss, acc = point_info_nce(matched, rows, rows + k, temperature=0.07, normalize=True)
    assert float(loss) < 0.05 and float(acc) == 1.0
    # unrelated, nearly constant logits: loss = log(K)
    random_feats = torch.randn(2 * k, 32) * 1e-3
    loss, _ = point_info_nce(random_feats, rows, rows + k, temperature=1.0, normalize=False)
    assert float(loss) == pytest.approx(math.log(k), abs=1e-3)
    # normalised random 32-d features at a high temperature: still close to log(K)
    loss, _ = point_info_nce(torch.randn(2 * k, 32), rows, rows + k, temperature=10.0, normalize=True)
    assert float(loss) == pytest.approx(math.log(k), abs=0.05)
    # max_pairs samples 10 of the 64 correspondences: log(10)
    loss, _ = point_info_nce(random_feats, rows, rows + k, temperature=1.0, normalize=False, max_pairs=10)
    assert float(loss) == pytest.approx(math.log(10), abs=1e-3)

    # 2 x 2 by hand: Q = [[1, 0], [0, 1]], K = [[1, 0], [2, 1]], tau = 1 -> logits [[1, 2], [0, 1]]
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 1.0]])
    q, key = torch.tensor([0, 1]), torch.tensor([2, 3])
    loss, acc = point_info_nce(f, q, key, temperature=1.0, normalize=False)
    expected = 0.5 * (math.log(1 + math.e) + math.log(1 + math.exp(-1)))  # 0.81326
    assert float(loss) == pytest.approx(expected, abs=1e-5) and float(acc) == 0.5
    # normalised: k2 = [2, 1] / sqrt(5); logits [[1, 2/sqrt5], [0, 1/sqrt5]]; tau 0.5 doubles them
    loss, acc = point_info_nce(f, q, key, temperature=0.5, normalize=True)
    a, b = 2 / math.sqrt(5), 1 / math.sqrt(5)
    expected = 0.5 * (math.log(1 + math.exp(2 * (a - 1))) + math.log(1 + math.exp(-2 * b)))
    assert float(loss) == pytest.approx(expected, abs=1e-5) and float(acc) == 1.0
    empty = torch.zeros(0, dtype=torch.long)
    loss, acc = point_info_nce(f.requires_grad_(), empty, empty)
    assert float(loss.detach()) == 0.0 and float(acc) == 0.0 and loss.requires_grad


def test_ssl_loss_gradients_reach_backbone(scene: GaussianScene, pairs: List[ViewPair]) -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    out = ssl_loss(backbone, scene, pairs[0], SSLConfig(), torch.Generator().manual_seed(0))
    assert set(out) == {"contrastive", "match_accuracy"}
    assert 0.0 <= float(out["match_accuracy"]) <= 1.0 and not out["match_accuracy"].requires_grad
    out["contrastive"].backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_train_backbone_lowers_loss_and_raises_accuracy(scene: GaussianScene, pairs: List[ViewPair]) -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    backbone.eval()
    metrics: List[Dict[str, float]] = []
    config = SSLConfig(voxel_size=0.2, max_correspondences=64, lr=3e-3)  # small samples: fast on 2 CPU cores
    losses = train_backbone(
        backbone,
        [(scene, pairs), (scene, [])],  # a scene without pairs is skipped
        steps=100,
        config=config,
        generator=torch.Generator().manual_seed(0),
        progress=lambda step, m: metrics.append(m),
    )
    assert len(losses) == 100 and len(metrics) == 100
    assert [m["contrastive"] for m in metrics] == losses
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    acc_first = sum(m["match_accuracy"] for m in metrics[:20]) / 20
    acc_last = sum(m["match_accuracy"] for m in metrics[-20:]) / 20
    print(f"loss {first:.3f} -> {last:.3f}, accuracy {acc_first:.3f} -> {acc_last:.3f}")
    # observed with the tiny PointBackbone: loss 4.20 -> 3.11, accuracy 0.037 -> 0.103 (log 64 = 4.16)
    assert last < first - 0.5
    assert acc_last > 1.5 * acc_first and acc_last > 0.06
    assert not backbone.training  # flag restored
    with pytest.raises(ValueError, match="no scene has any mined pair"):
        train_backbone(backbone, [(scene, [])], steps=1)
