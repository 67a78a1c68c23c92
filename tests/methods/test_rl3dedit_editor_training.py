"""RL3DEdit editor training (GRPO on a tiny FLUX-Kontext): the sample source (cameras from transforms.json, seeded and
rank-split samples, cached renders), a 2-update run (LoRA file, JSONL log) and data-parallel training over 2 gloo
processes. Tiny models, 32-px views, G = 2, 2 denoising steps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.ply import write_ply
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.data.synthetic.cameras import look_at
from gsstudio_ext.data.transforms_cameras import read_run_frame, read_transforms_cameras, to_run_frame
from gsstudio_ext.methods.rl3dedit.editor_training import EditorTrainingConfig, anchor_index_of, train_editor
from gsstudio_ext.methods.rl3dedit.grpo import GRPOConfig
from gsstudio_ext.methods.rl3dedit.rewards import ReprojectionVerifierConfig, RewardConfig
from gsstudio_ext.methods.rl3dedit.sde import WindowConfig
from gsstudio_ext.methods.rl3dedit.training_samples import (
    SampleSource,
    SampleSourceConfig,
    SceneSpec,
    parse_instructions,
    parse_scene_arg,
)
from gsstudio_ext.models.flux_tiny import TinyFluxKontextConfig
from gsstudio_ext.models.lora import load_lora_state_dict, lora_disabled, lora_modules, lora_state_dict
from gsstudio_ext.models.perceptual import TinyPerceptualConfig

SIZE = 32
CAMERAS = 24
TRAIN = [i for i in range(CAMERAS) if i % 4]
"""Training frames of the datasets (every 4th is a test view)."""
INSTRUCTIONS = ["make it red", "[blobs_b] turn it into snow", "make it look like autumn"]


def _blob_scene(seed: int) -> GaussianScene:
    """~600 overlapping coloured blobs in [-0.8, 0.8]^3 (dense enough for depth under most pixels)."""
    scene = GaussianScene.random(600, seed=seed)
    scene.means = scene.means * 0.8
    scene.log_scales = torch.full_like(scene.log_scales, math.log(0.12))
    scene.opacity_logits = torch.full_like(scene.opacity_logits, 2.0)
    return scene


def _write_dataset(root: Path, seed: int) -> np.ndarray:
    """A scene folder: gaussians.ply plus a transforms.json of 24 ring cameras (every 4th a test view)."""
    root.mkdir(parents=True)
    write_ply(root / "gaussians.ply", _blob_scene(seed))
    angles = np.linspace(0.0, 2 * np.pi, CAMERAS, endpoint=False)
    c2w = np.stack([look_at(np.array([3 * np.cos(a), 3 * np.sin(a), 1.2]), np.zeros(3)) for a in angles])
    frames = [{"file_path": f"images/frame_{i:05d}.png", "transform_matrix": c2w[i].tolist()} for i in range(CAMERAS)]
    meta = {
        "camera_model": "OPENCV", "fl_x": 40.0, "fl_y": 40.0, "cx": SIZE / 2, "cy": SIZE / 2, "w": SIZE, "h": SIZE,
        "frames": frames, "train_filenames": [f["file_path"] for i, f in enumerate(frames) if i % 4],
        "test_filenames": [f["file_path"] for i, f in enumerate(frames) if i % 4 == 0],
    }  # fmt: skip
    (root / "transforms.json").write_text(json.dumps(meta))
    return c2w


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    base = tmp_path_factory.mktemp("rl3dedit_train")
    c2w = {name: _write_dataset(base / name, seed) for name, seed in (("blobs_a", 1), ("blobs_b", 2))}
    return {"base": base, "c2w": c2w}


def _source(datasets, rank: int = 0, world: int = 1, seed: int = 0, sets: int = 3) -> SampleSource:
    config = SampleSourceConfig(view_sets_per_scene=sets, view_long_side=SIZE, render_backend="torch", seed=seed)
    scenes = [SceneSpec(datasets["base"] / name / "gaussians.ply") for name in ("blobs_a", "blobs_b")]
    return SampleSource(config, scenes, parse_instructions(INSTRUCTIONS), rank, world)


def _training_config(out: Path, updates: int = 2) -> EditorTrainingConfig:
    grpo = GRPOConfig(group_size=2, steps=2, lr=1e-2, window=WindowConfig(size=1), seed=0)
    reward = RewardConfig(verifier=ReprojectionVerifierConfig(), perceptual=TinyPerceptualConfig())
    return EditorTrainingConfig(
        editor=TinyFluxKontextConfig(), lora_rank=4, lora_alpha=4.0, grpo=grpo, reward=reward, anchor_steps=2,
        updates=updates, save_every=1, output_dir=out, seed=0,
    )  # fmt: skip


# ======================================================================================================================
# samples
# ======================================================================================================================
def test_cameras_are_read_from_transforms_json_and_moved_into_a_run_frame(datasets, tmp_path: Path):
    root = datasets["base"] / "blobs_a"
    c2w = torch.tensor(datasets["c2w"]["blobs_a"], dtype=torch.float32)
    train = read_transforms_cameras(root, "train")
    assert len(train) == len(TRAIN) and train.sizes == [(SIZE, SIZE)] * len(TRAIN)
    assert torch.allclose(train.viewmats, viewmat_from_c2w(c2w[TRAIN]), atol=1e-5)
    assert torch.allclose(train.Ks[0], torch.tensor([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]))
    assert len(read_transforms_cameras(root, "test")) == CAMERAS - len(TRAIN)
    assert len(read_transforms_cameras(root)) == CAMERAS
    # a nerfstudio run: Gaussians live in the dataparser frame (rotate 90 degrees about z, shift, scale by 0.5)
    run = tmp_path / "run"
    (run / "nerfstudio_models").mkdir(parents=True)
    transform = [[0.0, -1.0, 0.0, 0.2], [1.0, 0.0, 0.0, -0.1], [0.0, 0.0, 1.0, 0.3]]
    (run / "dataparser_transforms.json").write_text(json.dumps({"transform": transform, "scale": 0.5}))
    frame = read_run_frame(run / "config.yml")
    assert frame is not None and read_run_frame(root / "gaussians.ply") is None
    moved = to_run_frame(train, frame)
    centres = torch.linalg.inv(moved.viewmats)[:, :3, 3]
    rot, shift = torch.tensor(transform)[:, :3], torch.tensor(transform)[:, 3]
    assert torch.allclose(centres, 0.5 * (c2w[TRAIN, :3, 3] @ rot.T + shift), atol=1e-5)
    assert torch.allclose(moved.c2w[:, :3, :3], rot @ c2w[TRAIN, :3, :3], atol=1e-5)
    # ns-process-data's applied_transform (original -> saved coordinates) is folded into the run's transform: undone
    applied = torch.tensor([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    meta = json.loads((root / "transforms.json").read_text())
    meta["applied_transform"] = applied[:3].tolist()
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    full = (torch.tensor(transform + [[0.0, 0.0, 0.0, 1.0]]) @ applied)[:3]
    (run / "dataparser_transforms.json").write_text(json.dumps({"transform": full.tolist(), "scale": 0.5}))
    processed = to_run_frame(read_transforms_cameras(tmp_path, "train"), read_run_frame(run / "config.yml"))
    assert torch.allclose(processed.viewmats, moved.viewmats, atol=1e-5)
    assert parse_scene_arg("face=a/b.ply") == SceneSpec(Path("a/b.ply"), None, "face")
    assert parse_scene_arg("a/x=1.ply").name is None


def test_sample_source_is_seeded_rank_split_and_renders_the_views(datasets):
    source = _source(datasets)
    names = [s.name for s in source.scenes]
    assert names == ["blobs_a", "blobs_b"]
    sets = [len(s.view_sets) for s in source.scenes]
    assert all(2 <= n <= 3 for n in sets)
    # instruction 1 is scoped to blobs_b: scene a gets 2 instructions per view set, scene b 3
    assert len(source) == 2 * sets[0] + 3 * sets[1]
    assert not any(k.scene == 0 and k.instruction == 1 for k in source.keys)
    again, other_seed = _source(datasets), _source(datasets, seed=1)
    assert again.epoch_keys(0) == source.epoch_keys(0) and again.epoch_keys(1) == source.epoch_keys(1)
    assert source.epoch_keys(0) != source.epoch_keys(1) and sorted(source.epoch_keys(1)) == sorted(source.keys)
    assert other_seed.epoch_keys(0) != source.epoch_keys(0)
    ranks = [_source(datasets, rank=r, world=3) for r in range(3)]
    shares = [r.rank_keys(0) for r in ranks]
    assert sum(len(s) for s in shares) == len(source) and set().union(*map(set, shares)) == set(source.keys)
    assert all(not set(shares[i]) & set(shares[j]) for i in range(3) for j in range(i + 1, 3))
    assert [ranks[1].key_at(p) for p in range(len(shares[1]))] == shares[1]  # the stream walks the rank's share
    # a sample: 9 ring-ordered training cameras rendered at 32 px with depth, cached per view set
    sample = next(source.stream())
    assert sample.key == source.epoch_keys(0)[0]
    assert sample.instruction == source.instructions[sample.key.instruction].text
    views = sample.views
    assert views.images.shape == (9, 3, SIZE, SIZE) and views.depths.shape == (9, SIZE, SIZE)
    assert float((views.depths > 0).float().mean()) > 0.3 and float(views.images.std()) > 0.05
    assert len(set(sample.camera_indices.tolist())) == 9 and int(sample.camera_indices.max()) < len(TRAIN)
    scene = source.scenes[sample.key.scene]
    assert torch.equal(views.viewmats, scene.cameras.viewmats[sample.camera_indices])
    render = render_scene(source.gaussians(sample.key.scene), views.viewmats, views.Ks, SIZE, SIZE, backend="torch")
    assert torch.allclose(render.rgb.permute(0, 3, 1, 2), views.images, atol=1e-6)
    assert source.views(sample.key.scene, sample.key.view_set) is views


# ======================================================================================================================
# training
# ======================================================================================================================
@torch.no_grad()
def _velocity(editor, seed: int = 3) -> torch.Tensor:
    """The editor's velocity on a fixed grid, noise and prompt."""
    gen = torch.Generator().manual_seed(seed)
    cond = editor.encode_image(torch.rand(1, 3, SIZE, SIZE, generator=gen))
    latents = torch.randn(1, *cond.latents.shape[1:], generator=gen)
    return editor.velocity(latents, cond, 0.6, editor.encode_prompt(["make it red"]))


