"""Full-image datamanager that validates and delivers dataset sidecars, with editable training images and
evaluation on named frames.

Works with any nerfstudio dataparser whose outputs list image filenames; the dataset root (where ``sidecars/``
lives) is the dataparser's ``data`` folder, or the folder of ``data`` when it points at a ``transforms.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from torch import Tensor

from gsstudio_ext.data.sidecar_dataset import SIDECAR_BATCH_KEYS, SidecarDataset
from gsstudio_ext.data.validate import SIDECAR_KINDS, SidecarIndex, validate_dataset


@dataclass
class SidecarDataManagerConfig(FullImageDatamanagerConfig):
    """FullImageDatamanager that also loads dataset sidecars (see gsstudio_ext/data/layout.py)."""

    _target: Type = field(default_factory=lambda: SidecarDataManager)
    dataparser: AnnotatedDataParserUnion = field(
        default_factory=lambda: NerfstudioDataParserConfig(load_3D_points=True)
    )
    """Dataparser; any whose outputs list image filenames works (default: transforms.json with its point cloud)."""
    sidecars: Tuple[str, ...] = ()
    """Sidecar kinds to load into every batch: instances, semantics, parts, expressions, embeddings. All are
    validated for the train and eval images at startup."""
    eval_frames: Tuple[str, ...] = ()
    """Image stems (or file names) forming the eval set, training frames allowed (LERF-OVS style). Empty: the
    dataparser's normal eval split."""
    cache_images: Literal["cpu", "gpu"] = "gpu"
    """Where cached images and sidecars live: "gpu" (the training device, nerfstudio's default) or "cpu" (saves
    device memory on large datasets)."""
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    """Cached image dtype; uint8 (as splatfacto) keeps a quarter of the memory."""


def dataset_root(data: Optional[Path]) -> Path:
    """Folder holding a dataset's ``sidecars/``: ``data`` itself, or its folder when it names a file."""
    if data is None:
        raise ValueError("no dataset given: pass --data (or the dataparser's data) pointing at the dataset folder")
    data = Path(data)
    if data.suffix == ".json" or data.is_file():
        return data.parent
    return data


def _cat_cameras(parts: List[Cameras]) -> Cameras:
    """Concatenate 1-D ``Cameras`` along the batch dimension."""

    def cat(name: str) -> Optional[Tensor]:
        values = [getattr(c, name) for c in parts]
        return None if any(v is None for v in values) else torch.cat(values, dim=0)

    metadata = None
    if parts[0].metadata:
        metadata = {k: torch.cat([c.metadata[k] for c in parts], dim=0) for k in parts[0].metadata}
    return Cameras(
        camera_to_worlds=cat("camera_to_worlds"),
        fx=cat("fx"),
        fy=cat("fy"),
        cx=cat("cx"),
        cy=cat("cy"),
        width=cat("width"),
        height=cat("height"),
        distortion_params=cat("distortion_params"),
        camera_type=cat("camera_type"),
        times=cat("times"),
        metadata=metadata,
    )


def _image_sizes(outputs: DataparserOutputs, scale_factor: float) -> List[Tuple[int, int]]:
    """(H, W) at which InputDataset will load each image (it rounds scaled sizes down, like the cameras)."""
    heights = (outputs.cameras.height.reshape(-1) * scale_factor).to(torch.int64).tolist()
    widths = (outputs.cameras.width.reshape(-1) * scale_factor).to(torch.int64).tolist()
    return list(zip(heights, widths))


