"""Check a dataset's sidecars against its images before training, and index them by image stem.

:func:`validate_dataset` reads every requested sidecar once and collects *all* problems (missing file, size
mismatch with its image, unknown object / class / part id, malformed JSON or npz, expressions pointing at unknown
frames or objects) into a single :class:`~gsstudio_ext.data.sidecars.SidecarError`, so a bad view is reported, never
silently dropped. Formats are defined in :mod:`gsstudio_ext.data.layout`.

Instance ids are scene.json object ids (ground truth, e.g. gs-synth) unless the preprocessing manifest
``sidecars/preprocess.json`` says ``"instance_ids": "masks"``: then they are per-image mask numbers 1..K (masks from a
generator such as SAM, written by ``gs-preprocess``), which are not checked against scene.json objects, and scene.json
is only required for the kinds that need it (semantics, parts, expressions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from gsstudio_ext.data import layout
from gsstudio_ext.data.sidecars import (
    SidecarError,
    read_embeddings,
    read_expressions,
    read_instances,
    read_parts,
    read_scene_meta,
    read_semantics,
)

SIDECAR_KINDS: Tuple[str, ...] = ("instances", "semantics", "parts", "expressions", "embeddings")
"""Every sidecar kind a dataset may carry."""
PER_IMAGE_KINDS: Tuple[str, ...] = ("instances", "semantics", "parts", "embeddings")
"""Kinds stored as one file per image stem."""
EXPRESSION_KINDS = frozenset({"name", "colour", "size", "left_right", "front_behind", "paraphrase", "pseudo"})
"""Values of an expression's ``kind``: gs-synth's templates, plus "pseudo" (gs-refer-masks: detector masks)."""
MAX_LISTED_PROBLEMS = 200
"""The preprocessing manifest in ``sidecars/`` (written by gs-preprocess, :mod:`gsstudio_ext.data.preprocess`)."""
INSTANCE_ID_KINDS: Tuple[str, ...] = ("objects", "masks")
"""Values of the manifest's ``"instance_ids"``: scene.json object ids, or per-image mask numbers 1..K."""
MASK_NUMBER_FIX = f'record "instance_ids": "masks" in sidecars/{layout.PREPROCESS_MANIFEST} (gs-preprocess does)'
"""How to declare per-image mask-number ids; appended to the findings that such ids would avoid."""

FIX_HINT = (
    "Fix: regenerate the sidecars (synthetic scenes: re-run `gs-synth` on this folder; real scenes: re-run the "
    "tool that exported them), correct the listed files by hand (formats: gsstudio_ext/data/layout.py), or stop "
    "requesting the kind (e.g. remove it from --pipeline.datamanager.sidecars)."
)

_PATH_FNS: Dict[str, Callable[[Path, str], Path]] = {
    "instances": layout.instance_path,
    "semantics": layout.semantic_path,
    "parts": layout.part_path,
    "embeddings": layout.embedding_path,
}


def sidecar_path(dataset_root: Path, kind: str, stem: str) -> Path:
    """Path of the per-image sidecar ``kind`` for image ``stem``."""
    return _PATH_FNS[kind](Path(dataset_root), stem)


def size_compatible(sidecar_hw: Tuple[int, int], image_hw: Tuple[int, int]) -> bool:
    """Whether a sidecar of size ``sidecar_hw`` belongs to an image loaded at ``image_hw`` (both (H, W)).

    Equal sizes match. A larger sidecar also matches when the image is a downscaled copy of the full-resolution
    image the sidecar was made for: same aspect ratio, allowing one pixel of rounding per side (nerfstudio's
    ``images_N`` folders and ``camera_res_scale_factor`` both round). Smaller sidecars never match.
    """
    hs, ws = int(sidecar_hw[0]), int(sidecar_hw[1])
    h, w = int(image_hw[0]), int(image_hw[1])
    if (hs, ws) == (h, w):
        return True
    if h <= 0 or w <= 0 or hs < h or ws < w:
        return False
    if ws >= hs:  # estimate the factor from the longer side, check the other
        return abs(hs * w / ws - h) <= 1.0 + 1e-6
    return abs(ws * h / hs - w) <= 1.0 + 1e-6


