"""Read and write the sidecar files of a dataset (formats in :mod:`gsstudio_ext.data.layout`).

Every writer is atomic (temp file, then rename), so an interrupted run never leaves a half-written sidecar.
Readers return numpy arrays and raise :class:`SidecarError` with the offending path on a malformed file.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from gsstudio_ext.core.atomic import atomic_write, write_json_atomic
from gsstudio_ext.data import layout


class SidecarError(ValueError):
    """A sidecar file is missing, malformed or inconsistent with its image."""


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=2)


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise SidecarError(f"missing sidecar file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SidecarError(f"malformed JSON in {path}: {err}") from err


def write_scene_meta(dataset: Path, meta: Dict[str, Any]) -> None:
    """Write ``sidecars/scene.json`` (objects, classes, parts)."""
    _write_json(layout.sidecar_root(dataset) / layout.SCENE_FILE, {"version": layout.FORMAT_VERSION, **meta})


def read_scene_meta(dataset: Path) -> Dict[str, Any]:
    return _read_json(layout.sidecar_root(dataset) / layout.SCENE_FILE)


def write_expressions(dataset: Path, expressions: List[Dict[str, Any]]) -> None:
    """Write ``sidecars/expressions.json``."""
    _write_json(layout.sidecar_root(dataset) / layout.EXPRESSIONS_FILE, expressions)


def read_expressions(dataset: Path) -> List[Dict[str, Any]]:
    return _read_json(layout.sidecar_root(dataset) / layout.EXPRESSIONS_FILE)


def write_instances(dataset: Path, stem: str, ids: np.ndarray, masks: np.ndarray) -> None:
    """Write instance masks of one image: ``ids`` [K] and a bool stack ``masks`` [K, H, W] (may overlap)."""
    masks = np.asarray(masks, dtype=bool)
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    if masks.ndim != 3 or masks.shape[0] != ids.shape[0]:
        raise SidecarError(f"instance masks need shape [K, H, W] with K = len(ids); got {masks.shape}, {ids.shape}")
    bits = np.packbits(masks.reshape(-1))
    shape = np.asarray(masks.shape[1:], dtype=np.int64)
    atomic_write(
        layout.instance_path(dataset, stem),
        lambda handle: np.savez_compressed(handle, ids=ids, bits=bits, shape=shape),
    )


def read_instances(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``(ids [K], masks bool [K, H, W])`` from an instance sidecar."""
    path = Path(path)
    if not path.exists():
        raise SidecarError(f"missing instance sidecar: {path}")
    try:
        with np.load(path) as data:
            ids, bits, shape = data["ids"], data["bits"], data["shape"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise SidecarError(f"malformed instance sidecar {path}: {err}") from err
    count = int(ids.shape[0]) * int(shape[0]) * int(shape[1])
    if bits.size * 8 < count:
        raise SidecarError(f"malformed instance sidecar {path}: {bits.size} bytes cannot hold {count} mask bits")
    masks = np.unpackbits(bits, count=count).astype(bool).reshape(int(ids.shape[0]), int(shape[0]), int(shape[1]))
    return ids.astype(np.int64), masks


def _write_png(path: Path, array: np.ndarray, dtype) -> None:
    image = Image.fromarray(np.asarray(array).astype(dtype))
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def _read_png(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise SidecarError(f"missing sidecar image: {path}")
    try:
        with Image.open(path) as image:
            return np.asarray(image).astype(np.int64)
    except OSError as err:
        raise SidecarError(f"unreadable sidecar image {path}: {err}") from err


def write_semantics(dataset: Path, stem: str, class_map: np.ndarray) -> None:
    """Write a per-pixel class-index map [H, W]."""
    dtype = np.uint8 if int(np.max(class_map, initial=0)) < 256 else np.uint16
    _write_png(layout.semantic_path(dataset, stem), class_map, dtype)


def read_semantics(path: Path) -> np.ndarray:
    return _read_png(path)


def write_parts(dataset: Path, stem: str, part_map: np.ndarray) -> None:
    """Write a per-pixel part-id map [H, W] (0 = no part)."""
    _write_png(layout.part_path(dataset, stem), part_map, np.uint16)


def read_parts(path: Path) -> np.ndarray:
    return _read_png(path)


def write_embeddings(dataset: Path, stem: str, ids: np.ndarray, features: np.ndarray, provider: str) -> None:
    """Write per-mask embeddings [K, D] of one image, tagged with the provider that made them."""
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != ids.shape[0]:
        raise SidecarError(f"embeddings need shape [K, D] with K = len(ids); got {features.shape}, {ids.shape}")
    atomic_write(
        layout.embedding_path(dataset, stem),
        lambda handle: np.savez(handle, ids=ids, features=features, provider=np.asarray(provider)),
    )


def read_embeddings(path: Path) -> Tuple[np.ndarray, np.ndarray, str]:
    """Read ``(ids [K], features [K, D], provider)``."""
    path = Path(path)
    if not path.exists():
        raise SidecarError(f"missing embedding sidecar: {path}")
    try:
        with np.load(path) as data:
            return data["ids"].astype(np.int64), data["features"], str(data["provider"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise SidecarError(f"malformed embedding sidecar {path}: {err}") from err
