"""``gs-rtgs2-eval``: segment unseen scenes with a trained rtgs2-ext model and score them (spec §4.6).

Examples::

    gs-rtgs2-eval --run outputs/bench/rtgs2-ext/run/config.yml                    # the run's unseen scenes
    gs-rtgs2-eval --run .../config.yml --data data/other_set --scenes room_2 office_3 --out eval/rtgs2

Per scene, the Gaussian features are baked once; every test view is then one fused render (RGB + features) and one
pass of the fusion net. Writes to ``<out>``: pooled and per-scene metrics (JSON), per-class tables
(Markdown) and confusion-matrix PNGs, plus the predicted class maps (PNG, colour-coded) with ``--save-predictions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import tyro
from PIL import Image
from rich.console import Console

from gsstudio_ext.eval.semantic_segmentation import per_class_table

CONSOLE = Console()


@dataclass
class RTGS2EvalCommand:
    """Evaluate a trained rtgs2-ext model on unseen scenes: pooled mIoU / mAcc / oAcc, per-class tables, PNGs."""

    run: Path
    """config.yml of a trained rtgs2-ext run."""
    data: Optional[Path] = None
    """Multi-scene folder (scenes.json) or one dataset; default: the run's own data."""
    scenes: Tuple[str, ...] = ()
    """Scenes to evaluate; default: those marked "unseen" (or the single dataset)."""
    out: Path = Path("eval/rtgs2")
    """Output folder."""
    max_views: Optional[int] = None
    """At most this many test views per scene (evenly spaced)."""
    save_predictions: bool = False
    """Also write every predicted class map as a colour PNG."""


def run(cmd: RTGS2EvalCommand) -> Dict[str, float]:
    from nerfstudio.utils.eval_utils import eval_setup

    def configure(config):
        dm = config.pipeline.datamanager
        if cmd.data is not None:
            dm.data = Path(cmd.data)
        dm.eval_scenes = tuple(cmd.scenes)
        dm.load_train = False
        dm.max_eval_views = cmd.max_views
        return config

    if not Path(cmd.run).is_file():
        raise FileNotFoundError(f"no run config at {cmd.run}: pass the config.yml written by ns-train")
    _, pipeline, _, _ = eval_setup(Path(cmd.run), test_mode="test", update_config_callback=configure)
    out = Path(cmd.out)
    metrics = pipeline.get_average_eval_image_metrics(output_path=out)
    classes = pipeline.model.classes
    protocol = "cross_scene" if pipeline.datamanager.unseen_names else "novel_view"
    pooled = pipeline.last_confusion[protocol]
    for name, matrix in pooled.items():
        CONSOLE.print(per_class_table(matrix, classes, title=f"{name}"))
    if cmd.save_predictions:
        for name in pooled:
            for scene, index in pipeline.datamanager.eval_views([name]):
                ids = pipeline.segment(scene, index)
                colours = (pipeline.model.palette[ids].cpu().numpy() * 255).astype(np.uint8)
                stem = pipeline.datamanager.scenes[scene].test.stems[index]
                path = out / "predictions" / scene / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(colours).save(path)
    CONSOLE.print(
        "[bold]cross-scene[/bold] "
        + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("miou", "macc", "oacc") if k in metrics)
    )
    CONSOLE.print(f"report: {out}")
    return metrics


def entrypoint() -> None:
    run(tyro.cli(RTGS2EvalCommand))


if __name__ == "__main__":
    entrypoint()
