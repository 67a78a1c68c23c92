"""rl3dedit-ext end to end on CPU: ns-train edits a trained (fused) mushroom in one pass with the offline procedural
editor (9 views painted blue, then the refit); held-out views show the edit; ns-eval, ns-render and gs-rl3dedit-edit
expose it; undo; clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsstudio_ext.core.scene_render import render_scene

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _cli(*args: str) -> None:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10.0 * torch.log10(((a - b) ** 2).mean().clamp_min(1e-12)))


def test_ns_train_edit_shows_in_held_out_views(rl3dedit_run) -> None:
    from gsstudio_ext.methods.rl3dedit.view_editors import (
        ProceduralViewEditor,
        ProceduralViewEditorConfig,
        SourceViews,
    )
    from gsstudio_ext.methods.romap.pipeline import views_of

    trainer, _ = rl3dedit_run
    model = trainer.pipeline.model
    records = model.edit_records()
    assert [(r["instruction"], r["provider"]) for r in records] == [("blue", "procedural")]
    assert len(records[0]["views"]) == 9 and len(set(records[0]["views"])) == 9
    views = views_of(trainer.pipeline.datamanager.eval_dataset.cameras)
    white = torch.ones(3)
    original = render_scene(
        model.original_scene(), views.viewmats, views.Ks, views.width, views.height, background=white, depth=True
    )
    alphas = original.alpha[..., 0]
    depths = torch.where(alphas > 0, original.depth[..., 0], torch.zeros_like(alphas))
    sources = SourceViews(original.rgb.permute(0, 3, 1, 2), alphas, depths, views.viewmats, views.Ks)
    truth = ProceduralViewEditor(ProceduralViewEditorConfig()).edit(sources, "blue").images  # the edit, held out
    edited = render_scene(model.stored_edit(), views.viewmats, views.Ks, views.width, views.height, background=white)
    after = [_psnr(edited.rgb[i].permute(2, 0, 1), truth[i]) for i in range(len(truth))]
    before = [_psnr(sources.images[i], truth[i]) for i in range(len(truth))]
    print(f"held-out PSNR to the edit: before {np.round(before, 2)}, after {np.round(after, 2)}")
    assert max(before) < 15.0 and min(after) >= 25.0


def test_ns_eval_and_ns_render_outputs(rl3dedit_run, tmp_path: Path) -> None:
    _, config_path = rl3dedit_run
    _cli("ns-eval", "--load-config", str(config_path), "--output-path", str(tmp_path / "eval.json"),
         "--render-output-path", str(tmp_path / "renders"))  # fmt: skip
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    print({k: round(v, 4) for k, v in results.items() if isinstance(v, float)})
    assert {"ph_loss", "ph_loss_original", "clip_directional", "changed_pixels"} <= set(results)
    assert results["changed_pixels"] > 0.2 and np.isfinite(results["ph_loss"])
    out = tmp_path / "render"
    _cli(
        "ns-render", "dataset", "--load-config", str(config_path), "--output-path", str(out), "--split", "test",
        "--rendered-output-names", "rgb", "original_rgb", "edited_rgb", "--image-format", "png",
    )  # fmt: skip
    images = {name: [np.asarray(Image.open(p), np.float32) / 255 for p in sorted(out.rglob(f"{name}/*.png"))]
              for name in ("rgb", "original_rgb", "edited_rgb")}  # fmt: skip
    assert len(images["rgb"]) == 6
    assert np.abs(images["rgb"][0] - images["edited_rgb"][0]).max() < 2 / 255
    blue = images["edited_rgb"][0][..., 2] - images["edited_rgb"][0][..., 0]
    was = images["original_rgb"][0][..., 2] - images["original_rgb"][0][..., 0]
    assert float(blue.mean()) > float(was.mean()) + 0.2


def test_cli_edit_writes_ply_report_and_checkpoint(rl3dedit_run, tmp_path: Path) -> None:
    from gsstudio_ext.cli.rl3dedit_edit import RL3DEditCommand, run
    from gsstudio_ext.core.ply import read_ply
    from gsstudio_ext.methods.base.training import load_run

    _, config_path = rl3dedit_run
    metrics = run(
        RL3DEditCommand(run=config_path, instruction="red", editor="procedural", steps=40, clip="tiny", out=tmp_path)
    )
    assert metrics["changed_pixels"] > 0.2
    scene = read_ply(tmp_path / "edited.ply")
    assert scene.num_gaussians > 1000
    report = json.loads((tmp_path / "edit_report.json").read_text())
    assert report["provider"] == "procedural" and report["prompt"] == "red"
    assert report["grid_columns"][2] == "changed pixels" and (tmp_path / "edit_grid.png").is_file()
    _, pipeline = load_run(config_path)
    assert [r["instruction"] for r in pipeline.model.edit_records()] == ["blue", "red"]


def test_undo_steps_back_through_the_session(rl3dedit_run) -> None:
    model = rl3dedit_run[0].pipeline.model
    model.config.edit.refit.steps = 5
    before = model.stored_edit()
    model.edit("green", None)
    assert [r["instruction"] for r in model.edit_records()][-1] == "green"
    assert model.edit_actions().undo()
    assert torch.equal(model.stored_edit().sh_dc, before.sh_dc)


def test_clear_errors(romap_scene: Path, tmp_path: Path) -> None:
    from gsstudio_ext.data.multi_scene import world_frame_parser
    from gsstudio_ext.methods.base.training import prepare_config, train
    from gsstudio_ext.methods.rl3dedit.config import rl3dedit_trainer_config
    from gsstudio_ext.methods.rl3dedit.model import RL3DEditModelConfig

    config = rl3dedit_trainer_config(RL3DEditModelConfig())
    config.pipeline.datamanager.dataparser = world_frame_parser()
    with pytest.raises(ValueError, match="edits a trained scene"):
        train(prepare_config(config, romap_scene, tmp_path / "a", 2, "cpu"))
    config = rl3dedit_trainer_config(RL3DEditModelConfig(scene=romap_scene / "gaussians.ply"))
    config.pipeline.datamanager.dataparser = world_frame_parser()
    with pytest.raises(ValueError, match="give the edit"):
        train(prepare_config(config, romap_scene, tmp_path / "b", 2, "cpu"))
