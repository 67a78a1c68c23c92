"""``gs-refer-masks``: pseudo target masks of referring expressions (Grounding DINO box + SAM), cached in
``<data>/sidecars``, for training ``referspat-ext`` on real scenes.

Examples::

    gs-refer-masks --data data/ramen --expressions ramen.txt --sam-checkpoint ~/weights/sam_vit_h_4b8939.pth
    gs-refer-masks --data data/ramen --sam-checkpoint ~/weights/sam_vit_h_4b8939.pth   # re-run: same expressions
    gs-refer-masks --data /tmp/scene --expressions e.txt --detector tiny --segmenter tiny   # offline smoke test

``--expressions`` is a text file with one expression per line (blank lines and '#' comments skipped). Re-running
with the same settings and images does nothing; new expressions, changed images or settings recompute only what they
affect (cache manifest: sidecars/referring_masks.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence

import torch
import tyro
from rich.console import Console

from gsstudio_ext.data.referring_masks import ReferringMasksReport, make_referring_masks, read_expression_file
from gsstudio_ext.data.sidecars import SidecarError
from gsstudio_ext.models.errors import MissingWeightsError
from gsstudio_ext.models.registry import box_segmenter_config, detector_config

CONSOLE = Console()


@dataclass
class ReferMasksCommand:
    """Make per-frame pseudo masks of referring expressions with an open-vocabulary detector and SAM (cached)."""

    data: Path
    """Dataset folder (transforms.json or COLMAP images/); sidecars are written to <data>/sidecars."""
    expressions: Optional[Path] = None
    """Text file, one referring expression per line. Default: the expressions of a previous gs-refer-masks run."""
    detector: Literal["grounding-dino", "tiny"] = "grounding-dino"
    """Box detector: grounding-dino (transformers, real weights) or tiny (random weights, tests only)."""
    detector_model: str = "IDEA-Research/grounding-dino-tiny"
    """Grounding DINO hub id (looked up in the local HF cache) or local folder."""
    box_threshold: float = 0.35
    """Keep a box whose score exceeds this (Grounded-SAM: 0.35)."""
    text_threshold: float = 0.25
    """...and one of whose phrase tokens scores above this (Grounded-SAM: 0.25)."""
    allow_download: bool = False
    """Let transformers download missing Grounding DINO weights."""
    segmenter: Literal["sam", "tiny"] = "sam"
    """Box-prompted segmenter: sam (released checkpoint, --sam-checkpoint) or tiny (random weights, tests only)."""
    sam_checkpoint: Optional[Path] = None
    """SAM checkpoint file, e.g. sam_vit_h_4b8939.pth (needed with --segmenter sam)."""
    sam_model_type: str = "vit_h"
    """SAM backbone of the checkpoint: vit_h, vit_l or vit_b."""
    overwrite: bool = False
    """Replace scene.json, expressions.json and instance masks that gs-refer-masks did not write (e.g. ground truth)."""
    device: Optional[str] = None
    """Torch device for the models (default: cuda when available, else cpu)."""
    progress: bool = True
    """Show a progress bar."""


def run(cmd: ReferMasksCommand) -> ReferringMasksReport:
    """Run ``cmd``; returns the report (also printed)."""
    device = cmd.device or ("cuda" if torch.cuda.is_available() else "cpu")
    thresholds = {"box_threshold": cmd.box_threshold, "text_threshold": cmd.text_threshold}
    if cmd.detector == "grounding-dino":
        detector = detector_config(
            "grounding-dino", model_name_or_path=cmd.detector_model, allow_download=cmd.allow_download, **thresholds
        )
    else:
        detector = detector_config("tiny", **thresholds)
    if cmd.segmenter == "sam":
        segmenter = box_segmenter_config("sam", checkpoint=cmd.sam_checkpoint, model_type=cmd.sam_model_type)
    else:
        segmenter = box_segmenter_config("tiny")
    texts: Optional[List[str]] = read_expression_file(cmd.expressions) if cmd.expressions is not None else None
    report = make_referring_masks(
        cmd.data,
        texts,
        detector,
        segmenter,
        overwrite=cmd.overwrite,
        device=device,
        progress=cmd.progress,
        console=CONSOLE,
    )
    state = "[green]up to date (all cached)[/green]" if report.all_cached else "[green]done[/green]"
    CONSOLE.print(f"gs-refer-masks {state}: {report.summary()}")
    if report.not_found:
        CONSOLE.print(f"[yellow]no mask in any frame for: {report.not_found[:10]}[/yellow]")
    CONSOLE.print(
        f"sidecars: {report.dataset / 'sidecars'} (scene.json, expressions.json, instances/), cache: {report.manifest}"
    )
    CONSOLE.print("train with: --pipeline.datamanager.sidecars instances expressions")
    return report


def main(args: Optional[Sequence[str]] = None) -> ReferringMasksReport:
    """Parse ``args`` (default: sys.argv) and run; user errors exit with status 2 and a one-paragraph message."""
    cmd = tyro.cli(ReferMasksCommand, args=args)
    try:
        return run(cmd)
    except (MissingWeightsError, SidecarError, FileNotFoundError, FileExistsError, ValueError) as err:
        CONSOLE.print(f"[red]gs-refer-masks: {err}[/red]")
        raise SystemExit(2) from err


def entrypoint() -> None:
    """Console script ``gs-refer-masks``."""
    main()


if __name__ == "__main__":
    entrypoint()
