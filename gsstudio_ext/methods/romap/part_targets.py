"""2D part targets A(C^phi) Float[3, H, W] that 3D-GALP aligns the rendered label maps to (editing-methods.md §2.3).

- :func:`compose_part_target`: the spec's post-processing of raw per-part attention maps (step 5) into one
  prototype-coloured target. The maps themselves come from the SD3 attention extractor (another module).
- :class:`PartTargetSource`: gives the target of each training view. :class:`SidecarPartTargets` builds them from a
  dataset's ground-truth part maps (``sidecars/parts``), optionally corrupted by a seeded noise model, so Stage A can
  be tested and studied without SD3.

Noise model of :class:`SidecarPartTargets` (draws from ``numpy.random.default_rng([seed, view_index, 0])`` for the
morphology and ``[seed, view_index, 1]`` for the flips, so a view's targets depend only on the seed and the view,
never on the call order, and ``boundary_px`` does not change which views flip):

1. per part, in seg-list order: an erosion or a dilation (each with probability 1/2) with a square structuring
   element of radius r drawn uniformly from 0..``boundary_px`` (r = 0 leaves the mask unchanged);
2. with probability ``flip_prob`` (and at least two parts), two distinct parts drawn uniformly have their (already
   eroded/dilated) masks swapped for the whole view, as an attention map attending to the wrong word would;
3. the masks are made exclusive in seg-list order (an earlier part wins) and coloured with the prototypes.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from gsstudio_ext.core.masks import dilate_mask, erode_mask
from gsstudio_ext.core.metrics import resize_nearest
from gsstudio_ext.data import layout
from gsstudio_ext.data.sidecars import read_parts, read_scene_meta
from gsstudio_ext.methods.romap.labels import part_prototypes

Refiner = Callable[[Tensor, Optional[Tensor]], Tensor]
"""``refine(map Float[H, W], rgb Float[3, H, W] or None) -> Float[H, W]`` (CascadePSP in the official code)."""

EXCLUSIVE_SUM = 0.5
"""Exclusivity: a pixel whose running target colour sum is above this is taken by an earlier part (code value)."""


def minmax(x: Tensor, eps: float = 1e-12) -> Tensor:
    """(x - min) / (max - min) over the whole tensor; a constant tensor maps to zeros."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(eps)


def compose_part_target(
    maps: Tensor,
    temperatures: Sequence[float],
    prototypes: Tensor,
    size: Optional[Tuple[int, int]] = None,
    refine: Optional[Refiner] = None,
    rgb: Optional[Tensor] = None,
) -> Tensor:
    """The part target A(C^phi) Float[3, H, W] in [0, 1] from raw part maps Float[P, h, w] (§2.3 step 5).

    Per part j in list order: bilinear upsample to ``size`` (H, W; default the maps' size), min-max, softmax over all
    pixels of a / tau_j, min-max, ``refine(map, rgb)`` then min-max (skipped when ``refine`` is None: identity,
    as CascadePSP is not available offline), zero the pixels whose running colour sum is already > 0.5, multiply by
    l_j and add. The sum is min-max normalised at the end. prototypes: Float[P+1, 3] (row 0 background) or [P, 3].
    """
    num = maps.shape[0]
    if len(temperatures) != num:
        raise ValueError(f"{num} part maps need {num} temperatures; got {len(temperatures)}")
    if prototypes.shape[0] == num + 1:
        prototypes = prototypes[1:]
    if prototypes.shape != (num, 3):
        raise ValueError(f"prototypes must be [P+1, 3] or [P, 3] for P={num}; got {list(prototypes.shape)}")
    h, w = size if size is not None else tuple(maps.shape[-2:])
    up = F.interpolate(maps[None].float(), size=(int(h), int(w)), mode="bilinear", align_corners=False)[0]
    target = up.new_zeros(3, int(h), int(w))
    for j in range(num):
        a = minmax(up[j])
        a = torch.softmax(a.reshape(-1) / float(temperatures[j]), dim=0).reshape(a.shape)
        a = minmax(a)
        if refine is not None:
            a = minmax(refine(a, rgb))
        a = torch.where(target.sum(dim=0) > EXCLUSIVE_SUM, torch.zeros_like(a), a)
        target = target + a[None] * prototypes[j].to(a)[:, None, None]
    return minmax(target)


