"""gs-export and gs-query on the shared ag2aussian-ext run (called in-process through their ``main``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gsstudio_ext.cli import export, query
from gsstudio_ext.core.metrics import mask_iou
from gsstudio_ext.core.ply import read_ply

BIN = Path(sys.executable).parent
UNRELATED = "a violin concerto in a snowy forest"
STANDARD = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", *[f"f_rest_{i}" for i in range(9)], "opacity"] + [
    "scale_0",
    "scale_1",
    "scale_2",
    "rot_0",
    "rot_1",
    "rot_2",
    "rot_3",
]  # SH degree 1 in the short schedule: 3 * 3 rest coefficients


def _text_query(model, text: str) -> torch.Tensor:
    """The fixture model's selection for ``text``, leaving its query state as it was."""
    before = len(model.query_state.history)
    selected = model.text_query(text).clone()
    model.query_state.undo()
    assert len(model.query_state.history) == before
    return selected


def _user_error(main, args, kind: type) -> BaseException:
    """The exception behind a CLI's exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    cause = exit_info.value.__cause__
    assert isinstance(cause, kind), repr(cause)
    return cause


@pytest.mark.slow
def test_export_whole_scene_reloads_through_core_and_plyfile(ag2_run, tmp_path: Path):
    from plyfile import PlyData

    trainer, config_yml = ag2_run
    model = trainer.pipeline.model
    out = tmp_path / "scene.ply"
    report = export.main(["--load-config", str(config_yml), "--output", str(out)])
    assert report.num_written == report.num_gaussians == model.num_points and report.num_selected is None

    scene = read_ply(out)
    assert scene.num_gaussians == model.num_points
    assert torch.equal(scene.extras["instance_id"], model.instance_ids().cpu())
    torch.testing.assert_close(scene.means, model.means.detach().cpu(), rtol=0, atol=1e-6)
    torch.testing.assert_close(scene.extras["instance_feature"], model.instance_features().detach().cpu())
    torch.testing.assert_close(scene.sh_dc, model.gauss_params["features_dc"].detach().cpu())

    vertex = PlyData.read(str(out))["vertex"]
    names = [p.name for p in vertex.properties]
    assert vertex.count == model.num_points
    assert names[:3] == ["x", "y", "z"] and set(STANDARD) <= set(names)
    assert vertex.data["instance_id"].dtype.kind == "i"
    assert np.array_equal(vertex.data["instance_id"], model.instance_ids().cpu().numpy())
    xyz = np.stack([vertex.data[c] for c in "xyz"], axis=1)
    assert np.allclose(xyz, model.means.detach().cpu().numpy(), atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))
    print(f"whole scene: {vertex.count} Gaussians, {len(set(vertex.data['instance_id'].tolist()))} instance ids")


@pytest.mark.slow
def test_export_query_writes_only_the_selection(ag2_run, tmp_path: Path):
    trainer, config_yml = ag2_run
    model = trainer.pipeline.model
    selected = _text_query(model, "duck")
    out = tmp_path / "duck.ply"
    report = export.main(["--load-config", str(config_yml), "--output", str(out), "--query", "duck"])
    scene = read_ply(out)
    assert 0 < report.num_selected == scene.num_gaussians == int(selected.sum()) < model.num_points
    ids = model.instance_ids().cpu()
    assert torch.equal(scene.extras["instance_id"], ids[selected.cpu()])
    assert set(scene.extras["instance_id"].tolist()) <= set(ids[selected.cpu()].tolist())
    torch.testing.assert_close(scene.means, model.means.detach().cpu()[selected.cpu()], rtol=0, atol=1e-6)
    duck_ids = sorted(set(scene.extras["instance_id"].tolist()))
    print(f"duck: {scene.num_gaussians} of {model.num_points} Gaussians, instance ids {duck_ids}")

    marked = tmp_path / "marked.ply"
    export.main(["--load-config", str(config_yml), "--output", str(marked), "--query", "duck", "--no-selection-only"])
    whole = read_ply(marked)
    assert whole.num_gaussians == model.num_points
    assert torch.equal(whole.extras["selected"].bool(), selected.cpu())


@pytest.mark.slow
def test_export_errors_write_nothing(ag2_run, tmp_path: Path):
    _, config_yml = ag2_run
    out = tmp_path / "nothing.ply"
    err = _user_error(export.main, ["--load-config", config_yml, "--output", out, "--query", UNRELATED], ValueError)
    assert "selected no Gaussians" in str(err) and "nothing written" in str(err)
    assert list(tmp_path.iterdir()) == []

    missing = tmp_path / "no_run" / "config.yml"
    err = _user_error(export.main, ["--load-config", missing, "--output", out], FileNotFoundError)
    assert str(missing) in str(err)
    err = _user_error(export.main, ["--load-config", config_yml, "--output", out, "--query", " "], ValueError)
    assert "empty text query" in str(err)
    err = _user_error(export.main, ["--load-config", config_yml, "--output", tmp_path / "x.txt"], ValueError)
    assert ".ply" in str(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gs_query_renders_the_duck_on_the_test_split(ag2_run, tmp_path: Path):
    trainer, config_yml = ag2_run
    pipeline = trainer.pipeline
    datamanager = pipeline.datamanager
    selected = _text_query(pipeline.model, "duck")
    out = tmp_path / "duck"
    summary = query.main(["--load-config", str(config_yml), "--query", "duck", "--output-dir", str(out)])

    stems = datamanager.eval_stems
    written = json.loads((out / "query.json").read_text())
    assert written == summary
    assert written["query"] == "duck" and written["provider"] == "label:minilm"
    assert written["num_selected"] == int(selected.sum()) > 0 and written["source"] == {"split": "test"}
    assert [f["frame"] for f in written["frames"]] == stems
    assert sorted(written["files"]) == sorted(f"{o}/{s}.png" for o in ("selection", "relevancy", "rgb") for s in stems)
    assert sorted(p.name for p in (out / "selection").iterdir()) == sorted(f"{s}.png" for s in stems)

    names = {obj["name"]: obj["id"] for obj in datamanager.train_dataset.metadata["scene"]["objects"]}
    ious = {}
    for camera, batch in datamanager.fixed_indices_eval_dataloader:
        stem = stems[int(batch["image_idx"])]
        mask = Image.open(out / "selection" / f"{stem}.png")
        rgb = Image.open(out / "rgb" / f"{stem}.png")
        relevancy = Image.open(out / "relevancy" / f"{stem}.png")
        assert mask.mode == relevancy.mode == "L" and rgb.mode == "RGB"
        assert mask.size == rgb.size == (int(camera.width), int(camera.height))
        mask = np.asarray(mask)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        ids = batch["instance_ids"].tolist()
        if names["duck"] not in ids:
            continue
        gt = batch["instance_masks"][ids.index(names["duck"])].cpu().numpy()
        if gt.sum() >= 20:
            ious[stem] = mask_iou(mask > 0, gt)
            assert np.asarray(relevancy)[gt].mean() > np.asarray(relevancy)[~gt].mean()
    print("duck selection IoU per test frame:", {k: round(v, 3) for k, v in ious.items()})
    assert len(ious) >= 4 and min(ious.values()) >= 0.7, ious


@pytest.mark.slow
def test_gs_query_errors(ag2_run, tmp_path: Path):
    _, config_yml = ag2_run
    out = tmp_path / "out"
    missing = tmp_path / "no_run" / "config.yml"
    err = _user_error(query.main, ["--load-config", missing, "--query", "duck", "--output-dir", out], FileNotFoundError)
    assert str(missing) in str(err)
    err = _user_error(query.main, ["--load-config", config_yml, "--query", "", "--output-dir", out], ValueError)
    assert "empty text query" in str(err)

    # A run whose checkpoints are gone (output_dir points at an empty folder).
    config = yaml.load(Path(config_yml).read_text(), Loader=yaml.Loader)
    config.output_dir = tmp_path / "moved"
    moved = tmp_path / "moved_config.yml"
    moved.write_text(yaml.dump(config), "utf8")
    err = _user_error(query.main, ["--load-config", moved, "--query", "duck", "--output-dir", out], FileNotFoundError)
    assert str(moved) in str(err) and "checkpoint" in str(err)

    path = tmp_path / "camera_path.json"
    path.write_text(json.dumps({"render_width": 32}))
    err = _user_error(
        query.main, ["--load-config", config_yml, "--query", "duck", "--output-dir", out, "--camera-path", path],
        ValueError,
    )  # fmt: skip
    assert "camera path" in str(err)
    assert not out.exists()


@pytest.mark.slow
def test_gs_query_camera_path(ag2_run, tmp_path: Path):
    """A two-camera nerfstudio camera_path.json built from the first test camera: frame_00000/1 selection masks."""
    trainer, config_yml = ag2_run
    camera, _ = trainer.pipeline.datamanager.fixed_indices_eval_dataloader[0]
    c2w = torch.eye(4)
    c2w[:3] = camera.camera_to_worlds[0].cpu()
    fov = float(2 * torch.rad2deg(torch.atan(camera.height[0, 0] / (2 * camera.fy[0, 0]))))
    frames = [{"camera_to_world": c2w.flatten().tolist(), "fov": fov, "aspect": 1.0}] * 2
    path = tmp_path / "camera_path.json"
    path.write_text(json.dumps({"render_width": 48, "render_height": 48, "camera_path": frames}))
    out = tmp_path / "path"
    summary = query.main(
        ["--load-config", str(config_yml), "--query", "duck", "--output-dir", str(out), "--camera-path", str(path),
         "--outputs", "selection"]
    )  # fmt: skip
    assert summary["source"] == {"camera_path": str(path)}
    assert summary["files"] == ["selection/frame_00000.png", "selection/frame_00001.png"]
    masks = [np.asarray(Image.open(out / f)) for f in summary["files"]]
    assert masks[0].shape == (48, 48) and np.array_equal(masks[0], masks[1]) and masks[0].max() == 255
    assert summary["frames"][0]["selected_pixels"] == int((masks[0] > 0).sum()) > 0


def test_gs_export_help_runs_as_a_console_script():
    result = subprocess.run(
        [str(BIN / "gs-export"), "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--load-config", "--output", "--query", "--negatives", "--threshold", "--selection-only"):
        assert flag in result.stdout, flag


@pytest.fixture(scope="module")
def splatfacto_run(default_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.yml of gsstudio-splatfacto trained 10 CPU steps at SH degree 0 with a 13-channel feature."""
    from gsstudio_ext.methods.base.method import gsstudio_splatfacto
    from gsstudio_ext.methods.base.training import prepare_config, train

    config = prepare_config(gsstudio_splatfacto.config, default_scene, tmp_path_factory.mktemp("sf"), max_steps=10)
    config.machine.device_type = "cpu"
    config.pipeline.model.sh_degree = 0
    config.pipeline.model.feature_dims = {"feature": 13}
    return train(config)[1]


