"""A nerfstudio ``InputDataset`` whose per-image data dicts also carry the dataset's sidecars as tensors.

Keys added to each image's data (only for the requested kinds; H, W are the loaded image's size):

- ``instance_ids`` long [K] object ids and ``instance_masks`` bool [K, H, W] (masks may overlap);
- ``semantics`` long [H, W] class indices into ``metadata["scene"]["classes"]``;
- ``parts`` long [H, W] part ids (0 = no part);
- ``expression_ids`` long [E] positions in ``metadata["expressions"]`` of the expressions valid for the frame;
- ``embeddings`` float32 [K, D] and ``embedding_ids`` long [K]; when instances are loaded too, rows follow
  ``instance_ids`` order, so ``embeddings[k]`` describes ``instance_masks[k]``.

Sidecars are stored at the full image resolution. When nerfstudio loads a downscaled image (``images_N`` folders,
``downscale_factor`` or ``camera_res_scale_factor``), every map and mask is resized to the loaded image size with
nearest-neighbour sampling at pixel centres (the convention of PIL's NEAREST, which nerfstudio uses for its own
masks), so labels are never blended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset
from torch import Tensor

from gsstudio_ext.data.sidecars import SidecarError, read_embeddings, read_instances, read_parts, read_semantics
from gsstudio_ext.data.validate import SidecarIndex

SIDECAR_BATCH_KEYS: Tuple[str, ...] = (
    "instance_ids",
    "instance_masks",
    "semantics",
    "parts",
    "expression_ids",
    "embeddings",
    "embedding_ids",
)
"""Every key a :class:`SidecarDataset` may add to an image's data dict."""


def resize_nearest(values: Tensor, hw: Tuple[int, int]) -> Tensor:
    """Resize ``values`` [*batch, Hs, Ws] to [*batch, H, W] by nearest neighbour at pixel centres; any dtype."""
    src_h, src_w = values.shape[-2:]
    h, w = int(hw[0]), int(hw[1])
    if (src_h, src_w) == (h, w):
        return values
    rows = ((torch.arange(h, dtype=torch.float64) + 0.5) * (src_h / h)).floor().long().clamp_(0, src_h - 1)
    cols = ((torch.arange(w, dtype=torch.float64) + 0.5) * (src_w / w)).floor().long().clamp_(0, src_w - 1)
    return values[..., rows, :][..., cols]


def load_sidecars(index: SidecarIndex, stem: str, image_hw: Tuple[int, int]) -> Dict[str, Tensor]:
    """Read the sidecars of image ``stem`` named in ``index.kinds`` as CPU tensors at size ``image_hw`` (H, W)."""
    out: Dict[str, Tensor] = {}
    instance_ids: Optional[np.ndarray] = None
    if "instances" in index.kinds:
        instance_ids, masks = read_instances(index.path("instances", stem))
        out["instance_ids"] = torch.from_numpy(instance_ids.astype(np.int64))
        out["instance_masks"] = resize_nearest(torch.from_numpy(masks), image_hw).contiguous()
    if "semantics" in index.kinds:
        semantics = torch.from_numpy(read_semantics(index.path("semantics", stem)))
        out["semantics"] = resize_nearest(semantics, image_hw).contiguous()
    if "parts" in index.kinds:
        out["parts"] = resize_nearest(torch.from_numpy(read_parts(index.path("parts", stem))), image_hw).contiguous()
    if "expressions" in index.kinds:
        out["expression_ids"] = torch.tensor(index.expression_ids(stem), dtype=torch.long)
    if "embeddings" in index.kinds:
        path = index.path("embeddings", stem)
        ids, features, _ = read_embeddings(path)
        if instance_ids is not None:  # align rows with the instance masks
            row_of = {int(i): r for r, i in enumerate(ids.tolist())}
            if sorted(row_of) != sorted(instance_ids.tolist()):
                raise SidecarError(f"{path}: mask ids {ids.tolist()} differ from instances {instance_ids.tolist()}")
            order = [row_of[int(i)] for i in instance_ids.tolist()]
            ids, features = ids[order], features[order]
        out["embedding_ids"] = torch.from_numpy(ids.astype(np.int64))
        out["embeddings"] = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return out


class SidecarDataset(InputDataset):
    """``InputDataset`` adding the sidecars of ``index.kinds`` to every image's data dict (keys in module doc).

    ``metadata`` (handed by nerfstudio's pipeline to the model) gains ``"scene"`` (scene.json), ``"expressions"``
    (expressions.json), ``"sidecars"`` (loaded kinds) and ``"sidecar_root"`` when an index is given.
    """

    def __init__(
        self,
        dataparser_outputs: DataparserOutputs,
        scale_factor: float = 1.0,
        index: Optional[SidecarIndex] = None,
    ):
        super().__init__(dataparser_outputs, scale_factor)
        # own copy: FullImageDatamanager removes entries from this list, which would edit the class attribute
        self.exclude_batch_keys_from_device = list(InputDataset.exclude_batch_keys_from_device)
        self.index = index
        self.stems: List[str] = [Path(f).stem for f in self.image_filenames]
        if index is None:
            return
        missing = sorted(set(self.stems) - set(index.stems))
        if missing:
            raise ValueError(f"sidecar index of {index.root} was built without image(s) {missing[:5]}")
        self.metadata["scene"] = index.scene
        self.metadata["expressions"] = index.expressions
        self.metadata["sidecars"] = tuple(index.kinds)
        self.metadata["sidecar_root"] = str(index.root)

    def get_metadata(self, data: Dict) -> Dict:
        """Sidecar tensors of ``data["image_idx"]``, resized to ``data["image"]``'s height and width."""
        if self.index is None or not self.index.kinds:
            return {}
        image_hw = tuple(data["image"].shape[:2])
        return load_sidecars(self.index, self.stems[data["image_idx"]], image_hw)
