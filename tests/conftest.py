"""Suite-wide fixtures: no network (loopback only), offline hubs, and the default synthetic scene made once."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class NetworkBlocked(OSError):
    """Raised by the socket guard (an OSError, so libraries take their normal offline path)."""


def _is_local(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # unix socket path
        return True
    host = address[0] if isinstance(address, tuple) and address else ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[List[str]]:
    """Refuse every non-loopback connection; fail the test if one was attempted (unless marked network_attempt_ok)."""
    attempts: List[str] = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(original):
        def guarded(self: socket.socket, address: object, *args: object):
            if _is_local(address):
                return original(self, address, *args)
            attempts.append(repr(address))
            raise NetworkBlocked(f"network access attempted in a test: {address!r}")

        return guarded

    monkeypatch.setattr(socket.socket, "connect", guard(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(connect_ex))
    yield attempts
    if attempts and request.node.get_closest_marker("network_attempt_ok") is None:
        pytest.fail(f"test tried to reach the network: {attempts}")


@pytest.fixture(scope="session")
def default_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default synthetic scene (gs-synth defaults, seed 0), generated once per session."""
    from gsstudio_ext.data.synthetic import generate_scene
    from gsstudio_ext.data.synthetic.config import SynthConfig

    return generate_scene(tmp_path_factory.mktemp("default_scene") / "scene", SynthConfig())


AG2_STEPS = 200


@pytest.fixture(scope="session")
def ag2_run(default_scene: Path, tmp_path_factory: pytest.TempPathFactory):
    """(trainer, config.yml) of ag2aussian-ext trained 200 CPU steps on a copy of the default scene with label
    embeddings (GT masks + object names through MiniLM); shared by the method, CLI and viewer tests. Tests that
    change the model's query state must restore it."""
    import shutil

    from gsstudio_ext.data.embedding_sources import LabelEmbeddingConfig
    from gsstudio_ext.data.mask_sources import SidecarMaskSourceConfig
    from gsstudio_ext.data.preprocess import preprocess_dataset
    from gsstudio_ext.methods.ag2aussian.config import SHORT_SCHEDULE, ag2_trainer_config
    from gsstudio_ext.methods.ag2aussian.model import AG2ModelConfig
    from gsstudio_ext.methods.base.training import prepare_config, train

    scene = tmp_path_factory.mktemp("ag2_scene") / "scene"
    shutil.copytree(default_scene, scene)
    preprocess_dataset(scene, SidecarMaskSourceConfig(), LabelEmbeddingConfig(), progress=False)
    model = AG2ModelConfig(**SHORT_SCHEDULE, densify_until=AG2_STEPS - 50)
    config = ag2_trainer_config(model, max_steps=AG2_STEPS)
    config.pipeline.datamanager.sidecars = ("instances", "embeddings")
    config = prepare_config(config, scene, tmp_path_factory.mktemp("ag2"), max_steps=AG2_STEPS, device="cpu")
    return train(config)


REFER_STEPS = 250
REFER_HELD_OUT = ("paraphrase", "left_right", "front_behind")


@pytest.fixture(scope="session")
def refer_run(ag2_run, tmp_path_factory: pytest.TempPathFactory):
    """(trainer, config.yml) of referspat-ext trained on the frozen ``ag2_run`` scene (its checkpoint) with
    paraphrases and spatial expressions held out of training; shared by the method, CLI and viewer tests. Tests that
    change the model's query state must restore it."""
    from gsstudio_ext.methods.base.training import prepare_config, train
    from gsstudio_ext.methods.referspat.config import SHORT_LRS, SHORT_SCHEDULE, refer_trainer_config
    from gsstudio_ext.methods.referspat.model import ReferModelConfig

    _, ag2_config = ag2_run
    model = ReferModelConfig(scene=ag2_config, held_out_kinds=REFER_HELD_OUT, **SHORT_SCHEDULE)
    config = refer_trainer_config(model, max_steps=REFER_STEPS, **SHORT_LRS)
    data = ag2_run[0].pipeline.datamanager.config.data
    config = prepare_config(config, data, tmp_path_factory.mktemp("refer"), max_steps=REFER_STEPS, device="cpu")
    return train(config)


@pytest.fixture(scope="session")
def rtgs2_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """26 generated 64x64 scenes sharing the class list (24 train, 2 unseen), each with gaussians.ply fused from its
    RGB-D train views; 24 views per scene, every 4th a test view. With 8 train scenes (about four random-coloured
    instances per class) the unseen-scene mIoU varied from 0.45 to 0.54 between runs; 24 give 0.64."""
    from gsstudio_ext.data.synthetic import SynthConfig, generate_scenes

    config = SynthConfig(seed=7, width=64, height=64, num_views=24, eval_every=4, fuse_gaussians=True)
    out = tmp_path_factory.mktemp("rtgs2_scenes") / "set"
    generate_scenes(out, config, num_scenes=26, unseen_fraction=2 / 26)
    return out


