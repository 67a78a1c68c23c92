"""RT-GS2 per-scene feature bake, its on-disk cache and the f_pc PLY columns."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch
from test_rtgs2_pairs import box_scene  # same folder (pytest puts it on sys.path)
from test_rtgs2_ssl import tiny_backbone
from torch import nn

from gsstudio_ext.core.ply import read_ply, write_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.methods.rtgs2.scene_features import FeatureCache, bake_features, scene_with_features
from gsstudio_ext.methods.rtgs2.ssl import gaussian_inputs


@pytest.fixture(scope="module")
def scene() -> GaussianScene:
    return box_scene()


def _counted(backbone: nn.Module) -> List[int]:
    """A list that grows by one at every forward of ``backbone``."""
    calls: List[int] = []
    backbone.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_bake_matches_direct_eval_forward_and_keeps_training_flag(scene: GaussianScene) -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    backbone.train()
    feats = bake_features(backbone, scene)
    assert feats.shape == (scene.num_gaussians, 32) and feats.dtype == torch.float16
    assert backbone.training
    assert bool(torch.isfinite(feats).all()) and float(feats.float().std()) > 1e-3

    backbone.eval()
    inputs = gaussian_inputs(scene)
    inputs[:, :3] -= scene.means.mean(dim=0)  # the bake centres the scene (a translation), no other change
    with torch.no_grad():
        direct = backbone(inputs[:, :3], inputs, torch.zeros(scene.num_gaussians, dtype=torch.long))
    assert torch.equal(feats, direct.half())
    full = bake_features(backbone, scene, dtype=torch.float32)
    assert not backbone.training
    assert full.dtype == torch.float32 and torch.allclose(full, direct, atol=1e-6)
    assert not full.requires_grad


def test_cache_bakes_once_and_rebakes_on_change_or_corruption(scene: GaussianScene, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    calls = _counted(backbone)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get(backbone, scene)
    assert len(calls) == 1 and first.shape == (scene.num_gaussians, 32)
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind
    assert cache.get(backbone, scene) is first and len(calls) == 1  # from memory

    # a fresh cache on the same folder reads the file instead of running the backbone
    reread = FeatureCache(tmp_path / "cache").get(backbone, scene)
    assert len(calls) == 1 and torch.equal(reread, first)

    # new weights: new key, new bake, second file
    with torch.no_grad():
        next(backbone.parameters()).add_(0.5)
    changed = cache.get(backbone, scene)
    assert len(calls) == 2 and not torch.equal(changed, first)
    assert len(list((tmp_path / "cache").iterdir())) == 2

    # a different scene (moved Gaussians): another bake
    moved = scene.clone()
    moved.means[:10] += 0.05
    cache.get(backbone, moved)
    assert len(calls) == 3

    # a corrupt file is rebaked (with a warning), rewritten, and then read normally
    path = cache.path(cache.key(backbone, scene))
    path.write_bytes(b"not a torch file")
    fresh = FeatureCache(tmp_path / "cache")
    with pytest.warns(UserWarning, match="unusable"):
        rebaked = fresh.get(backbone, scene)
    assert len(calls) == 4 and torch.equal(rebaked, changed)
    assert torch.equal(FeatureCache(tmp_path / "cache").get(backbone, scene), changed) and len(calls) == 4


def test_scene_with_features_round_trips_through_ply(scene: GaussianScene, tmp_path: Path) -> None:
    torch.manual_seed(0)
    feats = torch.randn(scene.num_gaussians, 32).half()
    base = scene.clone()
    base.extras["label"] = torch.arange(scene.num_gaussians, dtype=torch.int32)
    with_feats = scene_with_features(base, feats)
    assert "f_pc" not in base.extras  # the input scene is untouched
    assert with_feats.means is base.means and torch.equal(with_feats.extras["label"], base.extras["label"])

    path = write_ply(tmp_path / "scene.ply", with_feats)
    header = path.read_bytes().split(b"end_header")[0].decode("ascii")
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert [n for n in names if n.startswith("f_pc")] == [f"f_pc_{i}" for i in range(32)]
    back = read_ply(path)
    assert back.extras["f_pc"].shape == (scene.num_gaussians, 32) and back.extras["f_pc"].dtype == torch.float16
    assert torch.equal(back.extras["f_pc"], feats)
    assert torch.equal(back.extras["label"], base.extras["label"])
    with pytest.raises(ValueError, match="feats must be"):
        scene_with_features(scene, feats[:-1])