def exclusive_labels(masks: Tensor) -> Tensor:
    """Bool[P, H, W] -> Long[H, W]: 1 + the first part (list order) whose mask holds the pixel, 0 for none."""
    label = torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)
    for j in range(masks.shape[0]):
        label = torch.where((label == 0) & masks[j], torch.full_like(label, j + 1), label)
    return label


# ======================================================================================================================
# sources
# ======================================================================================================================
@dataclass
class PartTargetSourceConfig(InstantiateConfig):
    """Base config of a part-target source."""

    _target: Type = field(default_factory=lambda: PartTargetSource)
    seg_list: Tuple[Tuple[str, ...], ...] = ()
    """Parts to segment, each a list of words, smaller parts first (exclusive in list order), e.g. (("nose",),)."""
    prototype_seed: int = 0
    """Seed of the random prototype colours of parts after the sixth."""


class PartTargetSource(ABC):
    """Gives the 2D part target of each training view, in the order of the cameras handed to Stage A."""

    def __init__(self, config: PartTargetSourceConfig) -> None:
        self.config = config

    @property
    def num_parts(self) -> int:
        """Number of parts P (= len(seg_list))."""
        return len(self.config.seg_list)

    @property
    def prototypes(self) -> Tensor:
        """Prototype colours Float[P+1, 3] (row 0 background black)."""
        return part_prototypes(self.num_parts, self.config.prototype_seed)

    @property
    @abstractmethod
    def num_views(self) -> int:
        """Number of views V that :meth:`targets` accepts (indices 0..V-1)."""

    @abstractmethod
    def targets(self, view_index: int) -> Tensor:
        """The target A(C^phi) Float[3, H, W] in [0, 1] of one view (black = background)."""


@dataclass
class SidecarPartTargetsConfig(PartTargetSourceConfig):
    """Part targets from a dataset's ground-truth part maps, with the noise model of the module docstring."""

    _target: Type = field(default_factory=lambda: SidecarPartTargets)
    dataset: Path = Path(".")
    """Dataset folder holding transforms.json (for the split lists) and sidecars/ (scene.json, parts/)."""
    split: Literal["train", "test", "all"] = "train"
    """Views: transforms.json's train_filenames / test_filenames, or every frame; ignored when ``stems`` is set."""
    stems: Optional[Tuple[str, ...]] = None
    """Explicit image stems (sidecar keys) in camera order; None = the ``split``'s frames in transforms.json order."""
    object_name: Optional[str] = None
    """Only parts of the object with this scene.json name (e.g. "blue mushroom"); None = parts of every object."""
    size: Optional[Tuple[int, int]] = None
    """Output (height, width), nearest-resized; None = the part maps' size."""
    noise: bool = True
    """Apply the noise model to :meth:`SidecarPartTargets.targets` (ground-truth labels are always clean)."""
    boundary_px: int = 2
    """Noise: largest erosion / dilation radius in pixels, per view and part."""
    flip_prob: float = 0.2
    """Noise: probability per view that two parts swap labels over the whole view."""
    seed: int = 0
    """Noise seed."""


