"""Datamanager over many scenes: each scene's trained Gaussians, cameras and semantic maps (no training images:
RT-GS2 trains on renders of the Gaussians). The scene shown first (the first unseen one, else the first) is also
exposed as nerfstudio's ``train_dataset`` / ``eval_dataset``, so the viewer draws its cameras and ``ns-render
dataset`` renders its frames; pass ``--data`` a single scene folder to render another one."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion
from nerfstudio.data.datamanagers.base_datamanager import DataManager
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset

from gsstudio_ext.core.checkpoint import load_scene
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.data.multi_scene import (
    SceneEntry,
    SceneViews,
    load_scene_views,
    read_scene_list,
    scene_dataparser_outputs,
    world_frame_parser,
)


@dataclass
class MultiSceneDataManagerConfig(FullImageDatamanagerConfig):
    """Scenes listed in ``data/scenes.json`` (or one dataset folder); see gsstudio_ext/data/multi_scene.py.
    (A FullImageDatamanagerConfig only so that nerfstudio's ns-render accepts it; its image options are unused.)"""

    _target: Type = field(default_factory=lambda: MultiSceneDataManager)
    dataparser: AnnotatedDataParserUnion = field(default_factory=world_frame_parser)
    """Dataparser for every scene's cameras (default: transforms.json in its world frame, as 3DGS .ply files)."""
    downscale: int = 1
    """Integer factor dividing every camera's resolution (semantic maps resized by nearest neighbour)."""
    train_scenes: Tuple[str, ...] = ()
    """Names of the scenes to train on; empty = the scenes whose split is "train"."""
    eval_scenes: Tuple[str, ...] = ()
    """Names of the unseen scenes to evaluate on; empty = the scenes whose split is "unseen"."""
    load_train: bool = True
    """False = load only the unseen scenes (inference and evaluation of a trained model)."""
    max_eval_views: Optional[int] = None
    """At most this many test views per scene in evaluation (evenly spaced); None = all."""


@dataclass
class LoadedScene:
    """One scene in memory: Gaussians on the training device plus the cameras and labels of both splits."""

    entry: SceneEntry
    gaussians: GaussianScene
    train: SceneViews
    test: SceneViews


def _spread(n: int, k: Optional[int]) -> List[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


class MultiSceneDataManager(DataManager):
    """Loads every scene once; hands out (scene, view) indices for training and the eval views per scene."""

    config: MultiSceneDataManagerConfig

    def __init__(
        self,
        config: MultiSceneDataManagerConfig,
        device: str = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        self.config = config
        self.device = device
        self.test_mode = test_mode
        self.world_size, self.local_rank = world_size, local_rank
        if config.data is None:
            raise ValueError("rtgs2-ext needs --data: a folder with scenes.json (or one dataset with gaussians.ply)")
        entries, self.classes = read_scene_list(Path(config.data))
        by_name = {e.name: e for e in entries}
        for name in (*config.train_scenes, *config.eval_scenes):
            if name not in by_name:
                raise ValueError(f"unknown scene {name!r}; {config.data} has {sorted(by_name)}")
        train = [by_name[n] for n in config.train_scenes] or [e for e in entries if e.split == "train"]
        train = train if config.load_train else []
        unseen = [by_name[n] for n in config.eval_scenes] or [e for e in entries if e.split == "unseen"]
        self.scenes: Dict[str, LoadedScene] = {}
        for entry in dict.fromkeys([*train, *unseen]):
            self.scenes[entry.name] = self._load(entry)
        self.train_names = [e.name for e in train]
        self.unseen_names = [e.name for e in unseen if e.name not in self.train_names]
        if not self.scenes:
            raise ValueError(f"{config.data}: no scene to load (check the splits in scenes.json and --*-scenes)")
        self.rng = random.Random(1234 + local_rank)
        shown = self.scenes[(self.unseen_names or self.train_names)[0]].entry
        parser, scale = self.config.dataparser, self.config.downscale
        self.train_dataset = InputDataset(scene_dataparser_outputs(shown, "train", parser, scale))
        self.eval_dataset = InputDataset(scene_dataparser_outputs(shown, "test", parser, scale))
        super().__init__()

    def _load(self, entry: SceneEntry) -> LoadedScene:
        gaussians = load_scene(entry.gaussians).to(self.device)
        train = load_scene_views(entry, "train", self.config.dataparser, self.config.downscale)
        test = load_scene_views(entry, "test", self.config.dataparser, self.config.downscale)
        return LoadedScene(entry, gaussians, train, test)

    # -------------------------------------------------------------- sampling

    def sample_train_views(self, count: int) -> List[Tuple[str, int]]:
        """``count`` random (scene name, train view index) pairs, scenes drawn uniformly."""
        picks = []
        for _ in range(count):
            name = self.rng.choice(self.train_names)
            picks.append((name, self.rng.randrange(len(self.scenes[name].train.stems))))
        return picks

    def eval_views(self, names: List[str]) -> List[Tuple[str, int]]:
        """(scene, test view) pairs of ``names``, at most ``max_eval_views`` per scene."""
        out = []
        for name in names:
            n = len(self.scenes[name].test.stems)
            out.extend((name, i) for i in _spread(n, self.config.max_eval_views))
        return out

    def camera(self, name: str, index: int, split: Literal["train", "test"] = "test") -> Cameras:
        views = getattr(self.scenes[name], split)
        return views.cameras[index : index + 1].to(self.device)

    def labels(self, name: str, index: int, split: Literal["train", "test"] = "test") -> Optional[torch.Tensor]:
        views = getattr(self.scenes[name], split)
        return None if views.semantics is None else views.semantics[index].to(self.device)

    @property
    def fixed_indices_eval_dataloader(self) -> List[Tuple[Cameras, Dict]]:
        """(camera, batch) of every eval view, as nerfstudio's full-image datamanagers list them."""
        views = self.eval_views(self.unseen_names or self.train_names)
        return [(self.camera(n, i), {"scene": n, "index": i, "semantics": self.labels(n, i)}) for n, i in views]

    # -------------------------------------------------------------- nerfstudio DataManager interface

    def setup_train(self) -> None:  # everything is loaded in __init__
        pass

    def setup_eval(self) -> None:
        pass

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        name, index = self.sample_train_views(1)[0]
        return self.camera(name, index, "train"), {"scene": name, "index": index}

    def next_eval(self, step: int) -> Tuple[Cameras, Dict]:
        return self.next_eval_image(step)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        views = self.eval_views(self.unseen_names or self.train_names)
        name, index = views[self.rng.randrange(len(views))]
        return self.camera(name, index), {"scene": name, "index": index, "semantics": self.labels(name, index)}

    def get_train_rays_per_batch(self) -> int:
        cams = self.scenes[(self.train_names or self.unseen_names)[0]].train.cameras
        return int(cams.width[0].item() * cams.height[0].item())

    def get_eval_rays_per_batch(self) -> int:
        return self.get_train_rays_per_batch()

    def get_datapath(self) -> Path:
        return Path(self.config.data)

    def get_param_groups(self) -> Dict[str, List]:
        return {}
