"""Where a gsstudio dataset keeps its files: one definition shared by the writer, the loader and the validator.

A dataset is a nerfstudio dataset (``transforms.json`` + images, optional depth and initial point cloud) plus
optional sidecar files keyed by image stem, all under ``<dataset>/sidecars/``:

``sidecars/scene.json``
    ``{"version": 1, "objects": [{"id", "name", "class", "color", "size", "parts": [part ids]}],
    "classes": ["background", ...], "parts": [{"id", "object_id", "name"}]}``.
    Object ids start at 1 (0 is background); class 0 is background; part ids start at 1 (0 is no part).
``sidecars/instances/<stem>.npz``
    ``ids`` int32 [K] object ids, ``bits`` uint8 ``np.packbits`` of a bool [K, H, W] stack (masks may overlap),
    ``shape`` int64 [2] = (H, W).
``sidecars/semantics/<stem>.png``
    uint8 or uint16 PNG, per-pixel class index into ``classes``.
``sidecars/parts/<stem>.png``
    uint16 PNG, per-pixel part id (0 = no part).
``sidecars/expressions.json``
    ``[{"id", "text", "object_ids": [...], "kind", "frames": [stems]}]``: referring expressions and the frames in
    which their targets are visible. ``kind`` is one of name, colour, size, left_right, front_behind, paraphrase,
    pseudo (detector masks written by gs-refer-masks).
``sidecars/preprocess.json``
    gs-preprocess's cache manifest; ``"instance_ids": "masks"`` marks instance ids as per-image mask numbers.
``sidecars/referring_masks.json``
    gs-refer-masks's cache manifest (detector + SAM pseudo masks of referring expressions).
``sidecars/embeddings/<stem>.npz``
    ``ids`` int32 [K] mask ids matching ``instances``, ``features`` float16/float32 [K, D], ``provider`` str.
"""

from __future__ import annotations

from pathlib import Path

SIDECAR_DIR = "sidecars"
SCENE_FILE = "scene.json"
EXPRESSIONS_FILE = "expressions.json"
INSTANCES_DIR = "instances"
SEMANTICS_DIR = "semantics"
PARTS_DIR = "parts"
EMBEDDINGS_DIR = "embeddings"
PREPROCESS_MANIFEST = "preprocess.json"
FORMAT_VERSION = 1


def sidecar_root(dataset: Path) -> Path:
    """The sidecar folder of a dataset."""
    return Path(dataset) / SIDECAR_DIR


def instance_path(dataset: Path, stem: str) -> Path:
    return sidecar_root(dataset) / INSTANCES_DIR / f"{stem}.npz"


def semantic_path(dataset: Path, stem: str) -> Path:
    return sidecar_root(dataset) / SEMANTICS_DIR / f"{stem}.png"


def part_path(dataset: Path, stem: str) -> Path:
    return sidecar_root(dataset) / PARTS_DIR / f"{stem}.png"


def embedding_path(dataset: Path, stem: str) -> Path:
    return sidecar_root(dataset) / EMBEDDINGS_DIR / f"{stem}.npz"
