"""Language for super-anchors (spec §2.9, one render per view) and text queries over them (spec §2.10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gsstudio_ext.core.association import AssociationConfig, associate_groups, view_from_render
from gsstudio_ext.core.cameras import viewmat_from_c2w
from gsstudio_ext.core.selection import gaussians_of
from gsstudio_ext.data.sidecars import read_embeddings
from gsstudio_ext.methods.ag2aussian.index import grow_from_groups


@dataclass
class TextQuerySettings:
    """Text-query rule of the paper (softmax over super-anchors) plus an absolute floor for "nothing matches"."""

    temperature: float = 100.0
    """Softmax temperature over super-anchor similarities."""
    seed_margin: float = 0.1
    """Super-anchors whose probability is within this of the best one also seed the selection."""
    min_group_anchors: int = 5
    """Super-anchors with fewer anchors are never selected."""
    threshold: float = 0.5
    """The best super-anchor's cosine similarity must exceed this, else the query selects nothing (1 = never).
    0.5 suits the label (sentence-embedding) provider; CLIP image-text similarities are lower (about 0.2-0.3)."""


@dataclass
class GroupLanguage:
    """One embedding per super-anchor, the super-anchors they belong to, and the provider of the mask embeddings."""

    labels: Tensor
    """[A] super-anchor id of every anchor at association time."""
    embeddings: Tensor
    """[S, E], zero for super-anchors that matched no mask."""
    matched: Tensor
    """[S] bool, super-anchors that matched a mask in at least one view."""
    provider: str
    """Embedding provider (e.g. "clip:ViT-B-16/laion2b_s34b_b88k", "label:minilm"): picks the query text encoder."""


@torch.no_grad()
def associate_language(model, datamanager, config: Optional[AssociationConfig] = None) -> GroupLanguage:
    """Attach the per-mask embeddings of every training view to the model's super-anchors (one render per view)."""
    index = model.anchor_index
    p2a = model.gauss_params["point2anchor"]
    groups = index.labels[p2a]
    small = index.sizes[groups] <= 4
    groups = torch.where(small, torch.full_like(groups, -1), groups)
    features = model.instance_features()
    model_views = []
    provider = ""
    for idx in range(len(datamanager.train_dataset)):
        camera = datamanager.train_dataset.cameras[idx : idx + 1].to(model.device)
        data = datamanager.cached_train[idx]
        masks, embeddings = data.get("instance_masks"), data.get("embeddings")
        if masks is None or embeddings is None or masks.shape[0] == 0:
            continue
        if not provider:
            stem = datamanager.train_stems[idx]
            provider = read_embeddings(datamanager.sidecar_index.path("embeddings", stem))[2]
        model_views.append(
            view_from_render(
                model.means,
                model.quats,
                torch.exp(model.scales),
                torch.sigmoid(model.opacities).squeeze(-1),
                viewmat_from_c2w(camera.camera_to_worlds),
                camera.get_intrinsics_matrices(),
                int(camera.width),
                int(camera.height),
                masks.to(model.device),
                embeddings.float().to(model.device),
                backend=model.config.rasterizer_backend,
            )  # fmt: skip
        )
    result = associate_groups(groups, index.num_groups, model_views, config, instance_features=features)
    matched = result.matched.any(dim=1) if result.matched.numel() else torch.zeros(index.num_groups, dtype=torch.bool)
    return GroupLanguage(labels=index.labels, embeddings=result.embeddings, matched=matched, provider=provider)


@torch.no_grad()
def group_relevancy(language: GroupLanguage, positive: Tensor, negatives: Optional[Tensor] = None) -> Tensor:
    """Relevancy [S] of every super-anchor to a text embedding [E]: the cosine similarity, or with negatives [K, E]
    LERF's pairwise rule min_k exp(s) / (exp(s) + exp(s_k)) at temperature 10 (0.5 = as close to a negative)."""
    groups = F.normalize(language.embeddings, dim=-1)
    sims = groups @ F.normalize(positive, dim=-1)
    if negatives is None or negatives.shape[0] == 0:
        return sims
    neg = groups @ F.normalize(negatives, dim=-1).T
    return torch.sigmoid(10.0 * (sims[:, None] - neg)).amin(dim=1)


def encode_query(encode: Callable[[Sequence[str]], Tensor], text: str, negatives: Sequence[str] = ()):
    """(positive [E], negatives [K, E] or None) embeddings of a query; an empty positive is a user error."""
    if not text.strip():
        raise ValueError("empty text query: type what to look for, e.g. 'the red mug'")
    negatives = [n for n in negatives if n.strip()]
    embedded = encode([text, *negatives])
    return embedded[0], (embedded[1:] if negatives else None)


@torch.no_grad()
def match_text(
    model,
    language: GroupLanguage,
    positive: Tensor,
    negatives: Optional[Tensor] = None,
    settings: Optional[TextQuerySettings] = None,
) -> tuple[Tensor, Tensor]:
    """(children [N] bool, super-anchor relevancy [S]) of an encoded query: the best super-anchors (the paper's
    softmax rule), grown over the merge-scale graph.

    Nothing is selected when the best cosine similarity is below ``settings.threshold``, or when every candidate is
    closer to a negative than to the query."""
    settings = settings or TextQuerySettings()
    index = model.anchor_index
    device = language.embeddings.device
    sims = group_relevancy(language, positive.to(device))
    relevancy = sims if negatives is None else group_relevancy(language, positive.to(device), negatives.to(device))
    eligible = language.matched & (index.sizes.to(device) >= settings.min_group_anchors)
    if negatives is not None:
        eligible &= relevancy > 0.5
    empty = torch.zeros(model.num_points, dtype=torch.bool, device=model.device)
    if not eligible.any() or not float(sims[eligible].max().clamp(max=1.0)) > settings.threshold:  # 1.0 = none
        return empty, relevancy
    probs = torch.softmax(torch.where(eligible, sims, torch.full_like(sims, -1e4)) * settings.temperature, dim=0)
    seeds = torch.nonzero(eligible & (probs > probs.max() - settings.seed_margin)).flatten()
    anchors = grow_from_groups(index, model.gauss_params["anchor_feat"].detach(), seeds, model.config.graph_settings)
    return gaussians_of(anchors, model.gauss_params["point2anchor"]), relevancy


def select_by_text(
    model,
    language: GroupLanguage,
    encode: Callable[[Sequence[str]], Tensor],
    text: str,
    settings: Optional[TextQuerySettings] = None,
    negatives: Sequence[str] = (),
) -> Tensor:
    """Children [N] bool selected by a text query (see :func:`match_text`)."""
    positive, negative = encode_query(encode, text, negatives)
    return match_text(model, language, positive, negative, settings)[0]
