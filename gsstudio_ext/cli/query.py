"""``gs-query``: render a text query of a trained run for a dataset split or a camera path, without the viewer.

Examples::

    gs-query --load-config outputs/scene/ag2aussian-ext/run/config.yml --query mug --output-dir renders/mug
    gs-query --load-config RUN/config.yml --query plant --negatives table --split train --outputs selection rgb
    gs-query --load-config RUN/config.yml --query duck --camera-path RUN/camera_paths/orbit.json --output-dir out
    gs-query --load-config outputs/scene/referspat-ext/run/config.yml --query "the mug left of the duck" --output-dir o

Files written (the layout of ``ns-render dataset``: one folder per output, one image per frame)::

    DIR/selection/<frame>.png   mask of the selected Gaussians: 255 where their rendered coverage >= --mask-threshold,
                                else 0 (8-bit grey); referspat-ext: its rendered referring mask
    DIR/relevancy/<frame>.png   relevancy of what each pixel shows, 8-bit grey (255 = 1.0, clamped to 0..1; without
                                --negatives it is the cosine similarity to the query; referspat-ext: the rendered
                                referring probability)
    DIR/rgb/<frame>.png         the colour render, the selection shown per --mode
    DIR/query.json              query, embedding provider, number of selected Gaussians, frames and files written

``<frame>`` is the image stem for a dataset split and ``frame_00000``, ``frame_00001`` ... for a camera path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from gsstudio_ext.core.atomic import write_json_atomic
from gsstudio_ext.core.checkpoint import find_latest_checkpoint

CONSOLE = Console()

OutputName = Literal["selection", "relevancy", "rgb"]
QUERY_FILE = "query.json"


class QueryError(RuntimeError):
    """The run cannot answer text queries (a method without them, or a model without a language index)."""


@dataclass
class QueryCommand:
    """Render a text query of a trained run (selection masks, relevancy, RGB) for every camera of a split or path."""

    load_config: Path
    """The run's config.yml (written by ns-train)."""
    query: str
    """Text to look for, e.g. "mug"."""
    output_dir: Path
    """Folder for the images (DIR/<output>/<frame>.png) and query.json."""
    negatives: Tuple[str, ...] = ()
    """Phrases the selection must be less like than the query (e.g. table)."""
    threshold: Optional[float] = None
    """Minimum similarity of the best match; None = the method's default."""
    split: Literal["train", "val", "test"] = "test"
    """Dataset split whose cameras are rendered (ignored with --camera-path)."""
    camera_path: Optional[Path] = None
    """A nerfstudio camera path (camera_path.json from the viewer's render panel) to render instead of a split."""
    outputs: Tuple[OutputName, ...] = ("selection", "relevancy", "rgb")
    """Images to write per frame."""
    mode: Literal["highlight", "isolate", "remove"] = "highlight"
    """How the selection shows in rgb: highlight (tinted), isolate (only it), remove (all but it)."""
    mask_threshold: float = 0.5
    """Rendered coverage of the selected Gaussians from which a pixel is in the selection mask."""


# ---------------------------------------------------------------------------------------------------- shared helpers


def check_query_text(text: str) -> str:
    """``text`` if it has something to look for, else ``ValueError`` (checked before any loading)."""
    if not text.strip():
        raise ValueError("empty text query: type what to look for, e.g. --query mug")
    return text


def check_run(config_path: Path) -> Path:
    """The checkpoint a run's ``config.yml`` will load; a clear error for a missing config or checkpoint."""
    import yaml
    from nerfstudio.engine.trainer import TrainerConfig

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"no run config at {config_path}: pass the config.yml written by ns-train")
    try:
        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, ImportError) as err:
        raise ValueError(f"{config_path} is not a readable nerfstudio run config: {err}") from err
    if not isinstance(config, TrainerConfig):
        raise ValueError(f"{config_path} is not a nerfstudio run config (it holds a {type(config).__name__})")
    try:
        return find_latest_checkpoint(config.get_checkpoint_dir())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"run {config_path} has no checkpoint to load: {err}") from err