class SidecarPartTargets(PartTargetSource):
    """Targets and ground-truth part-index maps from ``sidecars/parts`` (see the module docstring for the noise)."""

    config: SidecarPartTargetsConfig

    def __init__(self, config: SidecarPartTargetsConfig) -> None:
        super().__init__(config)
        if not config.seg_list:
            raise ValueError("seg_list is empty: name at least one part (a list of words)")
        if config.boundary_px < 0 or not 0.0 <= config.flip_prob <= 1.0:
            raise ValueError(
                f"need boundary_px >= 0 and flip_prob in [0, 1]; got {config.boundary_px}, {config.flip_prob}"
            )
        root = Path(config.dataset)
        self.root = root
        self.stems: List[str] = list(config.stems) if config.stems is not None else _split_stems(root, config.split)
        self.part_ids: List[List[int]] = _match_parts(read_scene_meta(root), config.seg_list, config.object_name)
        self._clean: Dict[int, Tensor] = {}

    @property
    def num_views(self) -> int:
        return len(self.stems)

    def _masks(self, view_index: int) -> Tensor:
        """Clean, possibly overlapping part masks Bool[P, H, W] of one view."""
        if view_index not in self._clean:
            ids = torch.from_numpy(read_parts(layout.part_path(self.root, self.stems[view_index])))
            if self.config.size is not None:
                ids = resize_nearest(ids, self.config.size)
            masks = [torch.isin(ids, torch.tensor(p, dtype=ids.dtype)) for p in self.part_ids]
            self._clean[view_index] = torch.stack(masks)
        return self._clean[view_index]

    def gt_labels(self, view_index: int) -> Tensor:
        """Clean part-index map Long[H, W] (1..P in seg-list order, exclusive in list order; 0 = no listed part)."""
        return exclusive_labels(self._masks(view_index))

    def noisy_labels(self, view_index: int) -> Tensor:
        """Part-index map Long[H, W] after the noise model (the clean map when ``noise`` is False)."""
        masks = self._masks(view_index)
        if not self.config.noise:
            return exclusive_labels(masks)
        seed, view = int(self.config.seed), int(view_index)
        morph_rng = np.random.default_rng([seed, view, 0])
        noisy = []
        for mask in masks:
            dilating = bool(morph_rng.random() < 0.5)
            radius = int(np.floor(morph_rng.random() * (self.config.boundary_px + 1)))
            noisy.append(dilate_mask(mask, radius) if dilating else erode_mask(mask, radius))
        flip_rng = np.random.default_rng([seed, view, 1])  # own stream: boundary_px does not change the flips
        flip = bool(flip_rng.random() < self.config.flip_prob)
        pair = flip_rng.permutation(len(noisy))[:2]
        if flip and len(noisy) >= 2:
            i, j = int(pair[0]), int(pair[1])
            noisy[i], noisy[j] = noisy[j], noisy[i]
        return exclusive_labels(torch.stack(noisy))

    def targets(self, view_index: int) -> Tensor:
        """Prototype colours of :meth:`noisy_labels`, Float[3, H, W]."""
        return self.prototypes[self.noisy_labels(view_index)].permute(2, 0, 1).contiguous()


def _split_stems(root: Path, split: str) -> List[str]:
    path = root / "transforms.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the dataset folder or explicit stems")
    meta = json.loads(path.read_text())
    if split == "all":
        files = [f["file_path"] for f in meta["frames"]]
    else:
        key = f"{split}_filenames"
        files = meta.get(key)
        if files is None:
            if split == "test":
                raise ValueError(f"{path} has no test_filenames; pass explicit stems")
            files = [f["file_path"] for f in meta["frames"]]
    return [Path(f).stem for f in files]


def _match_parts(meta: dict, seg_list: Sequence[Sequence[str]], object_name: Optional[str]) -> List[List[int]]:
    """For each seg-list entry, the scene.json part ids whose name is one of its words (optionally of one object)."""
    parts = meta.get("parts", [])
    if object_name is not None:
        objects = [o for o in meta.get("objects", []) if o.get("name") == object_name]
        if not objects:
            names = sorted(o.get("name") for o in meta.get("objects", []))
            raise ValueError(f"no object named {object_name!r} in scene.json; objects: {names}")
        parts = [p for p in parts if p["object_id"] == objects[0]["id"]]
    matched = []
    for words in seg_list:
        ids = [int(p["id"]) for p in parts if p["name"] in set(words)]
        if not ids:
            names = sorted({p["name"] for p in parts})
            raise ValueError(f"seg_list entry {list(words)} matches no part; available part names: {names}")
        matched.append(ids)
    return matched
