"""RT-GS2's PTv3-style point backbone: shapes, sample independence, equivariance, invariance, gradients, fitting."""

import dataclasses

import pytest
import torch

from gsstudio_ext.methods.rtgs2 import backbone as backbone_module
from gsstudio_ext.methods.rtgs2.backbone import PointBackbone, PointBackboneConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU workloads run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**overrides) -> PointBackbone:
    torch.manual_seed(0)
    return PointBackbone(dataclasses.replace(PointBackboneConfig.tiny(), **overrides)).eval()


def _cloud(n: int, seed: int, extent: float = 1.0, offset: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=gen) * extent + offset
    feats = torch.cat([xyz, torch.rand(n, 4, generator=gen), torch.randn(n, 3, generator=gen) - 4.0], 1)
    return xyz, feats


def test_defaults_follow_the_spec_and_tiny_is_small() -> None:
    cfg = PointBackboneConfig()
    assert (cfg.in_channels, cfg.out_channels, cfg.grid_size, cfg.patch_size) == (10, 32, 0.07, 1024)
    assert cfg.enc_channels == (32, 64, 128, 256, 512) and cfg.dec_channels == (32, 64, 128, 256)
    assert cfg.orders == ("z", "z-trans", "hilbert", "hilbert-trans") and cfg.drop_path == 0.3
    tiny = PointBackboneConfig.tiny()
    assert tiny.enc_channels == (16, 32, 64) and tiny.patch_size == 64
    assert sum(p.numel() for p in PointBackbone(tiny).parameters()) < 200_000
    with pytest.raises(ValueError, match="decoder"):
        PointBackbone(dataclasses.replace(tiny, dec_depths=(1,)))
    with pytest.raises(ValueError, match="heads"):
        PointBackbone(dataclasses.replace(tiny, enc_heads=(3, 2, 4)))
    with pytest.raises(ValueError, match="orders"):
        PointBackbone(dataclasses.replace(tiny, orders=("peano",)))


def test_output_shape_dtype_and_finite_for_tiny_and_default_configs() -> None:
    xyz, feats = _cloud(1500, seed=1, extent=2.0)
    with torch.no_grad():
        out = _model()(xyz, feats)
        assert out.shape == (1500, 32) and out.dtype == torch.float32
        assert out.isfinite().all() and out.std() > 0.1
        torch.manual_seed(0)
        default = PointBackbone(PointBackboneConfig()).eval()
        out = default(xyz[:800], feats[:800])
    assert out.shape == (800, 32) and out.isfinite().all()
    empty = _model()(xyz[:0], feats[:0])
    assert empty.shape == (0, 32)
    with pytest.raises(ValueError, match="feats"):
        _model()(xyz, feats[:, :9])


def test_samples_in_a_batch_never_interact() -> None:
    model = _model()
    xyz_a, feats_a = _cloud(700, seed=2)
    xyz_b, feats_b = _cloud(300, seed=3, extent=3.0, offset=0.5)  # overlapping space, other density
    xyz = torch.cat([xyz_a, xyz_b])
    feats = torch.cat([feats_a, feats_b])
    batch = torch.cat([torch.zeros(700, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    mix = torch.randperm(1000, generator=torch.Generator().manual_seed(4))  # samples interleaved in the input
    with torch.no_grad():
        together = torch.empty(1000, 32)
        together[mix] = model(xyz[mix], feats[mix], batch[mix])
        alone_a = model(xyz_a, feats_a)
        alone_b = model(xyz_b, feats_b, torch.zeros(300, dtype=torch.long))
    torch.testing.assert_close(together[:700], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[700:], alone_b, atol=1e-5, rtol=0)


def test_permutation_equivariance_with_shared_voxels_and_duplicate_positions() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(5)
    # 600 points in a 5x5x5 block of voxels (about 5 per voxel), 100 of them at an already used position.
    xyz = torch.randint(0, 5, (600, 3), generator=gen) * 0.07 + torch.rand(600, 3, generator=gen) * 0.06
    xyz[500:] = xyz[:100]
    feats = torch.randn(600, 10, generator=gen)
    perm = torch.randperm(600, generator=gen)
    with torch.no_grad():
        out = model(xyz, feats)
        shuffled = model(xyz[perm], feats[perm])
    torch.testing.assert_close(shuffled, out[perm], atol=1e-4, rtol=0)


def test_output_is_invariant_to_translation_but_not_to_scaling() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(6)
    xyz = torch.randint(0, 256, (800, 3), generator=gen).float() / 256.0  # dyadic: shifts below are exact
    feats = torch.randn(800, 10, generator=gen)  # no xyz among the features
    shift = torch.tensor([3.0, -5.0, 12.5])
    with torch.no_grad():
        out = model(xyz, feats)
        moved = model(xyz + shift, feats)
        scaled = model(xyz * 2.0, feats)
    torch.testing.assert_close(moved, out, atol=1e-6, rtol=0)
    assert (scaled - out).abs().max() > 1e-2  # the grid coordinates do reach the features


def test_chunked_attention_on_cpu_matches_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    xyz, feats = _cloud(900, seed=7)
    with torch.no_grad():
        out = model(xyz, feats)
        monkeypatch.setattr(backbone_module, "_CPU_SCORE_BUDGET", 1)  # one patch per SDPA call
        chunked = model(xyz, feats)
    torch.testing.assert_close(chunked, out, atol=1e-6, rtol=0)


def test_patch_layout_never_mixes_samples_and_masks_only_padding() -> None:
    model = _model()
    xyz, feats = _cloud(300, seed=8)
    batch = torch.cat([torch.zeros(130, dtype=torch.long), torch.ones(170, dtype=torch.long)])
    level, _ = model._level0(xyz, feats, batch, 2)
    layout = level.patch_layout(0, 64)
    # 130 = 2*64 + 2 and 170 = 2*64 + 42: four full patches, then two partial ones.
    assert layout.num_full == 4 and layout.valid.sum(1).tolist() == [2, 42]
    assert layout.slot.unique().numel() == 300
    patch_of_point = layout.slot // 64
    for p in patch_of_point.unique():
        assert level.batch[patch_of_point == p].unique().numel() == 1


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = PointBackbone(dataclasses.replace(PointBackboneConfig.tiny(), drop_path=0.2)).train()
    xyz, feats = _cloud(600, seed=9)
    batch = (torch.arange(600) >= 400).long()
    weights = torch.randn(600, 32, generator=torch.Generator().manual_seed(10))
    (model(xyz, feats, batch) * weights).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_tiny_backbone_fits_a_small_supervised_target() -> None:
    torch.manual_seed(0)
    model = PointBackbone(dataclasses.replace(PointBackboneConfig.tiny(), out_channels=3, grid_size=0.1)).train()
    xyz, feats = _cloud(500, seed=11)
    target = torch.stack([torch.sin(6.0 * xyz[:, 0]), torch.cos(6.0 * xyz[:, 1]), (xyz[:, 2] > 0.5).float()], 1)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(xyz, feats), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first / 5, (first, last)