@pytest.mark.slow
def test_export_splatfacto_run(splatfacto_run: Path, tmp_path: Path):
    """Whole scene with the method's feature; degree-0 logit colours become standard DC; a query is refused."""
    from gsstudio_ext.core.sh import SH_C0
    from gsstudio_ext.methods.base.training import load_run

    _, pipeline = load_run(splatfacto_run)
    params = pipeline.model.gauss_params
    out = tmp_path / "sf.ply"
    report = export.main(["--load-config", str(splatfacto_run), "--output", str(out)])
    scene = read_ply(out)
    assert report.num_written == scene.num_gaussians == params["means"].shape[0]
    assert set(scene.extras) == {"feature"} and scene.extras["feature"].shape[1] == 13
    assert torch.equal(scene.means, params["means"].detach().cpu()) and scene.sh_degree == 0
    torch.testing.assert_close(scene.sh_dc * SH_C0 + 0.5, torch.sigmoid(params["features_dc"].detach().cpu()))

    err = _user_error(export.main, ["--load-config", splatfacto_run, "--output", tmp_path / "q.ply", "--query", "mug"],
                      query.QueryError)  # fmt: skip
    assert "no text queries" in str(err)
    assert not (tmp_path / "q.ply").exists()


@pytest.mark.slow
def test_gs_query_renders_a_referring_expression(refer_run, tmp_path: Path):
    """gs-query on a referspat-ext run: the referring mask of each test frame as the selection PNG."""
    trainer, config_yml = refer_run
    summary = query.main(["--load-config", str(config_yml), "--query", "the duck", "--output-dir", str(tmp_path)])
    assert summary["method"] == "referspat-ext" and summary["threshold"] == 0.5 and summary["num_selected"] > 0
    ious = []
    for (_, batch), frame in zip(trainer.pipeline.datamanager.fixed_indices_eval_dataloader, summary["frames"]):
        duck = batch["instance_masks"][batch["instance_ids"].tolist().index(5)].numpy()
        mask = np.asarray(Image.open(tmp_path / frame["files"]["selection"])) > 127
        relevancy = np.asarray(Image.open(tmp_path / frame["files"]["relevancy"]))
        assert relevancy[duck].mean() > relevancy[~duck].mean() + 100
        ious.append(mask_iou(mask, duck))
    assert np.mean(ious) >= 0.5, ious
    assert trainer.pipeline.model.selection is None


@pytest.mark.slow
def test_gs_export_writes_a_referring_selection(refer_run, tmp_path: Path):
    trainer, config_yml = refer_run
    expected = int(_text_query(trainer.pipeline.model, "the red car").sum())
    out = tmp_path / "car.ply"
    report = export.main(["--load-config", str(config_yml), "--output", str(out), "--query", "the red car"])
    scene = read_ply(out)
    assert report.num_selected == report.num_written == scene.num_gaussians == expected > 0
    assert scene.extras["referring"].shape == (expected, 16)  # the learnt referring features travel along
