"""Anchor -> child Gaussian layout (Scaffold-GS style, as ag2aussian-ext stores it), read without the method.

An anchor checkpoint's ``gauss_params`` hold two levels:

- anchors [A]: ``anchor_xyz`` [A, 3], ``anchor_radius`` [A], ``anchor_feat`` [A, D] (instance feature);
- children [N]: ``offsets`` [N, 3] in anchor-radius units, ``scales`` (log), ``quats``, ``features_dc``,
  ``features_rest``, ``opacities`` (logit) and ``point2anchor`` [N] (int64 anchor of each child).

A child sits at ``anchor_xyz[p2a] + anchor_radius[p2a] * offsets``; its instance feature is its anchor's, normalised.
Only the children are Gaussians; :func:`scene_from_anchor_params` turns them into a plain :class:`GaussianScene`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.scene import GaussianScene

ANCHOR_KEYS = ("anchor_xyz", "anchor_radius", "anchor_feat")
"""Anchor-level ``gauss_params`` entries (anchor_feat is optional)."""
CHILD_KEYS = ("offsets", "scales", "quats", "features_dc", "features_rest", "opacities", "point2anchor")
"""Child-level ``gauss_params`` entries (features_rest is optional)."""
_REQUIRED = ("anchor_xyz", "anchor_radius", "offsets", "point2anchor")


def is_anchor_layout(params: Mapping[str, Tensor]) -> bool:
    """True when ``params`` store children relative to anchors (and no ``means`` of their own)."""
    return "means" not in params and all(k in params for k in _REQUIRED)


# Gathers use index_select: its backward is an atomic index_add, while tensor[index] backpropagates through a
# sorting index_put that costs milliseconds per call on ~1e5 rows on a GPU.


def child_positions(params: Mapping[str, Tensor]) -> Tensor:
    """World positions [N, 3] of the children."""
    p2a = params["point2anchor"]
    radius = params["anchor_radius"].index_select(0, p2a)[:, None]
    return params["anchor_xyz"].index_select(0, p2a) + radius * params["offsets"]


def child_instance_features(params: Mapping[str, Tensor]) -> Tensor:
    """Unit-norm instance feature of every child [N, D] (its anchor's)."""
    return F.normalize(params["anchor_feat"], dim=-1).index_select(0, params["point2anchor"])


def scene_from_anchor_params(params: Mapping[str, Tensor], anchor_labels: Optional[Tensor] = None) -> GaussianScene:
    """The children of an anchor layout as a :class:`GaussianScene` with world positions.

    Extras: ``instance_feature`` [N, D] when ``anchor_feat`` is present, and ``instance_id`` [N] (int64) when
    ``anchor_labels`` [A] (a super-anchor / instance id per anchor) is given. Raises ``ValueError`` when the two
    levels disagree (a child pointing at a missing anchor, a label count that is not A).
    """
    missing = [k for k in (*_REQUIRED, "scales", "quats", "features_dc", "opacities") if k not in params]
    if missing:
        raise ValueError(f"anchor layout lacks {missing}; got keys {sorted(params)}")
    tensors = {k: torch.as_tensor(v).detach() for k, v in params.items()}
    p2a = tensors["point2anchor"].long()
    num_anchors = int(tensors["anchor_xyz"].shape[0])
    if p2a.ndim != 1:
        raise ValueError(f"point2anchor must be [N]; got {list(p2a.shape)}")
    if p2a.numel() and (int(p2a.min()) < 0 or int(p2a.max()) >= num_anchors):
        raise ValueError(f"point2anchor refers to anchors outside 0..{num_anchors - 1}")
    if tuple(tensors["anchor_radius"].shape) != (num_anchors,):
        raise ValueError(f"anchor_radius must be [A] with A={num_anchors}; got {list(tensors['anchor_radius'].shape)}")
    tensors["point2anchor"] = p2a
    children = {k: tensors[k] for k in CHILD_KEYS if k in tensors and k not in ("offsets", "point2anchor")}
    children["means"] = child_positions(tensors)
    if "anchor_feat" in tensors:
        children["instance_feature"] = child_instance_features(tensors)
    if anchor_labels is not None:
        labels = torch.as_tensor(anchor_labels).detach().long().to(p2a.device)
        if tuple(labels.shape) != (num_anchors,):
            raise ValueError(f"anchor labels must be [A] with A={num_anchors}; got {list(labels.shape)}")
        children["instance_id"] = labels[p2a]
    return GaussianScene.from_splatfacto_params(children)
