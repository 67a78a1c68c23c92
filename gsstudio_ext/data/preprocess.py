"""Turn a dataset into per-image instance masks + per-mask embeddings (the ``instances`` and ``embeddings``
sidecars), cached so that re-runs only redo what changed (segmentation-methods.md §7 item 3).

The cache manifest ``sidecars/preprocess.json`` records, per image stem, the content hashes (sha256) of the image
and of the sidecar files, and the config hashes they were made with::

    {"version": 1, "instance_ids": "masks" | "objects",
     "masks": {"source", "config_hash", "config"}, "embeddings": {"source", "provider", "dim", "config_hash", ...},
     "images": {stem: {"image": digest, "instances": digest,
                       "masks": {"source", "config", "image"},          # only when preprocessing wrote the masks
                       "embeddings": {"config", "input", "file": digest, "provider"}}}}

with ``digest = {"sha256", "size", "mtime_ns"}`` (a file whose size and mtime are unchanged is not re-hashed).
Masks are recomputed when the mask config or the image content changed, or the file was edited or removed;
embeddings when the embedding config or their inputs (instance file, plus the image for CLIP) changed. With the
"sidecar" mask source the instance files are only read, never written. ``"instance_ids": "masks"`` says the
instance ids are per-image mask numbers (SAM), not scene.json object ids.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gsstudio_ext.core.atomic import write_json_atomic
from gsstudio_ext.data import layout
from gsstudio_ext.data.embedding_sources import EmbeddingSource, EmbeddingSourceConfig
from gsstudio_ext.data.mask_sources import ImageItem, MaskSource, MaskSourceConfig, fingerprint_hash
from gsstudio_ext.data.sidecars import SidecarError, read_instances, write_embeddings, write_instances
from gsstudio_ext.data.validate import validate_dataset
from gsstudio_ext.models.provider import Device

MANIFEST_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SAVE_EVERY_S = 10.0
"""The manifest is also saved this often during a run (and always at the end, even on errors)."""

Digest = Dict[str, Any]


@dataclass
class PreprocessReport:
    """What :func:`preprocess_dataset` did."""

    dataset: Path
    """Dataset root."""
    stems: List[str]
    """Image stems that were processed (checked, and recomputed where needed)."""
    mask_source: str
    """Mask source name (sam, sidecar)."""
    provider: str
    """Embedding provider string stored in the embedding sidecars (clip:..., label:...)."""
    embedding_dim: int
    """Embedding size D."""
    computed_masks: List[str] = field(default_factory=list)
    """Stems whose instance masks were (re)computed and written."""
    computed_embeddings: List[str] = field(default_factory=list)
    """Stems whose embeddings were (re)computed and written."""
    num_masks: Dict[str, int] = field(default_factory=dict)
    """Masks per stem, for the stems computed in this run."""
    manifest: Optional[Path] = None
    """The cache manifest (sidecars/preprocess.json)."""
    seconds: float = 0.0
    """Wall time of the run."""

    @property
    def cached(self) -> List[str]:
        """Stems for which nothing had to be recomputed."""
        done = set(self.computed_masks) | set(self.computed_embeddings)
        return [s for s in self.stems if s not in done]

    @property
    def all_cached(self) -> bool:
        """True when the run changed nothing (every result came from the cache)."""
        return not self.computed_masks and not self.computed_embeddings

    def summary(self) -> str:
        masks = "read from sidecars" if self.mask_source == "sidecar" else f"{len(self.computed_masks)} computed"
        return (
            f"{len(self.stems)} image(s) in {self.dataset}: masks ({self.mask_source}) {masks}, embeddings "
            f"({self.provider}, D={self.embedding_dim}) {len(self.computed_embeddings)} computed, "
            f"{len(self.cached)} fully cached; {self.seconds:.1f} s"
        )


# ======================================================================================================================
# dataset images and file hashing
# ======================================================================================================================
def dataset_root(data: Union[str, Path]) -> Path:
    """Dataset folder of ``data`` (the folder itself, or the folder of a transforms.json)."""
    data = Path(data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"dataset not found: {data}")
    return data.parent if data.is_file() else data


def list_images(root: Path) -> List[Path]:
    """Every image of a dataset: the frames of ``transforms.json`` in order, else the files of ``images/`` (COLMAP)."""
    root = Path(root)
    transforms = root / "transforms.json"
    if transforms.exists():
        try:
            frames = json.loads(transforms.read_text()).get("frames")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"malformed {transforms}: {err}") from err
        if not isinstance(frames, list) or not frames:
            raise ValueError(f"{transforms} lists no frames")
        paths, missing = [], []
        for i, frame in enumerate(frames):
            name = frame.get("file_path") if isinstance(frame, dict) else None
            if not isinstance(name, str):
                raise ValueError(f"{transforms}: frame {i} has no 'file_path'")
            path = Path(name) if Path(name).is_absolute() else root / name
            (paths if path.is_file() else missing).append(path)
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {transforms} do not exist: {missing[:5]}")
        return paths
    folder = root / "images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no transforms.json and no images/ folder with images in {root}")
    return files


def file_digest(path: Path, previous: Optional[Digest] = None) -> Digest:
    """``{"sha256", "size", "mtime_ns"}`` of a file; reuses ``previous`` when size and mtime are unchanged."""
    st = Path(path).stat()
    if (
        previous
        and previous.get("sha256")
        and (previous.get("size"), previous.get("mtime_ns"))
        == (
            st.st_size,
            st.st_mtime_ns,
        )
    ):
        return previous
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return {"sha256": sha.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _same(path: Path, recorded: Optional[Digest]) -> bool:
    """Whether ``path`` exists with the content recorded in ``recorded``."""
    return bool(recorded) and path.is_file() and file_digest(path, recorded)["sha256"] == recorded.get("sha256")


# ======================================================================================================================
# manifest
# ======================================================================================================================
def manifest_path(root: Path) -> Path:
    return layout.sidecar_root(root) / layout.PREPROCESS_MANIFEST


def load_manifest(root: Path, console: Optional[Console] = None) -> Dict[str, Any]:
    """The cache manifest of a dataset ({} images when absent; a malformed one is ignored with a warning)."""
    path = manifest_path(root)
    empty: Dict[str, Any] = {"version": MANIFEST_VERSION, "images": {}}
    if not path.exists():
        return empty
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        data, reason = None, str(err)
    else:
        reason = f"unsupported content (version {data.get('version')!r})" if isinstance(data, dict) else "not a dict"
    usable = isinstance(data, dict) and data.get("version") == MANIFEST_VERSION and isinstance(data.get("images"), dict)
    if not usable:
        if console is not None:
            console.print(f"[yellow]ignoring the preprocessing cache {path}: {reason}; recomputing[/yellow]")
        return empty
    return data


def _write_manifest(path: Path, manifest: Dict[str, Any]) -> None:
    """Manifest JSON: indent 1, sorted keys, final newline (stable diffs between runs)."""
    write_json_atomic(path, manifest, indent=1, sort_keys=True, trailing_newline=True)


def _is_ours(root: Path, stem: str, rec: Dict[str, Any]) -> bool:
    """Whether the instance file of ``stem`` is the one preprocessing wrote (masks from a mask generator)."""
    return bool(rec.get("masks")) and _same(layout.instance_path(root, stem), rec.get("instances"))


# ======================================================================================================================
# main entry
# ======================================================================================================================
def preprocess_dataset(
    dataset: Union[str, Path],
    mask_source: Union[MaskSource, MaskSourceConfig],
    embedding_source: Union[EmbeddingSource, EmbeddingSourceConfig],
    stems: Optional[Sequence[str]] = None,
    force: bool = False,
    *,
    device: Device = "cpu",
    progress: bool = True,
    console: Optional[Console] = None,
) -> PreprocessReport:
    """Write (or reuse) instance masks and per-mask embeddings for every image of a nerfstudio dataset.

    Args:
        dataset: dataset folder (or its transforms.json); images come from transforms.json frames, else images/.
        mask_source: where masks come from (a source, or its config, set up on ``device``).
        embedding_source: how masks are embedded (a source, or its config, set up on ``device``).
        stems: only these image stems (default: all images).
        force: recompute everything requested, and let a mask generator replace instance files it did not write
            (e.g. ground truth).
        progress: show a rich progress bar.

    Returns:
        A :class:`PreprocessReport`; the sidecars of the processed images pass ``validate_dataset``.

    Raises:
        MissingWeightsError: model weights not found (before any file is written).
        FileExistsError: a mask generator would replace instance sidecars it did not write (pass force).
        SidecarError: missing or invalid sidecars (input, or output validation).
        ValueError: incompatible sources (label embeddings need object-id masks), unknown stems.
    """
    start = time.perf_counter()
    console = console or Console()
    root = dataset_root(dataset)
    masks = mask_source if isinstance(mask_source, MaskSource) else mask_source.setup(device=device)
    embed = embedding_source if isinstance(embedding_source, EmbeddingSource) else embedding_source.setup(device=device)
    if embed.needs_object_ids and not masks.object_ids:
        raise ValueError(
            f"{embed.provider} embeddings look object names up by mask id, but {masks.name} masks carry no object "
            "ids; use --masks sidecar (masks whose ids are scene.json objects) or --embeddings clip"
        )
    images = list_images(root)
    all_stems = [p.stem for p in images]
    dupes = sorted({s for s in all_stems if all_stems.count(s) > 1})
    if dupes:
        raise ValueError(f"image stems {dupes[:5]} appear twice in {root}; sidecars are keyed by stem, rename them")
    index_of = {s: i for i, s in enumerate(all_stems)}
    selected = list(dict.fromkeys(stems)) if stems is not None else all_stems
    unknown = [s for s in selected if s not in index_of]
    if unknown:
        raise ValueError(f"unknown image stem(s) {unknown[:5]} (dataset has e.g. {all_stems[:3]})")

    masks.check(root)
    embed.check(root)
    embed.prepare(root)
    mask_fp, embed_fp = masks.fingerprint(), embed.fingerprint()
    mask_hash, embed_hash = fingerprint_hash(mask_fp), fingerprint_hash(embed_fp)

    manifest = load_manifest(root, console)
    before = json.dumps(manifest, sort_keys=True)
    records: Dict[str, Dict[str, Any]] = manifest["images"]
    if stems is None:
        for stale in [s for s in records if s not in index_of]:
            del records[stale]
    _precheck(root, selected, records, masks, embed, force)

    report = PreprocessReport(root, selected, masks.name, embed.provider, embed.dim, manifest=manifest_path(root))
    columns = (TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    last_save = time.monotonic()
    try:
        with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task(f"preprocessing ({masks.name} masks, {embed.provider})", total=len(selected))
            for stem in selected:
                item = ImageItem(root, stem, images[index_of[stem]], index_of[stem])
                rec = records.setdefault(stem, {})
                _process(item, rec, masks, embed, mask_hash, embed_hash, force, report)
                bar.advance(task)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    _write_manifest(manifest_path(root), manifest)
                    last_save = time.monotonic()
    finally:
        ours = any(_is_ours(root, s, r) for s, r in records.items())
        manifest.update(
            version=MANIFEST_VERSION,
            tool="gs-preprocess",
            instance_ids="masks" if ours else "objects",
            masks={"source": masks.name, "config_hash": mask_hash, "config": mask_fp},
            embeddings={
                "source": embed.name,
                "provider": embed.provider,
                "dim": embed.dim,
                "config_hash": embed_hash,
                "config": embed_fp,
            },
        )
        if json.dumps(manifest, sort_keys=True) != before:
            _write_manifest(manifest_path(root), manifest)

    # the manifest's "instance_ids" tells the validator whether ids are object ids or (SAM) mask numbers
    processed = [images[index_of[s]] for s in selected]
    validate_dataset(root, processed, [_image_hw(p) for p in processed], require=("instances", "embeddings"))
    report.seconds = time.perf_counter() - start
    return report


def _precheck(
    root: Path,
    stems: List[str],
    records: Dict[str, Dict[str, Any]],
    masks: MaskSource,
    embed: EmbeddingSource,
    force: bool,
) -> None:
    """Problems found before any work: missing inputs, files a generator must not replace, label on SAM masks."""
    paths = {s: layout.instance_path(root, s) for s in stems}
    if not masks.writes_instances:
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise SidecarError(
                f"--masks {masks.name} reads existing instance sidecars, but {len(missing)} are missing, e.g. "
                f"{missing[:3]}; compute them with --masks sam, or export them from your mask tool "
                "(format: gsstudio_ext/data/layout.py)"
            )
        if embed.needs_object_ids:
            generated = [s for s in stems if _is_ours(root, s, records.get(s, {}))]
            if generated:
                raise ValueError(
                    f"the instance sidecars of {len(generated)} image(s) (e.g. {generated[:3]}) were written by "
                    f"gs-preprocess with a mask generator: their ids are mask numbers, not object ids, so "
                    f"{embed.provider} embeddings cannot name them; use --embeddings clip"
                )
    elif not force:
        foreign = [s for s in stems if paths[s].exists() and not _is_ours(root, s, records.get(s, {}))]
        if foreign:
            raise FileExistsError(
                f"{len(foreign)} instance sidecar(s) in {paths[foreign[0]].parent} were not written by gs-preprocess "
                f"(e.g. ground truth from gs-synth or masks from another tool: {foreign[:3]}); --masks {masks.name} "
                "would replace them. Use --masks sidecar to keep and embed them, or --force to replace them"
            )


def _process(
    item: ImageItem,
    rec: Dict[str, Any],
    masks: MaskSource,
    embed: EmbeddingSource,
    mask_hash: str,
    embed_hash: str,
    force: bool,
    report: PreprocessReport,
) -> None:
    """Bring the sidecars of one image up to date, updating its manifest record ``rec`` after each write."""
    root, stem = item.root, item.stem
    image_sha = ""
    if masks.uses_image or embed.uses_image:
        rec["image"] = file_digest(item.path, rec.get("image"))
        image_sha = rec["image"]["sha256"]
    inst_path = layout.instance_path(root, stem)
    fresh: Optional[Tuple[Any, Any]] = None
    if masks.writes_instances:
        made = rec.get("masks") or {}
        current = (
            not force
            and made.get("source") == masks.name
            and made.get("config") == mask_hash
            and made.get("image") == image_sha
            and _same(inst_path, rec.get("instances"))
        )
        if not current:
            ids, stack = masks(item)
            write_instances(root, stem, ids, stack)
            rec["instances"] = file_digest(inst_path)
            rec["masks"] = {"source": masks.name, "config": mask_hash, "image": image_sha}
            report.computed_masks.append(stem)
            report.num_masks[stem] = int(len(ids))
            fresh = (ids, stack)
    else:
        previous = rec.get("instances")
        rec["instances"] = file_digest(inst_path, previous)
        if previous and rec["instances"]["sha256"] != previous.get("sha256"):
            rec.pop("masks", None)  # replaced from outside: no longer the generator's output
    key = rec["instances"]["sha256"] + (":" + image_sha if embed.uses_image else "")
    made = rec.get("embeddings") or {}
    emb_path = layout.embedding_path(root, stem)
    current = (
        not force
        and made.get("config") == embed_hash
        and made.get("input") == key
        and made.get("provider") == embed.provider
        and _same(emb_path, made.get("file"))
    )
    if current:
        return
    ids, stack = fresh if fresh is not None else read_instances(inst_path)
    features = embed(item, ids, stack)
    write_embeddings(root, stem, ids, features, embed.provider)
    rec["embeddings"] = {"config": embed_hash, "input": key, "provider": embed.provider, "file": file_digest(emb_path)}
    report.computed_embeddings.append(stem)
    report.num_masks.setdefault(stem, int(len(ids)))


def _image_hw(path: Path) -> Tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width
