"""Text-query evaluation of a trained scene on its eval frames, under both LERF-OVS protocols.

The (frame, query) pairs come from the dataset: every object whose GT instance mask is visible in an eval frame,
queried by its name (``scene.json`` objects; gs-synth writes them). Each query runs once; its selection and
relevancy are rendered in every eval frame:

- "opengaussian-lerf" (AG2aussian / OpenGaussian): the rendered selection (> 0.5) against the GT mask; a
  prediction under ``min_prediction_pixels`` is not written by AG2aussian, so it scores as missing (IoU 0).
- "langsplat-lerf": the rendered relevancy of the query against LangSplat's canonical negatives.

Method-agnostic: the method passes ``run_query(text, negatives)`` and ``render(camera) -> outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from gsstudio_ext.eval import langsplat_lerf, opengaussian_lerf
from gsstudio_ext.eval.report import ProtocolResult

Pairs = Dict[Tuple[str, str], np.ndarray]


@dataclass
class TextQueryEvalConfig:
    """ns-eval text-query metrics (run when the eval frames carry instance masks and the objects have names)."""

    enabled: bool = True
    """Compute the text-query metrics in ns-eval."""
    min_gt_pixels: int = 20
    """Objects covering fewer pixels of a frame are not evaluated in it."""
    min_prediction_pixels: int = 50
    """Rendered selections below this many pixels count as no prediction (AG2aussian's rule)."""
    dilation_ratio: float = 0.02
    """Boundary-IoU band width (fraction of the image diagonal)."""
    langsplat_protocol: bool = True
    """Also score rendered relevancy maps under the LangSplat protocol."""


def object_names(datamanager) -> Dict[int, str]:
    """Object id -> name from the dataset's scene metadata (empty when the dataset has none)."""
    scene = (datamanager.train_dataset.metadata or {}).get("scene") or {}
    return {int(obj["id"]): str(obj["name"]) for obj in scene.get("objects", []) if obj.get("name")}


def dataset_pairs(datamanager, min_gt_pixels: int = 20) -> Tuple[Dict[str, Cameras], Pairs]:
    """Eval frames (stem -> camera) and GT masks keyed by (frame, object name), from the instance sidecars."""
    names = object_names(datamanager)
    views: Dict[str, Cameras] = {}
    pairs: Pairs = {}
    for (camera, batch), stem in zip(datamanager.fixed_indices_eval_dataloader, datamanager.eval_stems):
        masks, ids = batch.get("instance_masks"), batch.get("instance_ids")
        if masks is None or ids is None:
            continue
        for object_id, mask in zip(ids.tolist(), masks):
            if object_id in names and int(mask.sum()) >= min_gt_pixels:
                views[stem] = camera
                pairs[(stem, names[object_id])] = mask.cpu().numpy().astype(bool)
    return views, pairs


def evaluate_text_queries(
    run_query: Callable[[str, Sequence[str]], object],
    render: Callable[[Cameras], Dict[str, Tensor]],
    views: Dict[str, Cameras],
    pairs: Pairs,
    config: TextQueryEvalConfig,
    scene: str = "scene",
) -> List[ProtocolResult]:
    """Both protocols' results for ``pairs``; each query runs once and renders in every frame it is evaluated in."""
    predictions: Dict[Tuple[str, str], np.ndarray] = {}
    relevancy: Dict[Tuple[str, str], np.ndarray] = {}
    queries = sorted({query for _, query in pairs})
    with torch.no_grad():
        for query in queries:
            frames = [frame for frame, q in pairs if q == query]
            run_query(query, ())
            for frame in frames:
                selected = render(views[frame])["selection"][..., 0].cpu().numpy() > 0.5
                if selected.sum() >= config.min_prediction_pixels:
                    predictions[(frame, query)] = selected
            if config.langsplat_protocol:
                run_query(query, langsplat_lerf.CANONICAL_NEGATIVES)
                for frame in frames:
                    relevancy[(frame, query)] = render(views[frame])["relevancy"][..., 0].cpu().numpy()
    results = [opengaussian_lerf.evaluate_masks(pairs, predictions, scene, config.dilation_ratio)]
    if config.langsplat_protocol:
        results.append(langsplat_lerf.evaluate_relevancy(pairs, relevancy, scene))
    return results