@dataclass
class SidecarIndex:
    """What :func:`validate_dataset` found: scene meta, expressions and per-stem sidecar paths."""

    root: Path
    """Dataset root (the folder holding ``sidecars/``)."""
    kinds: Tuple[str, ...]
    """Sidecar kinds that were requested and validated."""
    stems: List[str]
    """Image stems, one per validated image, in the order given."""
    scene: Dict[str, Any] = field(default_factory=dict)
    """Contents of ``sidecars/scene.json`` ({} when the dataset has none)."""
    expressions: List[Dict[str, Any]] = field(default_factory=list)
    """Contents of ``sidecars/expressions.json`` ([] unless "expressions" was requested)."""
    frame_expressions: Dict[str, List[int]] = field(default_factory=dict)
    """stem -> positions in ``expressions`` of the expressions listing that frame."""
    embedding_dim: Optional[int] = None
    """Feature size D of the embeddings (None unless "embeddings" was requested)."""
    instance_ids: str = "objects"
    """What instance / embedding ids are: "objects" (scene.json object ids) or "masks" (per-image mask numbers)."""

    def path(self, kind: str, stem: str) -> Path:
        """Path of the per-image sidecar ``kind`` of image ``stem``."""
        if kind not in PER_IMAGE_KINDS:
            raise KeyError(f"'{kind}' is not a per-image sidecar kind; choose from {PER_IMAGE_KINDS}")
        return sidecar_path(self.root, kind, stem)

    def expression_ids(self, stem: str) -> List[int]:
        """Positions in :attr:`expressions` of the expressions valid for frame ``stem``."""
        return list(self.frame_expressions.get(stem, []))

    @property
    def object_ids(self) -> List[int]:
        return [int(obj["id"]) for obj in self.scene.get("objects", [])]

    @property
    def class_names(self) -> List[str]:
        return list(self.scene.get("classes", []))


