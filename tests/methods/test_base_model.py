"""The base feature model trained by nerfstudio's Trainer on CPU: quality, densification, checkpoint reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsstudio_ext.methods.base.model import FeatureSplatfactoModel, FeatureSplatfactoModelConfig
from gsstudio_ext.methods.base.trainer_config import SHORT_SCHEDULE, gaussian_trainer_config
from gsstudio_ext.methods.base.training import load_run, prepare_config, train

STEPS = 300
FEATURE_DIM = 13  # 3 RGB + 13 = 16 channels, a gsplat fast size


def small_scene_config(**overrides) -> FeatureSplatfactoModelConfig:
    """Splatfacto's schedule compressed to a few hundred steps on a 96x96 scene."""
    return FeatureSplatfactoModelConfig(**{**SHORT_SCHEDULE, "feature_dims": {"feature": FEATURE_DIM}, **overrides})


@pytest.fixture(scope="module")
def trained(default_scene: Path, tmp_path_factory: pytest.TempPathFactory):
    config = gaussian_trainer_config(
        "gsstudio-splatfacto", small_scene_config(), extra_lrs={"feature": 0.0025}, max_steps=STEPS
    )
    config = prepare_config(config, default_scene, tmp_path_factory.mktemp("runs"), max_steps=STEPS, device="cpu")
    initial = {}

    def remember_initial_count(trainer_model: FeatureSplatfactoModel) -> None:
        initial["count"] = trainer_model.num_points

    trainer, config_path = train(config, on_setup=remember_initial_count)
    return trainer, config_path, initial["count"]


@pytest.mark.slow
def test_trains_to_25db_on_held_out_views(trained):
    trainer, _, _ = trained
    pipeline = trainer.pipeline
    pipeline.eval()
    metrics = pipeline.get_average_eval_image_metrics()
    assert len(pipeline.datamanager.fixed_indices_eval_dataloader) == 8
    assert metrics["psnr"] >= 25.0, metrics
    assert "lpips" not in metrics  # no metric that downloads weights


@pytest.mark.slow
def test_densification_ran_and_kept_features_aligned(trained):
    trainer, _, initial_count = trained
    model = trainer.pipeline.model
    counts = {name: param.shape[0] for name, param in model.gauss_params.items()}
    assert len(set(counts.values())) == 1, counts
    assert model.num_points != initial_count
    assert model.gauss_params["feature"].shape[1] == FEATURE_DIM
    # the feature optimizer's Adam state followed the surgery too
    state = trainer.optimizers.optimizers["feature"].state[model.gauss_params["feature"]]
    assert state["exp_avg"].shape == model.gauss_params["feature"].shape


@pytest.mark.slow
def test_checkpoint_reloads_and_renders_identically(trained):
    trainer, config_path, _ = trained
    _, reloaded = load_run(config_path)
    camera, _ = trainer.pipeline.datamanager.fixed_indices_eval_dataloader[0]
    trainer.pipeline.eval()
    before = trainer.pipeline.model.get_outputs_for_camera(camera)
    after = reloaded.model.get_outputs_for_camera(camera.to(reloaded.device))
    for key in ("rgb", "feature", "depth", "accumulation"):
        assert torch.equal(before[key].cpu(), after[key].cpu()), key
    assert reloaded.model.num_points == trainer.pipeline.model.num_points


def test_feature_channels_render_in_the_rgb_pass(default_scene: Path, monkeypatch: pytest.MonkeyPatch):
    """One rasterization per view renders RGB, features and depth; the feature map is the splat of the features."""
    import gsstudio_ext.methods.base.model as model_module
    from gsstudio_ext.core.rasterize import rasterize

    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["colors"].shape[-1])
        return rasterize(*args, **kwargs)

    monkeypatch.setattr(model_module, "rasterize", counting)
    config = gaussian_trainer_config("gsstudio-splatfacto", small_scene_config(), extra_lrs={"feature": 0.0025})
    config.pipeline.datamanager.data = default_scene
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    pipeline.eval()
    model = pipeline.model
    camera, _ = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    with torch.no_grad():
        model.gauss_params["feature"][:] = 1.0
    outputs = model.get_outputs_for_camera(camera)
    assert calls == [3 + FEATURE_DIM]
    assert outputs["feature"].shape[-1] == FEATURE_DIM
    # a constant feature of 1 renders to the accumulated alpha in every channel
    expected = outputs["accumulation"].expand_as(outputs["feature"])
    assert torch.allclose(outputs["feature"], expected, atol=1e-5)


@pytest.mark.slow
def test_run_loads_as_a_gaussian_scene_and_exports_to_ply(trained, tmp_path: Path):
    """A finished run reads back through core (features as extras) and writes a standard 3DGS .ply."""
    from gsstudio_ext.core.checkpoint import load_scene
    from gsstudio_ext.core.ply import read_ply, write_ply

    trainer, config_path, _ = trained
    model = trainer.pipeline.model
    scene = load_scene(config_path.parent)
    assert scene.num_gaussians == model.num_points
    assert torch.equal(scene.means, model.means.detach().cpu())
    assert torch.equal(scene.extras["feature"], model.gauss_params["feature"].detach().cpu())
    reread = read_ply(write_ply(tmp_path / "scene.ply", scene))
    assert torch.equal(reread.extras["feature"], scene.extras["feature"])