def load_query_run(config_path: Path, test_mode: Literal["test", "val", "inference"] = "test"):
    """(config, pipeline) of a run after :func:`check_run`, on the device ``load_run`` picks."""
    from gsstudio_ext.methods.base.training import load_run

    check_run(config_path)
    return load_run(config_path, test_mode=test_mode)


def run_text_query(model, text: str, negatives: Sequence[str] = (), threshold: Optional[float] = None) -> Tensor:
    """The model's text query (children [N] bool; it becomes the live selection); ``QueryError`` when the model has
    no text queries."""
    check_query_text(text)
    if not callable(getattr(model, "text_query", None)):
        raise QueryError(
            f"this method has no text queries ({type(model).__name__}); train a method with language features, "
            "e.g. ns-train ag2aussian-ext on a dataset prepared with gs-preprocess"
        )
    try:
        return model.text_query(text, tuple(negatives), threshold)
    except RuntimeError as err:  # the model's "no language index" error
        raise QueryError(str(err)) from err


def query_provider(model) -> Optional[str]:
    """Embedding provider of the model's language index (e.g. "label:minilm"), if it has one."""
    language = getattr(model, "language", None)
    return getattr(language, "provider", None)


# ---------------------------------------------------------------------------------------------------- frames


def split_frames(pipeline, split: str) -> Tuple[Cameras, List[str]]:
    """Cameras and image stems of a split of the run's datamanager (``val``/``test`` = its eval dataset, loaded for
    that split by :func:`load_query_run`)."""
    datamanager = pipeline.datamanager
    dataset = datamanager.train_dataset if split == "train" else datamanager.eval_dataset
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the run's dataset has no {split} images")
    return dataset.cameras, _unique([Path(name).stem for name in dataset.image_filenames])


def camera_path_frames(path: Path) -> Tuple[Cameras, List[str]]:
    """Cameras of a nerfstudio ``camera_path.json`` and their frame names ``frame_00000`` ..."""
    from nerfstudio.cameras.camera_paths import get_path_from_json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no camera path at {path}: export one from the viewer's render panel")
    try:
        cameras = get_path_from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path} is not a nerfstudio camera path (expected render_width, render_height and camera_path entries "
            f"with camera_to_world and fov): {type(err).__name__}: {err}"
        ) from err
    if len(cameras) == 0:
        raise ValueError(f"camera path {path} has no cameras")
    return cameras, [f"frame_{i:05d}" for i in range(len(cameras))]


def _unique(stems: List[str]) -> List[str]:
    """Stems as given, or index-prefixed when two images share one (images from different folders)."""
    return stems if len(set(stems)) == len(stems) else [f"{i:05d}_{s}" for i, s in enumerate(stems)]


# ---------------------------------------------------------------------------------------------------- images


