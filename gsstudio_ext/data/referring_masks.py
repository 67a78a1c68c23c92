"""Pseudo target masks of referring expressions on real scenes: Grounded-SAM, as ReferSplat trains on
(segmentation-methods.md §3.2, §3.7).

For every image and expression, an open-vocabulary detector (Grounding DINO) boxes what the expression names; its
best box goes to box-prompted SAM, and the mask becomes the expression's target in that frame. The result uses the
ordinary sidecar layout (:mod:`gsstudio_ext.data.layout`), so ``SidecarDataManagerConfig(sidecars=("instances",
"expressions"))`` loads it:

- ``scene.json``: one object per expression k (id k + 1, name = the text, class "referring");
- ``instances/<stem>.npz``: ids = object ids of the expressions found in that frame, masks = their pseudo masks
  (they may overlap);
- ``expressions.json``: ``{"id": k, "text", "object_ids": [k + 1], "kind": "pseudo", "frames": [stems with a mask]}``.

The cache manifest ``sidecars/referring_masks.json`` records the config hash (detector + segmenter fingerprints), the
image digest and, per stem, which expressions were run and the id each got. A re-run detects only (stem, expression)
pairs that are new or whose image or config changed; reordered or removed expressions only rewrite files. Sidecar
files that this tool did not write (e.g. ground truth) are never replaced without ``overwrite``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
from nerfstudio.configs.base_config import InstantiateConfig
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gsstudio_ext.core.atomic import write_json_atomic
from gsstudio_ext.data import layout
from gsstudio_ext.data.mask_sources import ImageItem, config_fingerprint, fingerprint_hash
from gsstudio_ext.data.preprocess import dataset_root, file_digest, list_images
from gsstudio_ext.data.sidecars import read_expressions, read_instances, write_instances
from gsstudio_ext.data.validate import validate_dataset
from gsstudio_ext.models.box_masks import SamBoxConfig
from gsstudio_ext.models.detection import GroundingDinoConfig
from gsstudio_ext.models.provider import Device

REFERRING_MANIFEST = "referring_masks.json"
"""Cache manifest of this tool in ``sidecars/``."""
TOOL = "gs-refer-masks"
MANIFEST_VERSION = 1
OBJECT_CLASS = "referring"
"""scene.json class of every expression object."""
EXPRESSION_KIND = "pseudo"
"""expressions.json ``kind`` of every expression written here."""
ALGORITHM = "best-box-sam-v1"
"""Part of the cache key: change it when the box choice or mask rule changes."""
OTHER_SIDECARS = (layout.SEMANTICS_DIR, layout.PARTS_DIR, layout.EMBEDDINGS_DIR, layout.PREPROCESS_MANIFEST)
SAVE_EVERY_S = 10.0
"""The manifest is also saved this often during a run (and always at the end, even on errors)."""

Digest = Dict[str, Any]


class BoxDetector(Protocol):
    def detect(self, image: np.ndarray, text: str) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes Float32[K, 4] xyxy pixels, scores Float32[K]) sorted by descending score."""


@dataclass
class ReferringMasksReport:
    """What :func:`make_referring_masks` did."""

    dataset: Path
    """Dataset root."""
    stems: List[str]
    """Every image stem of the dataset, in order."""
    expressions: List[str]
    """Expression texts; expression k is scene object k + 1."""
    computed: List[str] = field(default_factory=list)
    """Stems on which the detector ran in this run."""
    detections: int = 0
    """(stem, expression) pairs run through the detector in this run."""
    written: List[str] = field(default_factory=list)
    """Stems whose instance file was (re)written in this run."""
    frames: Dict[str, List[str]] = field(default_factory=dict)
    """Expression text -> stems where a mask was found."""
    warnings: List[str] = field(default_factory=list)
    """Things the user should know (duplicate expressions dropped, other sidecars now stale, ...)."""
    manifest: Optional[Path] = None
    """The cache manifest."""
    seconds: float = 0.0
    """Wall time of the run."""

    @property
    def all_cached(self) -> bool:
        """True when the run detected nothing and rewrote no instance file."""
        return not self.computed and not self.written

    @property
    def not_found(self) -> List[str]:
        """Expressions without a mask in any frame."""
        return [t for t in self.expressions if not self.frames.get(t)]

    def summary(self) -> str:
        found = sum(len(f) for f in self.frames.values())
        return (
            f"{len(self.expressions)} expression(s) x {len(self.stems)} image(s) in {self.dataset}: "
            f"{self.detections} detection(s) on {len(self.computed)} image(s), {len(self.written)} file(s) written, "
            f"{found} (frame, expression) mask(s); {len(self.not_found)} expression(s) found nowhere; "
            f"{self.seconds:.1f} s"
        )


