"""Training samples of the RL3DEdit editor (spec §3.2, §3.6): one sample = a scene, M = 9 of its cameras rendered
to images + depth (a :class:`~gsstudio_ext.methods.rl3dedit.geometry.ViewSet`) and one instruction.

The paper trains on 70 (scene, instruction) pairs with 18-23 sets of 9 views each (1,319 samples, one epoch) [P].
Here [I]:

- scenes are trained Gaussians (anything :func:`~gsstudio_ext.core.checkpoint.load_scene` reads) with the cameras of
  their dataset's ``transforms.json`` (found next to the scene or given), moved into a nerfstudio run's frame when the
  scene is a run (:mod:`gsstudio_ext.data.transforms_cameras`);
- view set 0 of a scene is :func:`~gsstudio_ext.methods.rl3dedit.views.select_views` on all its cameras; set k > 0
  the same on a seeded random subset (``subset_fraction``) of them, which varies the ring phase and the covered
  cameras; identical sets are dropped;
- instructions come from a text file, one per line; ``[name, other] text`` limits a line to the named scenes (the
  paper's instructions are scene-specific: a face edit does not apply to a bicycle);
- an epoch is every (scene, view set, instruction) triple in a seeded shuffle (a new shuffle per epoch); rank r of w
  takes the entries r, r + w, r + 2w ... of the concatenated epochs, so the ranks' samples are disjoint;
- the 9 views are rendered at a common size (the first view's aspect ratio, longest side ``view_long_side``) with
  scaled intrinsics; renders are cached per (scene, view set) and a few loaded scenes are kept in memory.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from gsstudio_ext.core.checkpoint import load_scene
from gsstudio_ext.core.scene import GaussianScene
from gsstudio_ext.core.scene_render import render_scene
from gsstudio_ext.data.transforms_cameras import (
    DatasetCameras,
    Split,
    find_transforms,
    read_run_frame,
    read_transforms_cameras,
    to_run_frame,
)
from gsstudio_ext.methods.rl3dedit.geometry import ViewSet
from gsstudio_ext.methods.rl3dedit.views import NUM_VIEWS, CaptureKind, scale_intrinsics, select_views

_SCOPE = re.compile(r"^\[([^\]]*)\]\s*(.*)$")


# ======================================================================================================================
# inputs: scenes and instructions
# ======================================================================================================================
@dataclass(frozen=True)
class SceneSpec:
    """One training scene: trained Gaussians and where its cameras are."""

    path: Path
    """A .ply, a nerfstudio run folder, its config.yml or a .ckpt (anything ``load_scene`` reads)."""
    transforms: Optional[Path] = None
    """The dataset's transforms.json (or its folder); None = the nearest one in the scene's folder or its parents."""
    name: Optional[str] = None
    """Name used by scene-scoped instructions; None = the dataset folder's name (else the scene file's stem)."""


def parse_scene_arg(text: str, transforms: Optional[Path] = None) -> SceneSpec:
    """``path`` or ``name=path`` (a name has no path separator) -> :class:`SceneSpec`."""
    name, sep, rest = str(text).partition("=")
    if sep and name and "/" not in name and "\\" not in name:
        return SceneSpec(Path(rest), transforms, name)
    return SceneSpec(Path(text), transforms)


@dataclass(frozen=True)
class Instruction:
    """An editing instruction, for every scene or for the named ones."""

    text: str
    scenes: Optional[Tuple[str, ...]] = None
    """Scene names it applies to; None = every scene."""

    def applies_to(self, scene_name: str) -> bool:
        return self.scenes is None or scene_name in self.scenes


def parse_instructions(lines: Sequence[str]) -> List[Instruction]:
    """One instruction per line; blank lines and ``#`` comments are skipped; ``[a, b] text`` scopes a line to the
    scenes named a and b."""
    out = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        scoped = _SCOPE.match(line)
        if scoped:
            names = tuple(n.strip() for n in scoped.group(1).split(",") if n.strip())
            text = scoped.group(2).strip()
            if not names or not text:
                raise ValueError(f"instruction line {number}: '[scene, ...] text' needs scene names and a text")
            out.append(Instruction(text, names))
        else:
            out.append(Instruction(line))
    return out


def read_instructions(path: Union[str, Path]) -> List[Instruction]:
    """:func:`parse_instructions` of a UTF-8 text file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line, or no instruction at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {path} does not exist (one instruction per line)")
    found = parse_instructions(path.read_text(encoding="utf-8").splitlines())
    if not found:
        raise ValueError(f"{path} holds no instructions (one per line; '#' starts a comment)")
    return found


# ======================================================================================================================
# samples
# ======================================================================================================================
class SampleKey(NamedTuple):
    """Stable identity of a sample: indices of its scene, view set (within the scene) and instruction."""

    scene: int
    view_set: int
    instruction: int


