"""Anchor -> child layout in core: children as plain Gaussians, from params and from (ag2aussian-ext) checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsstudio_ext.core.anchors import child_positions, is_anchor_layout, scene_from_anchor_params
from gsstudio_ext.core.checkpoint import find_latest_checkpoint, load_scene, load_splatfacto_checkpoint
from gsstudio_ext.core.ply import SceneIOError, read_ply, write_ply


def anchor_params(num_anchors: int = 4, children: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = num_anchors * children
    return {
        "anchor_xyz": torch.randn(num_anchors, 3, generator=gen),
        "anchor_radius": torch.rand(num_anchors, generator=gen) + 0.5,
        "anchor_feat": torch.randn(num_anchors, 3, generator=gen),
        "offsets": torch.randn(n, 3, generator=gen),
        "scales": torch.randn(n, 3, generator=gen),
        "quats": torch.randn(n, 4, generator=gen),
        "features_dc": torch.randn(n, 3, generator=gen),
        "features_rest": torch.randn(n, 3, 3, generator=gen),
        "opacities": torch.randn(n, 1, generator=gen),
        "point2anchor": torch.arange(num_anchors).repeat_interleave(children).flip(0),
    }


def test_children_become_gaussians_at_world_positions():
    params = anchor_params()
    assert is_anchor_layout(params) and not is_anchor_layout({**params, "means": params["offsets"]})
    labels = torch.tensor([7, 7, 2, 5])
    scene = scene_from_anchor_params(params, labels)
    p2a = params["point2anchor"]
    assert scene.num_gaussians == 12 and scene.sh_degree == 1
    expected = params["anchor_xyz"][p2a] + params["anchor_radius"][p2a, None] * params["offsets"]
    assert torch.equal(scene.means, expected) and torch.equal(child_positions(params), expected)
    assert (
        scene.means[0].tolist()
        == (params["anchor_xyz"][3] + params["anchor_radius"][3] * params["offsets"][0]).tolist()
    )
    assert torch.equal(scene.log_scales, params["scales"]) and torch.equal(
        scene.opacity_logits, params["opacities"][:, 0]
    )
    assert scene.extras["instance_id"].tolist() == [5] * 3 + [2] * 3 + [7] * 6
    feats = scene.extras["instance_feature"]
    assert torch.allclose(feats.norm(dim=-1), torch.ones(12))
    assert torch.allclose(feats[0], params["anchor_feat"][3] / params["anchor_feat"][3].norm())
    assert set(scene_from_anchor_params(params).extras) == {"instance_feature"}


def test_inconsistent_layouts_are_rejected():
    params = anchor_params()
    with pytest.raises(ValueError, match="outside 0..3"):
        scene_from_anchor_params({**params, "point2anchor": params["point2anchor"] + 1})
    with pytest.raises(ValueError, match="anchor labels must be"):
        scene_from_anchor_params(params, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="lacks"):
        scene_from_anchor_params({k: v for k, v in params.items() if k != "quats"})


def _save(path: Path, params: dict, labels: torch.Tensor) -> None:
    state = {f"_model.gauss_params.{k}": v for k, v in params.items()}
    state["_model.index_labels"] = labels
    state["_model.language_embeddings"] = torch.zeros(2, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 9, "pipeline": state}, path)


def test_anchor_checkpoint_loads_children_with_instance_ids(tmp_path: Path):
    params = anchor_params()
    ckpt = tmp_path / "run" / "nerfstudio_models" / "step-000000009.ckpt"
    _save(ckpt, params, torch.tensor([0, 1, 1, 0]))
    for path in (ckpt, tmp_path / "run", ckpt.parent):
        scene = load_scene(path)
        assert scene.num_gaussians == 12
        assert torch.equal(scene.means, child_positions(params))
        assert scene.extras["instance_id"].tolist() == [0] * 3 + [1] * 6 + [0] * 3
    # Labels saved for another anchor set are dropped, not misapplied.
    _save(ckpt, params, torch.tensor([0, 1, 1]))
    assert set(load_splatfacto_checkpoint(ckpt).extras) == {"instance_feature"}
    # A broken layout is a clear checkpoint error.
    _save(ckpt, {**params, "point2anchor": params["point2anchor"] + 4}, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(SceneIOError, match="inconsistent"):
        load_scene(ckpt)


@pytest.mark.slow
def test_ag2_run_checkpoint_matches_the_model(ag2_run, tmp_path: Path):
    """load_scene of the trained run (dir, .ckpt or config.yml) gives the model's children, ids and features."""
    trainer, config_yml = ag2_run
    model = trainer.pipeline.model
    ckpt = find_latest_checkpoint(config_yml.parent)
    for path in (config_yml.parent, ckpt, config_yml):
        scene = load_scene(path)
        assert scene.num_gaussians == model.num_points
        torch.testing.assert_close(scene.means, model.means.detach().cpu(), rtol=0, atol=1e-6)
        assert torch.equal(scene.extras["instance_id"], model.instance_ids().cpu())
        torch.testing.assert_close(scene.extras["instance_feature"], model.instance_features().detach().cpu())
    # And it round-trips through a standard PLY.
    out = write_ply(tmp_path / "ag2.ply", scene)
    again = read_ply(out)
    assert torch.equal(again.means, scene.means) and torch.equal(
        again.extras["instance_id"], scene.extras["instance_id"]
    )