class BackgroundRun:
    """A training script started in a process of its own; ``metrics()`` waits for it and reads its metrics.json."""

    def __init__(self, script: Path, data: Path, out: Path) -> None:
        self.out, self.log = out, out / "log.txt"
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log.open("w") as log:
            command = [sys.executable, str(script), str(data), str(out)]
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def metrics(self) -> dict:
        if self.process.wait() != 0:
            raise RuntimeError(f"{self.process.args} failed:\n{self.log.read_text()[-4000:]}")
        return json.loads((self.out / "metrics.json").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def rtgs2_rgb_ablation(rtgs2_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundRun]:
    """The RGB-only ablation of ``rtgs2_run`` (the same network and Stage-B schedule, feature input zeroed), trained
    in a background process started before ``rtgs2_run`` so the two trainings share the machine's cores."""
    run = BackgroundRun(Path(__file__).parent / "rtgs2_tiny.py", rtgs2_scenes, tmp_path_factory.mktemp("rtgs2_rgb"))
    yield run
    run.stop()


@pytest.fixture(scope="session")
def rtgs2_run(rtgs2_scenes: Path, rtgs2_rgb_ablation: BackgroundRun, tmp_path_factory: pytest.TempPathFactory):
    """(trainer, config.yml) of rtgs2-ext trained on the train scenes of ``rtgs2_scenes``: Stage A then Stage B with
    the real EfficientNet-Lite0 RGB encoder and tiny backbone / feature branch. Tests that change the model's scene,
    class filter or colouring must restore them."""
    from rtgs2_tiny import train_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with the ablation alongside, more threads oversubscribe the cores (3x slower steps)
    try:
        return train_tiny(rtgs2_scenes, tmp_path_factory.mktemp("rtgs2"), use_features=True)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def romap_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated 64x64 mushroom (parts "stem" and "cap") with part sidecars and a gaussians.ply fused from its
    RGB-D train views; 24 views, every 4th a test view."""
    from gsstudio_ext.data.synthetic import SynthConfig, generate_scene

    config = SynthConfig(
        seed=1, width=64, height=64, num_objects=1, min_repeated_classes=0, num_views=24, eval_every=4,
        fuse_gaussians=True,
    )  # fmt: skip
    return generate_scene(tmp_path_factory.mktemp("romap") / "mushroom", config)


ROMAP_GALP_STEPS = 450
ROMAP_EDIT_STEPS = 150


@pytest.fixture(scope="session")
def romap_run(romap_scene: Path, tmp_path_factory: pytest.TempPathFactory):
    """(trainer, config.yml) of romap-ext on ``romap_scene``: 3D-GALP from the clean part sidecars, then the cap
    edited to blue with the procedural provider. ns-eval uses a tiny random CLIP (no weights offline)."""
    from gsstudio_ext.data.multi_scene import world_frame_parser
    from gsstudio_ext.methods.base.training import prepare_config, train
    from gsstudio_ext.methods.romap.config import romap_trainer_config
    from gsstudio_ext.methods.romap.model import RoMaPModelConfig
    from gsstudio_ext.methods.romap.part_editor import PartEditorConfig
    from gsstudio_ext.models.image_text import TinyImageTextConfig

    editor = PartEditorConfig(parts=("stem", "cap"), base_prompt="a photo of a mushroom", part_source="sidecar")
    editor.galp.steps, editor.galp.lr_dc = ROMAP_GALP_STEPS, 0.025  # as 600 steps at 0.0125
    editor.galp.num_anchors, editor.galp.k = 100, 5  # K=1000, k=50 are for 100k+ Gaussians: here they smear parts
    editor.edit.steps = ROMAP_EDIT_STEPS
    model = RoMaPModelConfig(scene=romap_scene / "gaussians.ply", editor=editor)
    config = romap_trainer_config(model)
    config.pipeline.datamanager.dataparser = world_frame_parser()
    config.pipeline.edit_part, config.pipeline.edit_prompt = "cap", "blue"
    config.pipeline.edit_eval.clip = TinyImageTextConfig()
    config = prepare_config(config, romap_scene, tmp_path_factory.mktemp("romap_run"), ROMAP_GALP_STEPS, "cpu")
    return train(config)


RL3DEDIT_REFIT_STEPS = 200


@pytest.fixture(scope="session")
def rl3dedit_run(romap_scene: Path, tmp_path_factory: pytest.TempPathFactory):
    """(trainer, config.yml) of rl3dedit-ext on the fused mushroom of ``romap_scene``, cropped to the mushroom (~3.6k
    Gaussians): 9 views painted "blue" by the offline procedural editor, then the refit (the SH lr x 10 lets a
    recolour travel in 200 steps as far as in 3000 at 3DGS's lr). ns-eval uses a tiny random CLIP."""
    import json

    from gsstudio_ext.core.ply import read_ply, write_ply
    from gsstudio_ext.data.multi_scene import world_frame_parser
    from gsstudio_ext.methods.base.training import prepare_config, train
    from gsstudio_ext.methods.rl3dedit.config import rl3dedit_trainer_config
    from gsstudio_ext.methods.rl3dedit.model import RL3DEditModelConfig
    from gsstudio_ext.models.image_text import TinyImageTextConfig

    out = tmp_path_factory.mktemp("rl3dedit_run")
    scene = read_ply(romap_scene / "gaussians.ply")
    (obj,) = json.loads((romap_scene / "sidecars" / "scene.json").read_text())["objects"]
    write_ply(out / "mushroom.ply", scene.subset((scene.means - torch.tensor(obj["center"])).norm(dim=-1) < 0.06))
    model = RL3DEditModelConfig(scene=out / "mushroom.ply", instruction="blue")
    model.edit.editor = "procedural"
    refit = model.edit.refit
    refit.feature_lr, refit.feature_rest_lr = 2.5e-2, 2.5e-2 / 20
    refit.densify_from, refit.densify_every = 100, 100
    config = rl3dedit_trainer_config(model)
    config.pipeline.datamanager.dataparser = world_frame_parser()
    config.pipeline.edit_eval.clip = TinyImageTextConfig()
    steps = RL3DEDIT_REFIT_STEPS
    config = prepare_config(config, romap_scene, out, steps, "cpu")
    return train(config)
