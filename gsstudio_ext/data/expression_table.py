"""The dataset's referring expressions as the model uses them: texts, target objects, categories, kinds, and the
target mask of each expression in a view (the union of its objects' instance masks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import Tensor


@dataclass
class ExpressionTable:
    """Every expression of ``sidecars/expressions.json``, indexed by its position in that list."""

    texts: List[str]
    object_ids: List[List[int]]
    kinds: List[str]
    categories: Tensor
    """Long [E]: expressions with the same target objects share a category (GTCL's positives)."""

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "ExpressionTable":
        texts = [str(r["text"]) for r in records]
        object_ids = [sorted(int(i) for i in r.get("object_ids", [])) for r in records]
        kinds = [str(r.get("kind", "")) for r in records]
        category_of: Dict[tuple, int] = {}
        categories = [category_of.setdefault(tuple(ids), len(category_of)) for ids in object_ids]
        return cls(texts, object_ids, kinds, torch.tensor(categories, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.texts)

    def trained(self, ids: Tensor, held_out_kinds: Sequence[str]) -> Tensor:
        """The ids [E'] of ``ids`` whose kind is not held out of training."""
        if not held_out_kinds:
            return ids
        keep = [self.kinds[i] not in held_out_kinds for i in ids.tolist()]
        return ids[torch.tensor(keep, dtype=torch.bool, device=ids.device)]


def target_masks(object_ids: Sequence[Sequence[int]], instance_ids: Tensor, instance_masks: Tensor) -> Tensor:
    """Bool [S, H, W]: for each expression, the union of the instance masks [K, H, W] (ids [K]) of its objects."""
    num, (height, width) = len(object_ids), instance_masks.shape[-2:]
    if num == 0 or instance_ids.numel() == 0:
        return torch.zeros(num, height, width, dtype=torch.bool, device=instance_masks.device)
    wanted = torch.zeros(num, int(instance_ids.max()) + 1, dtype=torch.bool)
    for row, ids in enumerate(object_ids):
        ids = [i for i in ids if i < wanted.shape[1]]
        wanted[row, ids] = True
    member = wanted[:, instance_ids.cpu()].to(instance_masks.device).float()  # [S, K]
    return (member @ instance_masks.flatten(1).float()).view(num, height, width) > 0