def test_two_updates_write_a_lora_that_changes_the_editor_and_a_log(datasets, tmp_path: Path):
    source = _source(datasets)
    result = train_editor(_training_config(tmp_path / "run"), source)
    lines = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [line["update"] for line in lines] == [1, 2] and len(result.history) == 2
    for line, stats, key in zip(lines, result.history, source.rank_keys(0)):
        assert math.isfinite(line["reward_mean"]) and 0.0 < line["reward_mean"] <= 1.5
        assert line["reward_min"] <= line["reward_mean"] <= line["reward_max"]
        assert math.isfinite(line["anchor"]) and math.isfinite(line["depth"]) and line["pose"] is None
        assert line["ranks"][0]["sample"] == list(key)  # the source's order
        assert line["ranks"][0]["anchor_index"] == anchor_index_of(key, 9, 0)
        assert stats["grad_norm"] > 0
    assert (tmp_path / "run" / "checkpoints" / "lora-000001.safetensors").is_file()
    assert result.lora_path == tmp_path / "run" / "lora.safetensors"
    fresh = TinyFluxKontextConfig().setup().load()
    base = _velocity(fresh)
    loaded = load_lora_state_dict(fresh.transformer, result.lora_path)
    assert loaded == sorted(lora_modules(result.editor.transformer)) and len(loaded) == 17  # 12 double + 5 single
    with_lora = _velocity(fresh)
    trained = _velocity(result.editor)
    with lora_disabled(result.editor.transformer):
        assert torch.allclose(_velocity(result.editor), base, atol=1e-6)  # the base weights were not trained
    change = float((with_lora - base).abs().max())
    print(f"rewards {[round(line['reward_mean'], 4) for line in lines]}; LoRA changes the velocity by {change:.2e}")
    assert change > 1e-4 and torch.allclose(with_lora, trained, atol=1e-6)


