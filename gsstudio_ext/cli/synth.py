"""``gs-synth``: write seeded synthetic tabletop scenes (nerfstudio datasets with exact ground-truth sidecars).

Examples::

    gs-synth --out data/synth                       # the default scene (96x96, 40 views, 6 objects)
    gs-synth --out data/synth --seed 3 --width 256 --height 256 --num-views 100
    gs-synth --out data/bench --num-scenes 8        # scene_000..scene_007 + scenes.json (train / unseen)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gsstudio_ext.data.synthetic import SCENES_FILE, SynthConfig, generate_scene, generate_scenes

CONSOLE = Console()


@dataclass
class SynthCommand:
    """Write synthetic tabletop scenes with exact ground truth."""

    out: Path
    """Output folder (a dataset; with --num-scenes > 1, a folder of datasets plus scenes.json)."""
    scene: Annotated[SynthConfig, tyro.conf.arg(name="")] = field(default_factory=SynthConfig)
    num_scenes: int = 1
    """Scenes to write; more than 1 writes <out>/scene_000 ... with seeds derived from --seed."""
    unseen_fraction: float = 0.25
    """Share of the scenes (the last ones, at least one) marked "unseen" in scenes.json."""
    overwrite: bool = False
    """Replace the generator's files in a non-empty --out (other files are left alone)."""


def _summary(folder: Path) -> Table:
    from gsstudio_ext.data.sidecars import read_expressions, read_scene_meta

    meta = read_scene_meta(folder)
    table = Table(title=f"{folder}", show_lines=False)
    for column in ("id", "name", "class", "colour", "size", "parts"):
        table.add_column(column)
    part_names = {p["id"]: p["name"] for p in meta["parts"]}
    for obj in meta["objects"]:
        parts = ", ".join(part_names[p] for p in obj["parts"])
        table.add_row(str(obj["id"]), obj["name"], obj["class"], obj["color"], obj["size"], parts)
    table.caption = f"{len(read_expressions(folder))} referring expressions"
    return table


def run(cmd: SynthCommand) -> list[Path]:
    """Generate what ``cmd`` asks for, with a progress bar; returns the scene folders."""
    cfg = cmd.scene
    start = time.perf_counter()
    columns = (TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=CONSOLE, transient=True) as bar:
        if cmd.num_scenes == 1:
            task = bar.add_task("rendering views", total=cfg.num_views)
            folders = [
                generate_scene(
                    cmd.out, cfg, overwrite=cmd.overwrite, progress=lambda done, total: bar.update(task, completed=done)
                )
            ]
        else:
            task = bar.add_task("rendering scenes", total=cmd.num_scenes * cfg.num_views)

            def step(scene: int, done: int, total: int) -> None:
                bar.update(task, completed=scene * total + done, description=f"scene {scene + 1}/{cmd.num_scenes}")

            folders = generate_scenes(cmd.out, cfg, cmd.num_scenes, cmd.unseen_fraction, cmd.overwrite, step)
    elapsed = time.perf_counter() - start
    n_eval = len(cfg.eval_indices())
    for folder in folders[:3]:
        CONSOLE.print(_summary(folder))
    if len(folders) > 3:
        CONSOLE.print(f"... and {len(folders) - 3} more scenes")
    CONSOLE.print(
        f"[green]Wrote {len(folders)} scene(s) to {cmd.out} in {elapsed:.1f} s[/green]: each {cfg.num_views} views "
        f"({cfg.num_views - n_eval} train / {n_eval} eval) at {cfg.width}x{cfg.height}, transforms.json, images/, "
        f"depths/ (uint16 mm), sparse_pc.ply ({cfg.num_points} points), sidecars/ (scene.json, expressions.json, "
        "instances/, semantics/, parts/)" + (f", {SCENES_FILE}" if cmd.num_scenes > 1 else "")
    )
    CONSOLE.print(f"Train on it: ns-train gsstudio-splatfacto --data {folders[0]}")
    return folders


def entrypoint() -> None:
    """Console script ``gs-synth``."""
    cmd = tyro.cli(SynthCommand)
    try:
        run(cmd)
    except (ValueError, FileExistsError) as err:
        CONSOLE.print(f"[red]gs-synth: {err}[/red]")
        raise SystemExit(2) from err


if __name__ == "__main__":
    entrypoint()