class SidecarDataManager(FullImageDatamanager[SidecarDataset]):
    """Datamanager whose batches carry the requested sidecars (keys in :mod:`gsstudio_ext.data.sidecar_dataset`).

    - ``next_train`` / ``next_eval`` / ``next_eval_image`` / ``fixed_indices_eval_dataloader`` return
      ``(camera, data)`` with ``data["image"]`` and all sidecar tensors on the datamanager's device.
    - ``train_dataset.metadata["scene"]`` / ``["expressions"]`` expose scene meta and expressions to the model.
    - :meth:`set_train_image` replaces the exact tensor ``next_train`` returns (for editing methods).
    - ``config.eval_frames`` makes named (possibly training) frames the eval set.
    """

    config: SidecarDataManagerConfig
    sidecar_index: Optional[SidecarIndex] = None

    def __init__(
        self,
        config: SidecarDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ):
        unknown = [k for k in config.sidecars if k not in SIDECAR_KINDS]
        if unknown:
            raise ValueError(f"unknown sidecar kind(s) {unknown} in sidecars; choose from {SIDECAR_KINDS}")
        self._held_out_outputs: Optional[DataparserOutputs] = None
        self._eval_split: Optional[DataparserOutputs] = None
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank)

    # ----- datasets -------------------------------------------------------------------------------------------

    def _held_out(self) -> DataparserOutputs:
        """The dataparser's own eval split (parsed once)."""
        if self._held_out_outputs is None:
            self._held_out_outputs = self.dataparser.get_dataparser_outputs(split=self.test_split)
        return self._held_out_outputs

    def _eval_outputs(self) -> DataparserOutputs:
        """Eval split: the dataparser's, or the frames named in ``config.eval_frames`` in the given order."""
        if self._eval_split is None:
            self._eval_split = self._select_eval_frames() if self.config.eval_frames else self._held_out()
        return self._eval_split

    def _select_eval_frames(self) -> DataparserOutputs:
        train, held_out = self.train_dataparser_outputs, self._held_out()
        lookup: Dict[str, Tuple[DataparserOutputs, int]] = {}
        for outputs in (train, held_out):
            for i, filename in enumerate(outputs.image_filenames):
                lookup.setdefault(Path(filename).stem, (outputs, i))
        names = [Path(n).stem for n in self.config.eval_frames]
        missing = [n for n in names if n not in lookup]
        if missing:
            raise ValueError(
                f"eval_frames {missing} are not images of dataset {self.config.dataparser.data}; "
                f"known stems include {sorted(lookup)[:8]}"
            )
        picks = [lookup[n] for n in names]
        masks = None
        if all(o.mask_filenames is not None for o, _ in picks):
            masks = [o.mask_filenames[i] for o, i in picks]
        metadata = dict(train.metadata)
        if all(isinstance(o.metadata.get("depth_filenames"), list) for o, _ in picks):
            metadata["depth_filenames"] = [o.metadata["depth_filenames"][i] for o, i in picks]
        else:
            metadata.pop("depth_filenames", None)
        return replace(
            train,
            image_filenames=[o.image_filenames[i] for o, i in picks],
            cameras=_cat_cameras([o.cameras[i : i + 1] for o, i in picks]),
            mask_filenames=masks,
            metadata=metadata,
        )

    def _build_index(self) -> SidecarIndex:
        """Validate sidecars of every train and eval image once; raises SidecarError listing all problems."""
        # held-out frames are checked even when eval_frames replaces them: expressions may name them
        splits = (self.train_dataparser_outputs, self._held_out(), self._eval_outputs())
        filenames, sizes, seen = [], [], set()
        for outputs in splits:
            split_sizes = _image_sizes(outputs, self.config.camera_res_scale_factor)
            for filename, size in zip(outputs.image_filenames, split_sizes):
                if Path(filename) not in seen:
                    seen.add(Path(filename))
                    filenames.append(Path(filename))
                    sizes.append(size)
        if self.config.sidecars:
            for outputs in splits:
                dist = outputs.cameras.distortion_params
                if dist is not None and bool(torch.any(dist != 0)):
                    raise ValueError(
                        "sidecars need undistorted cameras: nerfstudio undistorts distorted images while caching, "
                        "which would misalign the sidecar maps. Undistort the dataset first (e.g. COLMAP "
                        "image_undistorter) and make the sidecars for the undistorted images."
                    )
        root = dataset_root(self.config.dataparser.data)
        return validate_dataset(root, filenames, sizes, require=self.config.sidecars)

    def create_train_dataset(self) -> SidecarDataset:
        self.sidecar_index = self._build_index()
        return SidecarDataset(
            dataparser_outputs=self.train_dataparser_outputs,
            scale_factor=self.config.camera_res_scale_factor,
            index=self.sidecar_index,
        )

    def create_eval_dataset(self) -> SidecarDataset:
        return SidecarDataset(
            dataparser_outputs=self._eval_outputs(),
            scale_factor=self.config.camera_res_scale_factor,
            index=self.sidecar_index,
        )

    def _load_images(self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]):
        if cache_images_device == "cpu" and torch.device(self.device).type == "cpu":
            # pin_memory() needs an accelerator; with a CPU device the "gpu" branch just keeps tensors on the CPU
            return super()._load_images(split, cache_images_device="gpu")
        cache = super()._load_images(split, cache_images_device=cache_images_device)
        if cache_images_device == "gpu":
            for data in cache:
                for key in SIDECAR_BATCH_KEYS:
                    if key in data:
                        data[key] = data[key].to(self.device)
        return cache

    # ----- batches --------------------------------------------------------------------------------------------

    def _to_device(self, data: Dict) -> Dict:
        """Move sidecar tensors of a (copied) data dict to the device; the cache is left untouched."""
        for key in SIDECAR_BATCH_KEYS:
            if key in data:
                data[key] = data[key].to(self.device)
        return data

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_train(step)
        return camera, self._to_device(data)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_eval_image(step)
        return camera, self._to_device(data)

    @property
    def fixed_indices_eval_dataloader(self) -> List[Tuple[Cameras, Dict]]:
        return [(camera, self._to_device(data)) for camera, data in super().fixed_indices_eval_dataloader]

    # ----- frames and editing ---------------------------------------------------------------------------------

    @property
    def train_stems(self) -> List[str]:
        """Image stems of the training set, in dataset (= ``cam_idx``) order."""
        return list(self.train_dataset.stems)

    @property
    def eval_stems(self) -> List[str]:
        """Image stems of the eval set, in dataset order."""
        return list(self.eval_dataset.stems)

    def train_index(self, stem: str) -> int:
        """Training index (``camera.metadata["cam_idx"]``) of the image with this stem."""
        try:
            return self.train_dataset.stems.index(Path(stem).stem)
        except ValueError:
            raise KeyError(f"'{stem}' is not a training image; training stems: {self.train_stems[:8]}...") from None

    def get_train_image(self, idx: int) -> Tensor:
        """The cached training image ``idx`` (the tensor ``next_train`` hands out), [H, W, C]."""
        return self.cached_train[idx]["image"]

    def set_train_image(self, idx: int, image: Tensor) -> None:
        """Replace training image ``idx``: every later ``next_train`` for this index returns the new pixels.

        ``image``: float [H, W, C] in [0, 1] or uint8 [H, W, C], with the cached image's height, width and channels.
        It is copied, converted to the cache's dtype (``cache_images_type``) and stored where the cache keeps images.
        """
        n = len(self.train_dataset)
        if not 0 <= idx < n:
            raise IndexError(f"training image index {idx} out of range [0, {n})")
        old = self.cached_train[idx]["image"]
        if tuple(image.shape) != tuple(old.shape):
            raise ValueError(f"edited image {idx}: shape {tuple(image.shape)}, expected {tuple(old.shape)} [H, W, C]")
        new = image.detach().to("cpu")
        if old.dtype == torch.uint8 and new.dtype != torch.uint8:
            new = (new.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        elif old.dtype != torch.uint8 and new.dtype == torch.uint8:
            new = new.to(old.dtype) / 255.0
        else:
            new = new.to(old.dtype).clone()
        new = new.to(old.device)
        if old.device.type == "cpu" and old.is_pinned():
            new = new.pin_memory()
        self.cached_train[idx]["image"] = new