@dataclass
class TrainingSample:
    """What one GRPO iteration edits."""

    key: SampleKey
    scene_name: str
    instruction: str
    """The user instruction (not yet rephrased for the grid)."""
    views: ViewSet
    """The M source views: renders, expected depth (0 where unknown), OpenCV cameras, intrinsics at the render size."""
    camera_indices: Tensor
    """Long[M] indices into the scene's cameras (the chosen split's frames)."""


@dataclass
class SampleSourceConfig:
    """How samples are drawn and rendered. [P] paper, [I] our choice."""

    num_views: int = NUM_VIEWS
    """Views per sample, M (9: one 3x3 grid) [P]."""
    view_sets_per_scene: int = 20
    """View sets drawn per scene before duplicates are dropped [P: 18-23 sets of 9 views per scene; I: 20]."""
    subset_fraction: float = 0.5
    """Share of a scene's cameras that view sets k > 0 choose from (a seeded random subset) [I]."""
    capture: CaptureKind = "auto"
    """Capture kind for the view selection: auto, 360 or forward (views.select_views) [I]."""
    split: Split = "train"
    """transforms.json frames to use (its train_filenames; every frame when it has no such list) [I]."""
    view_long_side: int = 341
    """Render size: the longest side of each view in pixels, the other from the first view's aspect ratio [I: a
    1024 x 1024 grid cell, 1024 // 3]."""
    alpha_min: float = 0.5
    """Pixels whose rendered opacity is below this get depth 0 (unknown) in the view set [I]."""
    background: Optional[Tuple[float, float, float]] = None
    """RGB composited behind the Gaussians; None = black (render_scene's default) [I]."""
    scenes_in_memory: int = 2
    """Loaded Gaussian scenes kept (least recently used dropped) [I]."""
    cache_renders: bool = True
    """Keep every rendered view set in (CPU) memory: each rank renders only its own samples' sets [I]."""
    render_backend: str = "auto"
    """Rasterizer backend: auto (gsplat on CUDA, the torch one on CPU), gsplat or torch."""
    seed: int = 0
    """Seed of the view subsets and the per-epoch shuffles."""


@dataclass
class _Scene:
    spec: SceneSpec
    name: str
    cameras: DatasetCameras
    view_sets: List[Tensor]


def _scene_name(spec: SceneSpec, transforms: Path) -> str:
    if spec.name:
        return spec.name
    return transforms.parent.name or spec.path.stem


def _view_sets(cameras: DatasetCameras, config: SampleSourceConfig, scene_index: int) -> List[Tensor]:
    """Distinct Long[M] view selections: all cameras, then seeded random subsets."""
    total = len(cameras)
    sets: List[Tensor] = []
    seen = set()
    for k in range(max(1, config.view_sets_per_scene)):
        if k == 0:
            pool = torch.arange(total)
        else:
            rng = np.random.default_rng([config.seed, scene_index, k])
            size = min(total, max(config.num_views, int(round(config.subset_fraction * total))))
            pool = torch.from_numpy(np.sort(rng.choice(total, size=size, replace=False))).long()
        chosen = pool[select_views(cameras.viewmats[pool], config.num_views, config.capture)]
        signature = tuple(chosen.tolist())
        if signature not in seen:
            seen.add(signature)
            sets.append(chosen)
    return sets


def render_size(size: Tuple[int, int], long_side: int) -> Tuple[int, int]:
    """(width, height) with the aspect ratio of ``size`` = (w, h) and the longest side ``long_side``."""
    w, h = size
    if w >= h:
        return long_side, max(1, round(long_side * h / w))
    return max(1, round(long_side * w / h)), long_side