class _Problems:
    """Collects (file, reason) pairs and raises them together."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, str]] = []

    def add(self, path: Path, reason: str) -> None:
        self.items.append((str(path), reason))

    def add_error(self, path: Path, err: BaseException) -> None:
        if isinstance(err, SidecarError):
            # sidecars.py messages already carry the path; keep the reason only
            reason = str(err)
            for mention in (f" in {path}", f" {path}"):
                reason = reason.replace(mention, "")
        else:  # zipfile.BadZipFile, EOFError, zlib.error ... from a truncated archive
            reason = f"malformed or truncated file ({type(err).__name__}: {err})"
        self.add(path, reason)

    def raise_if_any(self, root: Path) -> None:
        if not self.items:
            return
        lines = [f"  - {path}: {reason}" for path, reason in self.items[:MAX_LISTED_PROBLEMS]]
        if len(self.items) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(self.items) - MAX_LISTED_PROBLEMS} more (see SidecarError.problems)")
        message = f"{len(self.items)} sidecar problem(s) in dataset {root}:\n" + "\n".join(lines) + "\n" + FIX_HINT
        err = SidecarError(message)
        err.problems = list(self.items)  # type: ignore[attr-defined]
        raise err


def _read(reader: Callable, path: Path, problems: _Problems):
    """Run a sidecars.py reader; record a missing or malformed file instead of raising."""
    if not path.exists():
        problems.add(path, "missing file")
        return None
    try:
        return reader(path)
    except Exception as err:  # noqa: BLE001 - every read failure becomes a reported problem
        problems.add_error(path, err)
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _instance_id_kind(root: Path, problems: _Problems) -> str:
    """What instance ids are, from the preprocessing manifest: "objects" (default, no manifest) or "masks"."""
    path = layout.sidecar_root(root) / layout.PREPROCESS_MANIFEST
    if not path.exists():
        return "objects"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.add(path, f"malformed JSON ({err}); it says whether instance ids are object ids or mask numbers")
        return "objects"
    kind = manifest.get("instance_ids", "objects") if isinstance(manifest, dict) else None
    if kind not in INSTANCE_ID_KINDS:
        got = repr(kind) if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        problems.add(path, f"'instance_ids' must be one of {list(INSTANCE_ID_KINDS)}, got {got}")
        return "objects"
    return kind


def _check_scene(root: Path, required: bool, problems: _Problems, hint: str = "") -> Optional[Dict[str, Any]]:
    """Validate scene.json; returns it, {} when absent and not required, or None when unusable."""
    path = layout.sidecar_root(root) / layout.SCENE_FILE
    if not path.exists():
        if required:
            problems.add(path, "missing file (scene meta: objects, classes, parts)" + hint)
            return None
        return {}
    try:
        scene = read_scene_meta(root)
    except SidecarError as err:
        problems.add_error(path, err)
        problems.add(path, "object, class and part ids of the sidecars were not checked against it")
        return None
    if not isinstance(scene, dict):
        problems.add(path, f"expected a JSON object, got {type(scene).__name__}")
        return None
    count = len(problems.items)
    version = scene.get("version", layout.FORMAT_VERSION)
    if not _is_int(version) or version > layout.FORMAT_VERSION:
        problems.add(path, f"unsupported format version {version!r} (this code reads <= {layout.FORMAT_VERSION})")
    classes = scene.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        problems.add(path, "'classes' must be a list of class names")
        classes = []
    objects = scene.get("objects", [])
    object_ids: Set[int] = set()
    if not isinstance(objects, list):
        problems.add(path, "'objects' must be a list")
        objects = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or not _is_int(obj.get("id")) or obj["id"] < 1:
            problems.add(path, f"objects[{i}] needs an integer 'id' >= 1 (0 is background)")
            continue
        if obj["id"] in object_ids:
            problems.add(path, f"duplicate object id {obj['id']}")
        object_ids.add(int(obj["id"]))
        cls = obj.get("class")
        if isinstance(cls, str) and cls not in classes:
            problems.add(path, f"object {obj['id']} has class '{cls}', not in 'classes'")
        elif _is_int(cls) and not 0 <= cls < len(classes):
            problems.add(path, f"object {obj['id']} has class index {cls}, but there are {len(classes)} classes")
    parts = scene.get("parts", [])
    part_ids: Set[int] = set()
    if not isinstance(parts, list):
        problems.add(path, "'parts' must be a list")
        parts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not _is_int(part.get("id")) or part["id"] < 1:
            problems.add(path, f"parts[{i}] needs an integer 'id' >= 1 (0 is no part)")
            continue
        if part["id"] in part_ids:
            problems.add(path, f"duplicate part id {part['id']}")
        part_ids.add(int(part["id"]))
        if part.get("object_id") not in object_ids:
            problems.add(path, f"part {part['id']} belongs to unknown object id {part.get('object_id')!r}")
    return scene if len(problems.items) == count else None


def _check_label_map(path: Path, values: np.ndarray, image_hw, valid: Set[int], what: str, problems: _Problems):
    if values.ndim != 2:
        problems.add(path, f"expected a single-channel PNG ({what} map [H, W]), got shape {values.shape}")
        return
    if not size_compatible(values.shape, image_hw):
        problems.add(
            path,
            f"size mismatch: {what} map is {values.shape[0]}x{values.shape[1]} (HxW), image is "
            f"{image_hw[0]}x{image_hw[1]}",
        )
    unknown = sorted(set(np.unique(values).tolist()) - valid)
    if unknown:
        problems.add(path, f"unknown {what} {unknown[:10]} (valid: {sorted(valid)[:20]})")


def _check_expressions(
    root: Path, stems: Sequence[str], object_ids: Optional[Set[int]], problems: _Problems
) -> Tuple[List[Dict[str, Any]], Dict[str, List[int]]]:
    path = layout.sidecar_root(root) / layout.EXPRESSIONS_FILE
    expressions = _read(lambda _: read_expressions(root), path, problems)
    if expressions is None:
        return [], {}
    if not isinstance(expressions, list):
        problems.add(path, f"expected a JSON list of expressions, got {type(expressions).__name__}")
        return [], {}
    known = set(stems)
    per_frame: Dict[str, List[int]] = {}
    seen_ids: Set[Any] = set()
    for i, expr in enumerate(expressions):
        if not isinstance(expr, dict):
            problems.add(path, f"expression [{i}] is not an object")
            continue
        name = f"expression [{i}] (id {expr.get('id')!r})"
        if "id" not in expr:
            problems.add(path, f"{name} has no 'id'")
        elif expr["id"] in seen_ids:
            problems.add(path, f"{name}: duplicate id")
        else:
            seen_ids.add(expr["id"])
        if not isinstance(expr.get("text"), str) or not expr["text"].strip():
            problems.add(path, f"{name} has no 'text'")
        if "kind" in expr and expr["kind"] not in EXPRESSION_KINDS:
            problems.add(path, f"{name} has unknown kind {expr['kind']!r} (valid: {sorted(EXPRESSION_KINDS)})")
        targets = expr.get("object_ids")
        if not isinstance(targets, list) or not targets or not all(_is_int(t) for t in targets):
            problems.add(path, f"{name} needs a non-empty integer list 'object_ids'")
        elif object_ids is not None:
            unknown = [t for t in targets if t not in object_ids]
            if unknown:
                problems.add(path, f"{name} targets unknown object id(s) {unknown} (not in scene.json)")
        frames = expr.get("frames")
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            problems.add(path, f"{name} needs a list of frame stems 'frames'")
            continue
        for frame in frames:
            if frame in known:
                per_frame.setdefault(frame, []).append(i)
            else:
                hint = " (frames are image stems: no folder, no extension)" if Path(frame).stem in known else ""
                problems.add(path, f"{name} lists unknown frame '{frame}'{hint}")
    return expressions, per_frame


def validate_dataset(
    dataset_root: Path,
    image_filenames: Sequence[Path],
    image_sizes: Sequence[Tuple[int, int]],
    require: Sequence[str] = (),
) -> SidecarIndex:
    """Validate the requested sidecars of every image and index them.

    Args:
        dataset_root: folder holding ``sidecars/`` (the folder of ``transforms.json`` or the COLMAP dataset).
        image_filenames: every image of every split that will be used; sidecars are keyed by ``Path(f).stem``.
        image_sizes: (H, W) of each image as it will be loaded (after any downscale).
        require: sidecar kinds to check, from :data:`SIDECAR_KINDS`. ``scene.json`` is required when any is given
            (except only instances / embeddings with mask-number ids, see the module doc) and always validated when
            present.

    Returns:
        A :class:`SidecarIndex`.

    Raises:
        ValueError: an unknown kind or mismatched argument lengths (a programming error).
        SidecarError: one error listing every problem found (file + reason) and how to fix it.
    """
    root = Path(dataset_root)
    kinds = tuple(dict.fromkeys(require))
    bad = [k for k in kinds if k not in SIDECAR_KINDS]
    if bad:
        raise ValueError(f"unknown sidecar kind(s) {bad}; choose from {SIDECAR_KINDS}")
    if len(image_filenames) != len(image_sizes):
        raise ValueError(f"{len(image_filenames)} image filenames but {len(image_sizes)} image sizes")
    problems = _Problems()
    stems = [Path(f).stem for f in image_filenames]
    first: Dict[str, Path] = {}
    for filename, stem in zip(image_filenames, stems):
        if stem in first and Path(first[stem]) != Path(filename):
            problems.add(filename, f"same stem '{stem}' as {first[stem]}; sidecars are keyed by stem, rename one")
        first.setdefault(stem, Path(filename))

    id_kind = _instance_id_kind(root, problems) if {"instances", "embeddings"} & set(kinds) else "objects"
    mask_numbers = id_kind == "masks"
    per_mask_only = set(kinds) <= {"instances", "embeddings"}
    scene_free = per_mask_only and (mask_numbers or not kinds)  # semantics, parts, expressions need scene.json
    hint = "" if scene_free or not per_mask_only else f"; not needed for per-image mask numbers: {MASK_NUMBER_FIX}"
    scene = _check_scene(root, required=not scene_free, problems=problems, hint=hint)
    objects = None if scene is None else {int(o["id"]) for o in scene.get("objects", [])}
    # ids that instances / embeddings must come from: scene objects, or (mask numbers) anything >= 1
    id_check = None if mask_numbers else objects
    mask_hint = f"if they are per-image mask numbers (e.g. SAM masks), {MASK_NUMBER_FIX}"
    classes = None if scene is None else set(range(len(scene.get("classes", []))))
    part_ids = None if scene is None else {0} | {int(p["id"]) for p in scene.get("parts", [])}
    if scene is not None and "semantics" in kinds and not classes:
        problems.add(layout.sidecar_root(root) / layout.SCENE_FILE, "semantics requested but 'classes' is empty")

    embedding_dim: Optional[int] = None
    first_dim_path: Optional[Path] = None
    done: Set[str] = set()
    for stem, image_hw in zip(stems, image_sizes):
        if stem in done:
            continue
        done.add(stem)
        instance_ids = None
        if "instances" in kinds:
            path = sidecar_path(root, "instances", stem)
            loaded = _read(read_instances, path, problems)
            if loaded is not None:
                ids, masks = loaded
                instance_ids = ids
                if not size_compatible(masks.shape[1:], image_hw):
                    problems.add(
                        path,
                        f"size mismatch: masks are {masks.shape[1]}x{masks.shape[2]} (HxW), image is "
                        f"{image_hw[0]}x{image_hw[1]}",
                    )
                what = "mask" if mask_numbers else "object"
                if len(set(ids.tolist())) != len(ids):
                    problems.add(path, f"duplicate {what} ids {ids.tolist()}")
                if mask_numbers and any(i < 1 for i in ids.tolist()):
                    problems.add(path, f"mask ids must be >= 1 (0 is background); got {ids.tolist()}")
                if id_check is not None:
                    unknown = [i for i in ids.tolist() if i not in id_check]
                    if unknown:
                        problems.add(path, f"unknown object id(s) {unknown} (not in scene.json objects); {mask_hint}")
        for kind, reader, what, valid in (
            ("semantics", read_semantics, "class index", classes),
            ("parts", read_parts, "part id", part_ids),
        ):
            if kind in kinds:
                path = sidecar_path(root, kind, stem)
                values = _read(reader, path, problems)
                if values is not None and valid is not None:
                    _check_label_map(path, values, image_hw, valid, what, problems)
        if "embeddings" in kinds:
            path = sidecar_path(root, "embeddings", stem)
            loaded = _read(read_embeddings, path, problems)
            if loaded is None:
                continue
            ids, features, _ = loaded
            if features.ndim != 2 or features.shape[0] != ids.shape[0]:
                problems.add(path, f"features must be [K, D] with K = len(ids) = {ids.shape[0]}; got {features.shape}")
                continue
            if not np.issubdtype(features.dtype, np.floating) or not np.isfinite(features).all():
                problems.add(path, f"features must be finite floats (dtype {features.dtype})")
            if instance_ids is not None and sorted(ids.tolist()) != sorted(instance_ids.tolist()):
                problems.add(path, f"mask ids {ids.tolist()} differ from instances {instance_ids.tolist()}")
            elif id_check is not None and any(i not in id_check for i in ids.tolist()):
                unknown = [i for i in ids.tolist() if i not in id_check]
                problems.add(path, f"unknown object id(s) {unknown} (not in scene.json objects); {mask_hint}")
            elif mask_numbers and instance_ids is None and any(i < 1 for i in ids.tolist()):
                problems.add(path, f"mask ids must be >= 1 (0 is background); got {ids.tolist()}")
            if embedding_dim is None:
                embedding_dim, first_dim_path = int(features.shape[1]), path
            elif features.shape[1] != embedding_dim:
                problems.add(path, f"feature size {features.shape[1]} differs from {embedding_dim} in {first_dim_path}")

    expressions: List[Dict[str, Any]] = []
    per_frame: Dict[str, List[int]] = {}
    if "expressions" in kinds:
        expressions, per_frame = _check_expressions(root, stems, objects, problems)
    problems.raise_if_any(root)
    return SidecarIndex(
        root=root,
        kinds=kinds,
        stems=stems,
        scene=scene or {},
        expressions=expressions,
        frame_expressions=per_frame,
        embedding_dim=embedding_dim,
        instance_ids=id_kind,
    )
