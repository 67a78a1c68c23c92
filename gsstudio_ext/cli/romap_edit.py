"""``gs-romap-edit``: scripted RoMaP part edits of a trained romap-ext run.

Examples::

    gs-romap-edit --run outputs/chair/romap-ext/run/config.yml --part legs --prompt "gold"
    gs-romap-edit --run .../config.yml --parts hat head body --base-prompt "a snowman" --part hat --prompt "red striped"

With ``--parts`` the label field is fitted again for the new part list first (3D-GALP); otherwise the run's own
labels are used. The edit changes only the part's Gaussians. Writes to ``<out>``: ``edited.ply`` (the edited scene
with a ``part_id`` column), the edit report (metrics JSON, Markdown, before/after grid PNG) and, unless
``--no-save-checkpoint``, a new checkpoint in the run so that ``ns-render --rendered-output-names edited_rgb`` and
the viewer show the edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal, Tuple

import tyro
from rich.console import Console
from rich.progress import Progress

from gsstudio_ext.eval.part_editing import write_edit_report

CONSOLE = Console()


@dataclass
class RoMaPEditCommand:
    """Edit one part of a trained romap-ext run and write the edited .ply, a report and a checkpoint."""

    run: Path
    """config.yml of a romap-ext run."""
    part: str
    """Part to edit (one of the run's parts, or of --parts)."""
    prompt: str
    """Edit prompt, e.g. "gold" or "blue striped" (procedural) or "a golden chair leg" (SLaMP)."""
    parts: Tuple[str, ...] = ()
    """New part list to segment first (smaller parts first; words of one part joined by '+'); empty: the run's."""
    base_prompt: str = ""
    """New base prompt for the segmentation (with --parts); empty: the run's."""
    provider: Literal["run", "procedural", "slamp"] = "run"
    """2D edit provider: the run's setting, the offline procedural editor, or SLaMP (SD3 weights)."""
    steps: int = 0
    """Edit optimisation steps; 0 = the run's setting."""
    clip: Literal["openclip", "tiny", "none"] = "openclip"
    """CLIP for the report's CLIP score / CLIPdir: RoMaP's ViT-L/14@336 (local weights), a tiny random one, or none."""
    out: Path = Path("edits/romap")
    """Output folder."""
    save_checkpoint: bool = True
    """Save the run with the edit as its newest checkpoint (ns-render and the viewer then show it)."""


def run(cmd: RoMaPEditCommand) -> Dict[str, float]:
    from gsstudio_ext.methods.base.training import load_run, save_run_checkpoint
    from gsstudio_ext.methods.romap.edit_eval import evaluate_edit
    from gsstudio_ext.models.image_text import TinyImageTextConfig

    config, pipeline = load_run(Path(cmd.run))
    model = pipeline.model
    editor_config = model.config.editor
    if cmd.provider != "run":
        editor_config.edit_target = cmd.provider
    if cmd.steps > 0:
        editor_config.edit.steps = cmd.steps
    with Progress(console=CONSOLE, transient=True) as bar:
        if cmd.parts:
            task = bar.add_task("segmenting parts (3D-GALP)", total=editor_config.galp.steps)
            model.segment(
                cmd.parts, cmd.base_prompt or None, lambda step, total, loss: bar.update(task, completed=step)
            )
        task = bar.add_task(f"editing {cmd.part!r}", total=editor_config.edit.steps)
        pipeline.run_edit(cmd.part, cmd.prompt, lambda step, total, loss: bar.update(task, completed=step))
    out = Path(cmd.out)
    count = model.export_edited_ply(out / "edited.ply")
    eval_config = pipeline.config.edit_eval
    eval_config.clip = {"openclip": eval_config.clip, "tiny": TinyImageTextConfig(), "none": None}[cmd.clip]
    model.eval()
    result = evaluate_edit(model, pipeline.datamanager, eval_config)
    if result.before is not None:
        write_edit_report(out, result.metrics, result.before, result.after, result.masks2d, result.provider, cmd.prompt)
    if cmd.save_checkpoint:
        path = save_run_checkpoint(pipeline, config.get_checkpoint_dir())
        CONSOLE.print(f"checkpoint with the edit: {path}")
    CONSOLE.print(f"edited scene: {out / 'edited.ply'} ({count} Gaussians); report: {out}")
    CONSOLE.print(", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    return result.metrics


def entrypoint() -> None:
    run(tyro.cli(RoMaPEditCommand))


if __name__ == "__main__":
    entrypoint()