# ======================================================================================================================
# inputs
# ======================================================================================================================
def read_expression_file(path: Union[str, Path]) -> List[str]:
    """Expressions of a text file: one per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"expression file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def manifest_path(root: Path) -> Path:
    return layout.sidecar_root(root) / REFERRING_MANIFEST


def load_manifest(root: Path, console: Optional[Console] = None) -> Dict[str, Any]:
    """This tool's manifest ({} images when absent; a malformed one is ignored, so every file counts as foreign)."""
    path = manifest_path(root)
    empty: Dict[str, Any] = {"version": MANIFEST_VERSION, "tool": TOOL, "images": {}, "files": {}}
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        data = None
    if not (
        isinstance(data, dict) and data.get("version") == MANIFEST_VERSION and isinstance(data.get("images"), dict)
    ):
        if console is not None:
            console.print(f"[yellow]ignoring the unreadable cache {path}; recomputing[/yellow]")
        return empty
    data.setdefault("files", {})
    return data


def _same(path: Path, recorded: Optional[Digest]) -> bool:
    """Whether ``path`` exists with the content recorded in ``recorded``."""
    return bool(recorded) and path.is_file() and file_digest(path, recorded)["sha256"] == recorded.get("sha256")


def _shared_file(root: Path, name: str) -> Path:
    return layout.sidecar_root(root) / name


def _clean_texts(texts: Sequence[str], warnings: List[str]) -> List[str]:
    if isinstance(texts, str):
        raise TypeError("expressions must be a list of strings (one expression each), not a single string")
    cleaned: List[str] = []
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"expression [{i}] is empty or not a string: {t!r}")
        cleaned.append(" ".join(t.split()))
    unique = list(dict.fromkeys(cleaned))
    if len(unique) < len(cleaned):
        dupes = sorted({t for t in cleaned if cleaned.count(t) > 1})
        warnings.append(f"dropped repeated expression(s) {dupes[:5]} (each text is one target)")
    if not unique:
        raise ValueError(
            "no referring expressions given: pass a text file with one expression per line (--expressions FILE), "
            "e.g. 'the red mug on the left'"
        )
    return unique


def _resolve_texts(root: Path, expressions: Optional[Sequence[str]], manifest: Dict[str, Any]) -> List[str]:
    """The given expressions, or (None) the texts of an expressions.json written by this tool."""
    if expressions is not None:
        return list(expressions)
    path = _shared_file(root, layout.EXPRESSIONS_FILE)
    if not _same(path, manifest["files"].get(layout.EXPRESSIONS_FILE)):
        made_here = "" if not path.exists() else f" ({path} was not written by {TOOL})"
        raise ValueError(f"no referring expressions given{made_here}: pass --expressions FILE (one per line)")
    return [str(e["text"]) for e in read_expressions(root)]


def provider_fingerprint(provider: Any) -> Dict[str, Any]:
    """What determines a detector's / segmenter's output: its ``fingerprint()`` if it has one, else its config."""
    custom = getattr(provider, "fingerprint", None)
    if callable(custom):
        return {"type": type(provider).__name__, "fingerprint": custom()}
    return {"type": type(provider).__name__, "config": config_fingerprint(getattr(provider, "config", None))}