class SampleSource:
    """Deterministic, rank-aware stream of :class:`TrainingSample` (see the module docstring)."""

    def __init__(
        self,
        config: SampleSourceConfig,
        scenes: Sequence[SceneSpec],
        instructions: Sequence[Union[Instruction, str]],
        rank: int = 0,
        world_size: int = 1,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        if not scenes:
            raise ValueError("no training scenes given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if config.num_views < 1 or config.view_long_side < 1:
            raise ValueError("num_views and view_long_side must be >= 1")
        self.config = config
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.instructions = [Instruction(i) if isinstance(i, str) else i for i in instructions]
        if not self.instructions:
            raise ValueError("no instructions given")
        self.scenes = [self._read_scene(i, spec) for i, spec in enumerate(scenes)]
        names = [s.name for s in self.scenes]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"several scenes are named {duplicated}; name them explicitly (name=path)")
        for inst in self.instructions:
            unknown = sorted(set(inst.scenes or ()) - set(names))
            if unknown:
                raise ValueError(f"instruction {inst.text!r} names unknown scenes {unknown}; scenes: {names}")
        self.keys: List[SampleKey] = [
            SampleKey(s, v, j)
            for s, scene in enumerate(self.scenes)
            for v in range(len(scene.view_sets))
            for j, inst in enumerate(self.instructions)
            if inst.applies_to(scene.name)
        ]
        if not self.keys:
            raise ValueError("no (scene, instruction) pair: every instruction is scoped to other scenes")
        self._orders: Dict[int, List[int]] = {}
        self._gaussians: "OrderedDict[int, GaussianScene]" = OrderedDict()
        self._renders: Dict[Tuple[int, int], ViewSet] = {}

    # ---- set-up ------------------------------------------------------------------------------------------------------
    def _read_scene(self, index: int, spec: SceneSpec) -> _Scene:
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"scene {path} does not exist (a .ply, a nerfstudio run or a .ckpt)")
        transforms = Path(spec.transforms).expanduser() if spec.transforms is not None else find_transforms(path)
        if transforms is None:
            raise FileNotFoundError(
                f"no transforms.json next to scene {path} or in its parent folders; give the dataset's cameras "
                "explicitly (--transforms)"
            )
        cameras = read_transforms_cameras(transforms, self.config.split)
        cameras = to_run_frame(cameras, read_run_frame(path))
        return _Scene(spec, _scene_name(spec, cameras.source), cameras, _view_sets(cameras, self.config, index))

    # ---- order -------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Samples per epoch (all ranks together)."""
        return len(self.keys)

    @property
    def updates_per_epoch(self) -> int:
        """Samples one rank sees per epoch, rounded up (every rank runs this many so they stay in step)."""
        return math.ceil(len(self.keys) / self.world_size)

    def epoch_keys(self, epoch: int) -> List[SampleKey]:
        """Every sample of ``epoch`` in its seeded shuffle (the same on every rank)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.config.seed, 7919, int(epoch)])
            self._orders = {epoch: rng.permutation(len(self.keys)).tolist()}  # keep only the current epoch
        return [self.keys[i] for i in self._orders[epoch]]

    def rank_keys(self, epoch: int) -> List[SampleKey]:
        """This rank's share of ``epoch`` (when the epoch length is a multiple of the world size; otherwise the
        stream carries the remainder into the next epoch)."""
        return self.epoch_keys(epoch)[self.rank :: self.world_size]

    def key_at(self, position: int) -> SampleKey:
        """The sample at ``position`` of this rank's stream (positions rank, rank + w, ... of the concatenated
        epochs)."""
        flat = self.rank + int(position) * self.world_size
        epoch, index = divmod(flat, len(self.keys))
        return self.epoch_keys(epoch)[index]

    def stream(self, start: int = 0) -> Iterator[TrainingSample]:
        """This rank's samples from ``start`` on, without end."""
        position = int(start)
        while True:
            yield self.sample(self.key_at(position))
            position += 1

    # ---- content -----------------------------------------------------------------------------------------------------
    def scene_name(self, key: SampleKey) -> str:
        return self.scenes[key.scene].name

    def sample(self, key: SampleKey) -> TrainingSample:
        scene = self.scenes[key.scene]
        return TrainingSample(
            key=key,
            scene_name=scene.name,
            instruction=self.instructions[key.instruction].text,
            views=self.views(key.scene, key.view_set),
            camera_indices=scene.view_sets[key.view_set].clone(),
        )

    def gaussians(self, scene_index: int) -> GaussianScene:
        """The loaded scene (kept in a small least-recently-used cache)."""
        if scene_index in self._gaussians:
            self._gaussians.move_to_end(scene_index)
            return self._gaussians[scene_index]
        scene = load_scene(self.scenes[scene_index].spec.path).to(self.device)
        self._gaussians[scene_index] = scene
        while len(self._gaussians) > max(1, self.config.scenes_in_memory):
            self._gaussians.popitem(last=False)
        return scene

    @torch.no_grad()
    def views(self, scene_index: int, view_set: int) -> ViewSet:
        """The rendered view set (CPU tensors; cached with ``cache_renders``)."""
        cached = self._renders.get((scene_index, view_set))
        if cached is not None:
            return cached
        c = self.config
        scene = self.scenes[scene_index]
        chosen = scene.view_sets[view_set]
        width, height = render_size(scene.cameras.sizes[int(chosen[0])], c.view_long_side)
        Ks = torch.stack(
            [scale_intrinsics(scene.cameras.Ks[i], scene.cameras.sizes[i], (width, height)) for i in chosen.tolist()]
        )
        viewmats = scene.cameras.viewmats[chosen]
        background = None if c.background is None else torch.tensor(c.background, device=self.device)
        out = render_scene(
            self.gaussians(scene_index), viewmats.to(self.device), Ks.to(self.device), width, height,
            background=background, backend=c.render_backend, depth=True,
        )  # fmt: skip
        depth = torch.where(out.alpha[..., 0] >= c.alpha_min, out.depth[..., 0], torch.zeros_like(out.depth[..., 0]))
        views = ViewSet(out.rgb.permute(0, 3, 1, 2).contiguous().float().cpu(), depth.float().cpu(), viewmats, Ks)
        if c.cache_renders:
            self._renders[(scene_index, view_set)] = views
        return views
