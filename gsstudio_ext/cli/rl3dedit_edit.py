"""``gs-rl3dedit-edit``: scripted single-pass edits of a trained rl3dedit-ext run (on top of its latest edit).

Examples::

    gs-rl3dedit-edit --run outputs/scene/rl3dedit-ext/run/config.yml --instruction "make it look like bronze"
    gs-rl3dedit-edit --run .../config.yml --instruction "paint the mushroom red striped" --editor procedural

Writes to ``<out>``: ``edited.ply`` (the edited scene as 3DGS), the edit report (metrics JSON, Markdown, a
before/after grid PNG) and, unless ``--no-save-checkpoint``, a new checkpoint in the run so that ``ns-render
--rendered-output-names edited_rgb`` and the viewer show the edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal

import tyro
from rich.console import Console
from rich.progress import Progress

from gsstudio_ext.eval.part_editing import write_edit_report

CONSOLE = Console()


@dataclass
class RL3DEditCommand:
    """Edit a trained rl3dedit-ext run in one pass and write the edited .ply, a report and a checkpoint."""

    run: Path
    """config.yml of an rl3dedit-ext run."""
    instruction: str
    """The edit, e.g. "make it look like it is made of gold" (Kontext) or "red striped" (procedural)."""
    editor: Literal["run", "flux-kontext", "procedural"] = "run"
    """2D editor: the run's setting, FLUX.1-Kontext on the 3x3 grid (local weights), or the offline procedural one."""
    steps: int = 0
    """Refit steps; 0 = the run's setting (3,000)."""
    clip: Literal["openclip", "tiny", "none"] = "openclip"
    """CLIP for the report's CLIP-dir: ViT-L/14 (local weights), a tiny random one, or none."""
    out: Path = Path("edits/rl3dedit")
    """Output folder."""
    save_checkpoint: bool = True
    """Save the run with the edit as its newest checkpoint (ns-render and the viewer then show it)."""


def run(cmd: RL3DEditCommand) -> Dict[str, float]:
    from gsstudio_ext.methods.base.training import load_run, save_run_checkpoint
    from gsstudio_ext.methods.rl3dedit.edit_eval import evaluate_edit
    from gsstudio_ext.models.image_text import TinyImageTextConfig

    config, pipeline = load_run(Path(cmd.run))
    model = pipeline.model
    edit_config = model.config.edit
    if cmd.editor != "run":
        edit_config.editor = cmd.editor
    if cmd.steps > 0:
        edit_config.refit.steps = cmd.steps
    with Progress(console=CONSOLE, transient=True) as bar:
        task = bar.add_task(f"refitting to {cmd.instruction!r}", total=edit_config.refit.steps)
        record = model.edit(cmd.instruction, lambda step, total, loss: bar.update(task, completed=step))
    out = Path(cmd.out)
    count = model.export_edited_ply(out / "edited.ply")
    eval_config = pipeline.config.edit_eval
    eval_config.clip = {"openclip": eval_config.clip, "tiny": TinyImageTextConfig(), "none": None}[cmd.clip]
    model.eval()
    result = evaluate_edit(model, pipeline.datamanager, eval_config)
    if result.before is not None:
        write_edit_report(
            out, result.metrics, result.before, result.after, result.changed, record.provider, cmd.instruction,
            mask_name="changed pixels", title="Scene edit report",
        )  # fmt: skip
    if cmd.save_checkpoint:
        path = save_run_checkpoint(pipeline, config.get_checkpoint_dir())
        CONSOLE.print(f"checkpoint with the edit: {path}")
    CONSOLE.print(f"edited scene: {out / 'edited.ply'} ({count} Gaussians); report: {out}")
    CONSOLE.print(", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    return result.metrics


def entrypoint() -> None:
    run(tyro.cli(RL3DEditCommand))


if __name__ == "__main__":
    entrypoint()
