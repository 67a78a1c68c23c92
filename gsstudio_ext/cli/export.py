"""``gs-export``: write a trained run's Gaussians, or the ones a text query selects, as a standard 3DGS ``.ply``.

Examples::

    gs-export --load-config outputs/scene/ag2aussian-ext/run/config.yml --output scene.ply   # whole scene
    gs-export --load-config RUN/config.yml --output mug.ply --query mug --negatives table  # only the mug
    gs-export --load-config RUN/config.yml --output marked.ply --query mug --no-selection-only

The file is the layout of the original 3DGS code and ``ns-export gaussian-splat`` (``x y z``, ``f_dc_*``,
``f_rest_*``, ``opacity`` (logit), ``scale_*`` (log), ``rot_*`` (wxyz), see :mod:`gsstudio_ext.core.ply`), so any
3DGS viewer opens it; extra per-Gaussian properties follow:

- ``instance_id`` (int): the instance (super-anchor) of each Gaussian, for methods with instances (ag2aussian-ext);
- ``instance_feature_0..D-1`` and a method's other per-Gaussian tensors (e.g. ``feature_*`` of gsstudio-splatfacto);
- ``selected`` (uchar 0/1) with ``--query ... --no-selection-only``.

Anchor-structured methods are written as their child Gaussians at world positions. At SH degree 0, splatfacto's
logit colours are converted to the standard DC coefficient. The write is atomic: a failed export (including a query
that selects nothing) leaves no partial file and keeps an existing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import tyro
from rich.console import Console

from gsstudio_ext.cli.query import QueryError, check_query_text, load_query_run, query_provider, run_text_query
from gsstudio_ext.core.ply import write_ply
from gsstudio_ext.methods.base.scene_export import model_scene

CONSOLE = Console()


@dataclass
class ExportCommand:
    """Export a trained run's Gaussians (or a text query's selection) as a standard 3DGS .ply."""

    load_config: Path
    """The run's config.yml (written by ns-train)."""
    output: Path
    """The .ply file to write (atomically)."""
    query: Optional[str] = None
    """Text query; without it the whole scene is written."""
    negatives: Tuple[str, ...] = ()
    """Phrases the selection must be less like than the query (e.g. table)."""
    threshold: Optional[float] = None
    """Minimum similarity of the best match; None = the method's default."""
    selection_only: bool = True
    """With --query: write only the selected Gaussians; --no-selection-only writes the whole scene with a 0/1
    "selected" property."""


@dataclass
class ExportReport:
    """What an export wrote."""

    path: Path
    """The .ply file."""
    num_written: int
    """Gaussians in the file."""
    num_gaussians: int
    """Gaussians of the model."""
    num_selected: Optional[int]
    """Gaussians the query selected (None without a query)."""


def _comment(text: str) -> str:
    """A single-line, ASCII header comment."""
    return " ".join(text.encode("ascii", "backslashreplace").decode("ascii").split())


def run(cmd: ExportCommand) -> ExportReport:
    """Run ``cmd``; returns what was written."""
    output = Path(cmd.output)
    if output.suffix.lower() != ".ply":
        raise ValueError(f"--output must be a .ply file; got {output}")
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; name the .ply file to write")
    if cmd.query is not None:
        check_query_text(cmd.query)
    config, pipeline = load_query_run(cmd.load_config)
    model = pipeline.model
    scene = model_scene(model)
    comments: List[str] = [_comment(f"gs-export of a {config.method_name} run: {cmd.load_config}")]
    num_selected: Optional[int] = None
    if cmd.query is not None:
        selected = run_text_query(model, cmd.query, cmd.negatives, cmd.threshold).detach().cpu()
        model.query_state.undo()
        num_selected = int(selected.sum())
        if num_selected == 0:
            raise ValueError(
                f"query {cmd.query!r} selected no Gaussians; nothing written to {output}. Try other words, "
                "a lower --threshold or fewer --negatives"
            )
        comments.append(
            _comment(
                f"gs-export query {cmd.query!r} negatives {list(cmd.negatives)} threshold {cmd.threshold} "
                f"provider {query_provider(model)}: {num_selected} of {scene.num_gaussians} Gaussians selected"
            )
        )
        if cmd.selection_only:
            scene = scene.subset(selected)
        else:
            scene.extras["selected"] = selected
    write_ply(output, scene, comments)
    report = ExportReport(output, scene.num_gaussians, int(model.num_points), num_selected)
    what = "selected " if cmd.query is not None and cmd.selection_only else ""
    CONSOLE.print(
        f"[green]gs-export: wrote {report.num_written} {what}Gaussians (of {report.num_gaussians}) to {output}"
        f"[/green]; extra properties: {', '.join(scene.extras) or 'none'}"
    )
    return report


def main(args: Optional[Sequence[str]] = None) -> ExportReport:
    """Parse ``args`` (default: sys.argv) and run; user errors exit with status 2 and a one-paragraph message
    (the original exception is the ``SystemExit``'s ``__cause__``)."""
    cmd = tyro.cli(ExportCommand, args=args)
    try:
        return run(cmd)
    except (FileNotFoundError, ValueError, QueryError) as err:  # SceneIOError is a ValueError
        CONSOLE.print(f"[red]gs-export: {err}[/red]")
        raise SystemExit(2) from err


def entrypoint() -> None:
    """Console script ``gs-export``."""
    main()


if __name__ == "__main__":
    entrypoint()
