"""``gs-preprocess``: per-image instance masks + per-mask embeddings for a dataset, cached in ``<data>/sidecars``.

Examples::

    gs-preprocess --data data/figurines --masks sam --sam.checkpoint ~/weights/sam_vit_h_4b8939.pth
    gs-preprocess --data data/synth --masks sidecar --embeddings label       # offline: GT masks + object names
    gs-preprocess --data data/figurines --masks sidecar --embeddings clip --clip.resize-mode longest

Re-running with the same settings and images does nothing; changed images or settings recompute only what they
affect (cache manifest: sidecars/preprocess.json). ``--force`` recomputes everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Tuple

import torch
import tyro
from rich.console import Console

from gsstudio_ext.data.embedding_sources import ClipCropEmbeddingConfig, LabelEmbeddingConfig
from gsstudio_ext.data.mask_sources import SamMaskSourceConfig, SidecarMaskSourceConfig
from gsstudio_ext.data.preprocess import PreprocessReport, preprocess_dataset
from gsstudio_ext.data.sidecars import SidecarError
from gsstudio_ext.models.errors import MissingWeightsError

CONSOLE = Console()


@dataclass
class PreprocessCommand:
    """Extract instance masks and per-mask embeddings of every image of a dataset (cached)."""

    data: Path
    """Dataset folder (transforms.json or COLMAP images/); sidecars are written to <data>/sidecars."""
    masks: Literal["sam", "sidecar"] = "sam"
    """Mask source: sam (automatic generator + mask NMS, needs --sam.checkpoint) or sidecar (the dataset's own
    sidecars/instances: synthetic ground truth or masks precomputed by any tool; left untouched)."""
    embeddings: Literal["clip", "label"] = "clip"
    """Embedding source: clip (open_clip on masked crops) or label (object names through a text encoder, offline;
    needs --masks sidecar with object ids; marked label:<encoder> in the outputs)."""
    sam: SamMaskSourceConfig = field(default_factory=SamMaskSourceConfig)
    """SAM settings (used with --masks sam)."""
    clip: ClipCropEmbeddingConfig = field(default_factory=ClipCropEmbeddingConfig)
    """CLIP crop settings (used with --embeddings clip)."""
    label: LabelEmbeddingConfig = field(default_factory=LabelEmbeddingConfig)
    """Label settings (used with --embeddings label)."""
    stems: Tuple[str, ...] = ()
    """Only these image stems (default: every image)."""
    force: bool = False
    """Recompute everything, and let --masks sam replace instance sidecars it did not write (e.g. ground truth)."""
    device: Optional[str] = None
    """Torch device for the models (default: cuda when available, else cpu)."""
    progress: bool = True
    """Show a progress bar."""


def run(cmd: PreprocessCommand) -> PreprocessReport:
    """Run ``cmd``; returns the report (also printed)."""
    device = cmd.device or ("cuda" if torch.cuda.is_available() else "cpu")  # same rule as training's default
    masks = cmd.sam if cmd.masks == "sam" else SidecarMaskSourceConfig()
    embeddings = cmd.clip if cmd.embeddings == "clip" else cmd.label
    report = preprocess_dataset(
        cmd.data,
        masks,
        embeddings,
        stems=list(cmd.stems) or None,
        force=cmd.force,
        device=device,
        progress=cmd.progress,
        console=CONSOLE,
    )
    state = "[green]up to date (all cached)[/green]" if report.all_cached else "[green]done[/green]"
    CONSOLE.print(f"gs-preprocess {state}: {report.summary()}")
    CONSOLE.print(f"sidecars: {report.dataset / 'sidecars'} (instances/, embeddings/), cache: {report.manifest}")
    if report.provider.startswith("label:"):
        CONSOLE.print("[yellow]note: embeddings are label-derived (object names), not CLIP image features[/yellow]")
    return report


def main(args: Optional[Sequence[str]] = None) -> PreprocessReport:
    """Parse ``args`` (default: sys.argv) and run; user errors exit with status 2 and a one-paragraph message."""
    cmd = tyro.cli(PreprocessCommand, args=args)
    try:
        return run(cmd)
    except (MissingWeightsError, SidecarError, FileNotFoundError, FileExistsError, ValueError) as err:
        CONSOLE.print(f"[red]gs-preprocess: {err}[/red]")
        raise SystemExit(2) from err


def entrypoint() -> None:
    """Console script ``gs-preprocess``."""
    main()


if __name__ == "__main__":
    entrypoint()
