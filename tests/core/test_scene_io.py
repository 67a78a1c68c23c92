"""GaussianScene, 3DGS PLY read/write and splatfacto checkpoint loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from gsstudio_ext.core import ply as ply_module
from gsstudio_ext.core.checkpoint import find_latest_checkpoint, load_scene, load_splatfacto_checkpoint
from gsstudio_ext.core.ply import SH_C0, SceneIOError, read_ply, write_ply
from gsstudio_ext.core.scene import GaussianScene

N = 700


def make_scene(sh_degree: int = 3, n: int = N, seed: int = 0) -> GaussianScene:
    scene = GaussianScene.random(n, sh_degree=sh_degree, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    scene.extras = {
        "instance_id": torch.randint(-3, 40, (n,), generator=gen, dtype=torch.int64),
        "label": torch.randint(0, 9, (n,), generator=gen, dtype=torch.int32),
        "feature": torch.randn(n, 5, generator=gen),
        "selected": torch.rand(n, generator=gen) > 0.5,
        "weight": torch.rand(n, generator=gen, dtype=torch.float64),
    }
    return scene


def assert_scenes_equal(a: GaussianScene, b: GaussianScene) -> None:
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert set(a.extras) == set(b.extras)
    for name in a.extras:
        x, y = a.extras[name], b.extras[name]
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        assert torch.equal(x, y), name


def core_property_names(sh_degree: int):
    k_rest = (sh_degree + 1) ** 2 - 1
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(3 * k_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


# ---------------------------------------------------------------------------------------------------------- scene


def test_scene_properties_and_activations():
    scene = make_scene(sh_degree=3)
    assert scene.num_gaussians == N and len(scene) == N
    assert scene.sh_degree == 3
    assert scene.colors_sh().shape == (N, 16, 3)
    assert torch.equal(scene.colors_sh()[:, 0], scene.sh_dc)
    assert torch.allclose(scene.scales(), scene.log_scales.exp())
    assert torch.allclose(scene.opacities(), torch.sigmoid(scene.opacity_logits))
    assert torch.allclose(scene.normalized_quats().norm(dim=-1), torch.ones(N))
    assert GaussianScene.random(10, sh_degree=0).sh_degree == 0
    assert GaussianScene.empty(sh_degree=2).num_gaussians == 0


def test_subset_keeps_extras_aligned():
    scene = make_scene()
    scene.extras["row"] = torch.arange(N)
    mask = scene.extras["label"] == 3
    sub = scene.subset(mask)
    assert sub.num_gaussians == int(mask.sum())
    assert torch.equal(sub.extras["row"], torch.nonzero(mask)[:, 0])
    assert torch.equal(sub.means, scene.means[mask])
    assert torch.equal(sub.extras["feature"], scene.extras["feature"][mask])
    assert bool((sub.extras["label"] == 3).all())

    idx = [5, 2, 600]
    by_index = scene.subset(idx)
    assert torch.equal(by_index.extras["row"], torch.tensor(idx))
    assert torch.equal(by_index.sh_rest, scene.sh_rest[idx])
    assert scene.subset(np.array([], dtype=np.int64)).num_gaussians == 0
    with pytest.raises(ValueError, match="mask must have shape"):
        scene.subset(torch.ones(N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        scene.subset([N])


def test_concatenate_and_to():
    a, b = make_scene(seed=1, n=30), make_scene(seed=2, n=20)
    both = GaussianScene.concatenate([a, b])
    assert both.num_gaussians == 50
    assert torch.equal(both.extras["feature"][30:], b.extras["feature"])
    assert torch.equal(both.quats[:30], a.quats)
    assert both.to("cpu").num_gaussians == 50
    with pytest.raises(ValueError, match="SH degree"):
        GaussianScene.concatenate([a, make_scene(sh_degree=1, n=5)])
    c = make_scene(n=5)
    del c.extras["label"]
    with pytest.raises(ValueError, match="extras"):
        GaussianScene.concatenate([a, c])
    with pytest.raises(ValueError, match="at least one"):
        GaussianScene.concatenate([])


def test_validate_reports_mismatch_and_nan():
    scene = make_scene(n=50)
    scene.validate()
    bad = scene.clone()
    bad.log_scales = bad.log_scales[:-1]
    with pytest.raises(ValueError, match="log_scales"):
        bad.validate()
    bad = scene.clone()
    bad.means[3, 1] = float("nan")
    with pytest.raises(ValueError, match="means contains NaN"):
        bad.validate()
    bad = scene.clone()
    bad.extras["feature"] = bad.extras["feature"][:10]
    with pytest.raises(ValueError, match="extra 'feature'"):
        bad.validate()
    bad = scene.clone()
    bad.sh_rest = torch.zeros(50, 5, 3)
    with pytest.raises(ValueError, match="coefficients"):
        bad.validate()


def test_splatfacto_params_round_trip():
    scene = make_scene(n=40)
    params = scene.to_splatfacto_params()
    assert params["opacities"].shape == (40, 1)
    assert params["features_rest"].shape == (40, 15, 3)
    assert "instance_id" in params
    assert set(scene.to_splatfacto_params(include_extras=False)) == {
        "means",
        "scales",
        "quats",
        "features_dc",
        "features_rest",
        "opacities",
    }
    back = GaussianScene.from_splatfacto_params({k: torch.nn.Parameter(v.float()) for k, v in params.items()})
    assert torch.equal(back.opacity_logits, scene.opacity_logits)
    assert torch.equal(back.extras["feature"], scene.extras["feature"])
    with pytest.raises(ValueError, match="lack"):
        GaussianScene.from_splatfacto_params({"means": scene.means})


# ---------------------------------------------------------------------------------------------------------- PLY


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_ply_round_trip_is_bit_identical(tmp_path: Path, sh_degree: int):
    scene = make_scene(sh_degree=sh_degree)
    path = write_ply(tmp_path / "scene.ply", scene)
    back = read_ply(path)
    assert back.sh_degree == sh_degree
    assert_scenes_equal(scene, back)


def test_plyfile_sees_standard_layout(tmp_path: Path):
    scene = make_scene(sh_degree=3)
    write_ply(tmp_path / "scene.ply", scene)
    ply = PlyData.read(str(tmp_path / "scene.ply"))
    assert not ply.text and ply.byte_order == "<"
    vertex = ply["vertex"]
    assert vertex.count == N
    names = [p.name for p in vertex.properties]
    extra_names = ["instance_id", "label"] + [f"feature_{i}" for i in range(5)] + ["selected", "weight"]
    assert names == core_property_names(3) + extra_names
    assert vertex.data.dtype["x"] == np.dtype("<f4")
    assert vertex.data.dtype["instance_id"] == np.dtype("<i4")
    # f_rest is channel-major: f_rest_{c*(K-1)+k} holds coefficient k of channel c.
    k_rest = 15
    for c in range(3):
        for k in (0, 7, 14):
            assert np.array_equal(vertex[f"f_rest_{c * k_rest + k}"], scene.sh_rest[:, k, c].numpy())
    assert np.array_equal(vertex["opacity"], scene.opacity_logits.numpy())
    assert np.array_equal(vertex["rot_0"], scene.quats[:, 0].numpy())
    assert np.array_equal(vertex["feature_3"], scene.extras["feature"][:, 3].numpy())


def test_reads_external_ascii_ply(tmp_path: Path):
    rows = [
        # x, y, z, f_dc_0..2, opacity, scale_0..2, rot_0..3, segment
        (0.5, -1.0, 2.0, 0.1, 0.2, 0.3, -2.0, -1.0, -1.5, -2.0, 1.0, 0.0, 0.0, 0.0, 7),
        (1.5, 0.0, -2.0, 0.4, 0.5, 0.6, 3.0, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 9),
    ]
    header = [
        "ply",
        "format ascii 1.0",
        "comment made by hand",
        f"element vertex {len(rows)}",
        *[f"property double {p}" for p in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]],
        *[f"property float {p}" for p in ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]],
        "property int segment",
        "element face 0",
        "property list uchar int vertex_indices",
        "end_header",
    ]
    body = [" ".join(str(v) for v in row) for row in rows]
    (tmp_path / "hand.ply").write_text("\n".join(header + body) + "\n")
    scene = read_ply(tmp_path / "hand.ply")
    assert scene.num_gaussians == 2 and scene.sh_degree == 0
    assert scene.means.dtype == torch.float32
    assert torch.equal(scene.means[1], torch.tensor([1.5, 0.0, -2.0]))
    assert torch.allclose(scene.sh_dc[0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(scene.opacity_logits, torch.tensor([-2.0, 3.0]))
    assert torch.equal(scene.quats[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(scene.extras["segment"], torch.tensor([7, 9], dtype=torch.int32))


def test_reads_shuffled_big_endian_ply_from_another_tool(tmp_path: Path):
    scene = make_scene(sh_degree=1, n=64)
    k_rest = 3
    cols = {
        "x": scene.means[:, 0],
        "y": scene.means[:, 1],
        "z": scene.means[:, 2],
        "opacity": scene.opacity_logits,
    }
    for i in range(3):
        cols[f"f_dc_{i}"] = scene.sh_dc[:, i]
        cols[f"scale_{i}"] = scene.log_scales[:, i]
    for i in range(4):
        cols[f"rot_{i}"] = scene.quats[:, i]
    for c in range(3):
        for k in range(k_rest):
            cols[f"f_rest_{c * k_rest + k}"] = scene.sh_rest[:, k, c]
    for j in range(5):
        cols[f"feature_{j}"] = scene.extras["feature"][:, j]
    cols["label"] = scene.extras["label"]
    order = list(cols)
    np.random.default_rng(3).shuffle(order)
    dtype = [(name, ">i4" if name == "label" else ">f4") for name in order]
    data = np.empty(64, dtype=dtype)
    for name in order:
        data[name] = cols[name].numpy()
    PlyData([PlyElement.describe(data, "vertex")], byte_order=">").write(str(tmp_path / "shuffled.ply"))

    back = read_ply(tmp_path / "shuffled.ply")
    assert back.sh_degree == 1
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest"):
        assert torch.equal(getattr(back, name), getattr(scene, name)), name
    assert set(back.extras) == {"feature", "label"}  # feature_0..4 reassembled by the naming rule
    assert torch.equal(back.extras["feature"], scene.extras["feature"])
    assert torch.equal(back.extras["label"], scene.extras["label"])


def test_reads_rgb_colour_ply(tmp_path: Path):
    props = ["x", "y", "z", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.zeros(3, dtype=[(p, "<f4") for p in props] + [(c, "u1") for c in ("red", "green", "blue")])
    data["red"] = [0, 255, 51]
    PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp_path / "rgb.ply"))
    scene = read_ply(tmp_path / "rgb.ply")
    colour = scene.sh_dc * SH_C0 + 0.5
    assert torch.allclose(colour[:, 0], torch.tensor([0.0, 1.0, 0.2]), atol=1e-6)
    assert scene.extras == {}


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "out" / "scene.ply"
    write_ply(target, make_scene(n=50))
    assert os.listdir(target.parent) == ["scene.ply"]
    before = target.read_bytes()

    def half_write(handle, header, records):
        handle.write(header)
        handle.write(records.tobytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(ply_module, "_write_payload", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_ply(target, make_scene(n=80, seed=5))
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == ["scene.ply"]
    monkeypatch.undo()

    bad = make_scene(n=50)
    bad.opacity_logits[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_ply(target, bad)
    assert target.read_bytes() == before


def test_write_rejects_unstorable_extras(tmp_path: Path):
    scene = make_scene(n=10)
    scene.extras["big"] = torch.full((10,), 2**40, dtype=torch.int64)
    with pytest.raises(SceneIOError, match="int32 range"):
        write_ply(tmp_path / "a.ply", scene)
    scene = make_scene(n=10)
    scene.extras["feature_0"] = torch.zeros(10)  # collides with feature [N, 5] -> feature_0..4
    with pytest.raises(SceneIOError, match="twice"):
        write_ply(tmp_path / "a.ply", scene)
    assert not (tmp_path / "a.ply").exists()


def test_read_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_ply(tmp_path / "missing.ply")
    (tmp_path / "notes.ply").write_text("hello world\n")
    with pytest.raises(SceneIOError, match="not a PLY"):
        read_ply(tmp_path / "notes.ply")
    (tmp_path / "broken.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty flot x\n")
    with pytest.raises(SceneIOError, match="malformed"):
        read_ply(tmp_path / "broken.ply")
    # a plain point cloud: has positions but not the Gaussian properties
    data = np.zeros(4, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(SceneIOError, match="missing properties.*opacity"):
        read_ply(tmp_path / "points.ply")
    # f_rest count that matches no SH degree
    scene = make_scene(sh_degree=0, n=4)
    write_ply(tmp_path / "deg0.ply", scene)
    vertex = PlyData.read(str(tmp_path / "deg0.ply"))["vertex"].data
    extended = np.empty(4, dtype=vertex.dtype.descr + [("f_rest_0", "<f4"), ("f_rest_1", "<f4")])
    for name in vertex.dtype.names:
        extended[name] = vertex[name]
    PlyData([PlyElement.describe(extended, "vertex")]).write(str(tmp_path / "badrest.ply"))
    with pytest.raises(SceneIOError, match="SH degree"):
        read_ply(tmp_path / "badrest.ply")


# ---------------------------------------------------------------------------------------------------------- ckpt


def save_fake_checkpoint(path: Path, scene: GaussianScene, step: int) -> None:
    pipeline = {f"_model.gauss_params.{k}": v for k, v in scene.to_splatfacto_params().items()}
    pipeline["_model.camera_optimizer.pose_adjustment"] = torch.zeros(3, 6)
    pipeline["datamanager.train_camera_optimizer.pose_adjustment"] = torch.zeros(3, 6)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "pipeline": pipeline, "optimizers": {}, "schedulers": {}, "scalers": {}}, path)


def test_load_splatfacto_checkpoint(tmp_path: Path):
    run = tmp_path / "outputs" / "scene" / "splatfacto" / "2025-01-01_000000"
    models = run / "nerfstudio_models"
    old, new = make_scene(n=30, seed=1), make_scene(n=45, seed=2)
    save_fake_checkpoint(models / "step-000000999.ckpt", old, 999)
    save_fake_checkpoint(models / "step-000002000.ckpt", new, 2000)
    (run / "config.yml").write_text("method_name: splatfacto\n")

    assert find_latest_checkpoint(run).name == "step-000002000.ckpt"
    for source in (run, models, run / "config.yml"):
        assert_scenes_equal(new, load_scene(source))
    loaded = load_splatfacto_checkpoint(models / "step-000000999.ckpt")
    assert_scenes_equal(old, loaded)
    assert loaded.extras["feature"].shape == (30, 5)  # extra gauss_params come back as extras

    write_ply(tmp_path / "x.ply", new)
    assert_scenes_equal(new, load_scene(tmp_path / "x.ply"))


def test_checkpoint_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_splatfacto_checkpoint(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no step-"):
        load_splatfacto_checkpoint(tmp_path / "empty_run")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(SceneIOError, match="not a readable torch checkpoint"):
        load_splatfacto_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"step": 1, "pipeline": {"_model.field.weight": torch.zeros(2)}}, tmp_path / "nerfacto.ckpt")
    with pytest.raises(SceneIOError, match="holds no Gaussians"):
        load_splatfacto_checkpoint(tmp_path / "nerfacto.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(SceneIOError, match="not a nerfstudio checkpoint"):
        load_splatfacto_checkpoint(tmp_path / "list.ckpt")
    (tmp_path / "scene.obj").write_text("v 0 0 0\n")
    with pytest.raises(SceneIOError, match="unsupported scene file"):
        load_scene(tmp_path / "scene.obj")
    with pytest.raises(FileNotFoundError):
        load_scene(tmp_path / "missing.ply")