def _segment(segmenter: Any, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if hasattr(segmenter, "segment_boxes"):
        return np.asarray(segmenter.segment_boxes(image, boxes), dtype=bool)
    return np.stack([np.asarray(segmenter.segment_box(image, b), dtype=bool) for b in boxes])


# ======================================================================================================================
# main entry
# ======================================================================================================================
@dataclass
class _Plan:
    item: ImageItem
    digest: Digest
    known: Dict[str, Optional[int]]
    """Texts already run on this image with the current config: id in the instance file, or None (not found)."""
    todo: List[str]
    """Texts to run the detector on."""


def make_referring_masks(
    dataset: Union[str, Path],
    expressions: Optional[Sequence[str]] = None,
    detector: Union[InstantiateConfig, BoxDetector, None] = None,
    segmenter: Union[InstantiateConfig, Any, None] = None,
    overwrite: bool = False,
    *,
    device: Device = "cpu",
    progress: bool = True,
    console: Optional[Console] = None,
) -> ReferringMasksReport:
    """Write (or reuse) pseudo target masks of referring expressions for every image of a dataset.

    Args:
        dataset: dataset folder (or its transforms.json); images come from transforms.json frames, else images/.
        expressions: expression texts (see :func:`read_expression_file`); None reuses those of an expressions.json
            this tool wrote.
        detector: a DetectorConfig (set up on ``device``; default GroundingDinoConfig) or any object with
            ``detect(image, text) -> (boxes, scores)``.
        segmenter: a BoxSegmenterConfig (default SamBoxConfig, which needs its checkpoint) or any object with
            ``segment_boxes(image, boxes)`` or ``segment_box(image, box)``.
        overwrite: replace scene.json, expressions.json and instance files that this tool did not write.
        progress: show a rich progress bar.

    Returns:
        A :class:`ReferringMasksReport`; the dataset then passes ``validate_dataset(..., ("instances",
        "expressions"))``.

    Raises:
        ValueError: no (or empty) expressions. FileExistsError: sidecars of another origin (pass overwrite).
        MissingWeightsError: model weights not found (before any file is written).
    """
    start = time.perf_counter()
    console = console or Console()
    root = dataset_root(dataset)
    images = list_images(root)
    stems = [p.stem for p in images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"image stems {dupes[:5]} appear twice in {root}; sidecars are keyed by stem, rename them")
    manifest = load_manifest(root, console)
    saved = [json.dumps(manifest, sort_keys=True)]  # what the manifest file holds
    warnings: List[str] = []
    texts = _clean_texts(_resolve_texts(root, expressions, manifest), warnings)
    det = detector if detector is not None else GroundingDinoConfig()
    det = det.setup(device=device) if isinstance(det, InstantiateConfig) else det
    seg = segmenter if segmenter is not None else SamBoxConfig()
    seg = seg.setup(device=device) if isinstance(seg, InstantiateConfig) else seg
    fingerprint = {
        "algorithm": ALGORITHM,
        "detector": provider_fingerprint(det),
        "segmenter": provider_fingerprint(seg),
    }
    config_hash = fingerprint_hash(fingerprint)

    records: Dict[str, Dict[str, Any]] = manifest["images"]
    for stale in [s for s in records if s not in set(stems)]:
        del records[stale]
    warnings += _precheck(root, stems, manifest, overwrite)
    plans = [
        _plan(root, stem, path, i, records.get(stem, {}), texts, config_hash)
        for i, (stem, path) in enumerate(zip(stems, images))
    ]
    if any(p.todo for p in plans):  # weights are resolved before any file is written
        for provider in (det, seg):
            if callable(getattr(provider, "load", None)):
                provider.load()

    report = ReferringMasksReport(root, stems, texts, warnings=warnings, manifest=manifest_path(root))
    for line in warnings:
        console.print(f"[yellow]{TOOL}: {line}[/yellow]")
    files: Dict[str, Digest] = manifest["files"]

    def save() -> None:
        text = json.dumps(manifest, sort_keys=True)
        if text != saved[0]:
            _write_manifest(root, manifest)
            saved[0] = text

    manifest.update(version=MANIFEST_VERSION, tool=TOOL, config_hash=config_hash, config=fingerprint)
    columns = (TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    last_save = time.monotonic()
    try:
        _write_if_changed(root, layout.SCENE_FILE, _scene_meta(texts), files)
        save()  # scene.json is ours from here on
        with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task(f"referring masks ({len(texts)} expressions)", total=len(plans))
            for plan in plans:
                rec = records.setdefault(plan.item.stem, {})
                _process(plan, rec, texts, det, seg, config_hash, report)
                bar.advance(task)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    save()
                    last_save = time.monotonic()
        report.frames = {t: [s for s in stems if records[s]["texts"].get(t) is not None] for t in texts}
        entries = [
            {"id": k, "text": t, "object_ids": [k + 1], "kind": EXPRESSION_KIND, "frames": report.frames[t]}
            for k, t in enumerate(texts)
        ]
        _write_if_changed(root, layout.EXPRESSIONS_FILE, entries, files)
    finally:
        save()

    validate_dataset(root, images, [_image_hw(p) for p in images], require=("instances", "expressions"))
    report.seconds = time.perf_counter() - start
    return report


def _precheck(root: Path, stems: List[str], manifest: Dict[str, Any], overwrite: bool) -> List[str]:
    """Refuse to replace sidecars of another origin unless ``overwrite``; returns warnings when replacing them."""
    records, files = manifest["images"], manifest["files"]
    foreign = [
        p
        for p in (_shared_file(root, layout.SCENE_FILE), _shared_file(root, layout.EXPRESSIONS_FILE))
        if p.exists() and not _same(p, files.get(p.name))
    ]
    foreign += [
        layout.instance_path(root, s)
        for s in stems
        if layout.instance_path(root, s).exists()
        and not _same(layout.instance_path(root, s), records.get(s, {}).get("instances"))
    ]
    if not foreign:
        return []
    names = [str(p.relative_to(layout.sidecar_root(root))) for p in foreign]
    if not overwrite:
        raise FileExistsError(
            f"{len(foreign)} sidecar file(s) in {layout.sidecar_root(root)} were not written by {TOOL} (e.g. ground "
            f"truth from gs-synth, or masks from another tool): {names[:4]}; referring masks would replace them. "
            "Use a copy of the dataset, or pass overwrite=True (--overwrite) to replace them"
        )
    present = [n for n in OTHER_SIDECARS if (layout.sidecar_root(root) / n).exists()]
    warnings = [f"replacing {len(foreign)} sidecar file(s) of another origin, e.g. {names[:3]}"]
    if present:
        warnings.append(f"{present} still describe the old objects; regenerate or remove them before using them")
    return warnings


def _plan(
    root: Path, stem: str, path: Path, index: int, rec: Dict[str, Any], texts: List[str], config_hash: str
) -> _Plan:
    digest = file_digest(path, rec.get("image"))
    made = rec.get("made") or {}
    current = (
        made.get("config") == config_hash
        and made.get("image") == digest["sha256"]
        and _same(layout.instance_path(root, stem), rec.get("instances"))
        and isinstance(rec.get("texts"), dict)
    )
    known: Dict[str, Optional[int]] = dict(rec["texts"]) if current else {}
    return _Plan(ImageItem(root, stem, path, index), digest, known, [t for t in texts if t not in known])


def _process(
    plan: _Plan,
    rec: Dict[str, Any],
    texts: List[str],
    detector: Any,
    segmenter: Any,
    config_hash: str,
    report: ReferringMasksReport,
) -> None:
    """Bring the instance file of one image up to date; updates its manifest record ``rec``."""
    item = plan.item
    rec["image"] = plan.digest
    new_id = {t: k + 1 for k, t in enumerate(texts)}
    wanted = {t: new_id[t] for t in texts if plan.known.get(t) is not None}
    if not plan.todo and dict(rec.get("texts", {})) == {t: wanted.get(t) for t in texts}:
        return  # every expression cached with the ids the file already holds
    masks: Dict[str, np.ndarray] = {}
    hw: Optional[Tuple[int, int]] = None
    inst_path = layout.instance_path(item.root, item.stem)
    if wanted:
        old_ids, old_masks = read_instances(inst_path)
        row = {int(i): r for r, i in enumerate(old_ids.tolist())}
        masks = {t: old_masks[row[int(plan.known[t])]] for t in wanted}
        hw = tuple(old_masks.shape[1:])
    if plan.todo:
        rgb = item.rgb
        hw = tuple(rgb.shape[:2])
        hits, boxes = [], []
        for text in plan.todo:
            found, _ = detector.detect(rgb, text)
            if len(found):
                hits.append(text)
                boxes.append(np.asarray(found[0], dtype=np.float32))
        if hits:
            for text, mask in zip(hits, _segment(segmenter, rgb, np.stack(boxes))):
                if mask.any():
                    masks[text] = mask
        report.computed.append(item.stem)
        report.detections += len(plan.todo)
    if hw is None:
        with Image.open(item.path) as im:
            hw = (im.height, im.width)
    order = [t for t in texts if t in masks]
    stack = np.stack([masks[t] for t in order]) if order else np.zeros((0, *hw), dtype=bool)
    write_instances(item.root, item.stem, np.array([new_id[t] for t in order], dtype=np.int32), stack)
    rec["instances"] = file_digest(inst_path)
    rec["made"] = {"config": config_hash, "image": plan.digest["sha256"]}
    rec["texts"] = {t: (new_id[t] if t in masks else None) for t in texts}
    report.written.append(item.stem)


def _scene_meta(texts: List[str]) -> Dict[str, Any]:
    objects = [{"id": k + 1, "name": t, "class": OBJECT_CLASS, "parts": []} for k, t in enumerate(texts)]
    return {"version": layout.FORMAT_VERSION, "objects": objects, "classes": ["background", OBJECT_CLASS], "parts": []}


def _write_if_changed(root: Path, name: str, content: Any, files: Dict[str, Digest]) -> None:
    """Write a shared sidecar JSON unless it already holds ``content``; record its digest as ours."""
    path = _shared_file(root, name)
    try:
        same = path.is_file() and json.loads(path.read_text()) == content
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        same = False
    if not same:
        write_json_atomic(path, content, indent=2)
    files[name] = file_digest(path, files.get(name) if same else None)


def _write_manifest(root: Path, manifest: Dict[str, Any]) -> None:
    write_json_atomic(manifest_path(root), manifest, indent=1, sort_keys=True, trailing_newline=True)


def _image_hw(path: Path) -> Tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width