def _ddp_worker(rank: int, world: int, base: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        source = _source({"base": Path(base)}, rank=rank, world=world)
        result = train_editor(_training_config(Path(out) / "run", updates=1), source)
        state = lora_state_dict(result.editor.transformer)
        torch.save({"lora": state, "key": list(source.key_at(0)), "history": result.history}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_train_different_samples_into_identical_loras(datasets, tmp_path: Path):
    """Two gloo ranks, one update each on different samples. The processes are forked, not spawned: a spawned child
    re-imports diffusers (about 15 s each here), which would take this file past its one-minute budget."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    args = (2, str(datasets["base"]), str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks: List[dict] = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["key"] != ranks[1]["key"]
    assert ranks[0]["history"][0]["reward_mean"] != ranks[1]["history"][0]["reward_mean"]
    lora = [r["lora"] for r in ranks]
    assert lora[0].keys() == lora[1].keys() and len(lora[0]) == 2 * 17
    moved = max(float(v.abs().max()) for k, v in lora[0].items() if "lora_B" in k)
    assert moved > 0  # B starts at zero: the update moved it
    for name in lora[0]:
        assert torch.equal(lora[0][name], lora[1][name]), name
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["world_size"] == 2
    assert [r["sample"] for r in log[0]["ranks"]] == [ranks[0]["key"], ranks[1]["key"]]
    assert log[0]["reward_mean"] == pytest.approx(np.mean([r["history"][0]["reward_mean"] for r in ranks]))