def named_outputs(model, rendered: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The render with gs-query's names added for models that call them otherwise (``model.query_outputs``)."""
    aliases = getattr(model, "query_outputs", {})
    return {**rendered, **{name: rendered[own] for name, own in aliases.items() if own in rendered}}


def output_image(name: str, outputs: Dict[str, Tensor], mask_threshold: float) -> np.ndarray:
    """8-bit image of one output: selection 0/255 mask [H, W], relevancy grey [H, W], rgb [H, W, 3]."""
    if name not in outputs:
        raise RuntimeError(f"the render has no {name!r} output (got {sorted(outputs)})")
    value = outputs[name].detach().float().cpu()
    if name == "selection":
        return ((value[..., 0] >= mask_threshold).to(torch.uint8) * 255).numpy()
    if name == "relevancy":
        value = value[..., 0]
    return (value.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------- command


def run(cmd: QueryCommand) -> Dict[str, Any]:
    """Run ``cmd``: query, render every frame with a progress bar, write the images and query.json (returned)."""
    check_query_text(cmd.query)
    if not cmd.outputs:
        raise ValueError("no --outputs to write: choose from selection, relevancy, rgb")
    if cmd.camera_path is not None and not Path(cmd.camera_path).is_file():
        raise FileNotFoundError(f"no camera path at {cmd.camera_path}: export one from the viewer's render panel")
    config, pipeline = load_query_run(cmd.load_config, test_mode="val" if cmd.split == "val" else "test")
    model = pipeline.model
    if cmd.camera_path is not None:
        cameras, frames = camera_path_frames(cmd.camera_path)
        source: Dict[str, Any] = {"camera_path": str(cmd.camera_path)}
    else:
        cameras, frames = split_frames(pipeline, cmd.split)
        source = {"split": cmd.split}

    selected = run_text_query(model, cmd.query, cmd.negatives, cmd.threshold)
    num_selected = int(selected.sum())
    if num_selected == 0:
        CONSOLE.print(f"[yellow]gs-query: {cmd.query!r} selected no Gaussians; the masks will be empty[/yellow]")
    outputs = list(dict.fromkeys(cmd.outputs))
    out_dir = Path(cmd.output_dir)
    for name in outputs:
        (out_dir / name).mkdir(parents=True, exist_ok=True)

    frame_records: List[Dict[str, Any]] = []
    previous_mode = model.config.query.mode
    model.config.query.mode = cmd.mode
    model.eval()
    columns = (
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(elapsed_when_finished=True, compact=True),
    )
    try:
        with Progress(*columns, console=CONSOLE, transient=True) as bar:
            for index in bar.track(range(len(frames)), description=f"rendering {cmd.query!r}"):
                camera = cameras[index : index + 1].to(model.device)
                with torch.no_grad():
                    rendered = model.get_outputs_for_camera(camera)
                record: Dict[str, Any] = {"frame": frames[index], "files": {}}
                for name in outputs:
                    image = output_image(name, named_outputs(model, rendered), cmd.mask_threshold)
                    relative = f"{name}/{frames[index]}.png"
                    Image.fromarray(image).save(out_dir / relative)
                    record["files"][name] = relative
                    if name == "selection":
                        record["selected_pixels"] = int((image > 0).sum())
                frame_records.append(record)
    finally:
        model.config.query.mode = previous_mode
        model.query_state.undo()  # the pipeline is ours, but leave the model as it came

    settings = getattr(model.config, "text_query_settings", None)
    summary: Dict[str, Any] = {
        "query": cmd.query,
        "negatives": list(cmd.negatives),
        "threshold": next(
            (
                t
                for t in (cmd.threshold, getattr(settings, "threshold", None), model.config.query.threshold)
                if t is not None
            ),
            None,
        ),  # fmt: skip
        "provider": query_provider(model),
        "method": config.method_name,
        "load_config": str(cmd.load_config),
        "num_selected": num_selected,
        "num_gaussians": int(model.num_points),
        "source": source,
        "mode": cmd.mode,
        "mask_threshold": cmd.mask_threshold,
        "outputs": outputs,
        "frames": frame_records,
        "files": [path for record in frame_records for path in record["files"].values()],
    }
    write_json_atomic(out_dir / QUERY_FILE, summary)
    CONSOLE.print(
        f"[green]gs-query: {cmd.query!r} selected {num_selected} of {model.num_points} Gaussians[/green]"
        + (f" (provider {summary['provider']})" if summary["provider"] else "")
        + f"; wrote {len(frames)} frame(s) x {', '.join(outputs)} to {out_dir}"
    )
    if summary["provider"] and str(summary["provider"]).startswith("label:"):
        CONSOLE.print("[yellow]note: language features are label-derived (object names), not CLIP[/yellow]")
    return summary


def main(args: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``args`` (default: sys.argv) and run; user errors exit with status 2 and a one-paragraph message
    (the original exception is the ``SystemExit``'s ``__cause__``)."""
    cmd = tyro.cli(QueryCommand, args=args)
    try:
        return run(cmd)
    except (FileNotFoundError, ValueError, QueryError) as err:
        CONSOLE.print(f"[red]gs-query: {err}[/red]")
        raise SystemExit(2) from err


def entrypoint() -> None:
    """Console script ``gs-query``."""
    main()


if __name__ == "__main__":
    entrypoint()
