"""Seeded synthetic tabletop scenes with exact ground truth (the ``gs-synth`` generator).

``generate_scene(out, SynthConfig(seed=0))`` writes one nerfstudio dataset (images, depth, initial points,
instance / semantic / part maps, scene.json, referring expressions); ``generate_scenes`` writes several that share
the class list, plus ``scenes.json`` with a train / unseen split. Same config -> byte-identical files.
Modules: catalogue (object recipes), layout (placement), cameras, render (pybullet), expressions, writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from gsstudio_ext.data.synthetic.catalogue import CLASSES, class_list
from gsstudio_ext.data.synthetic.config import SynthConfig
from gsstudio_ext.data.synthetic.writer import GAUSSIANS_NAME, Progress, prepare_output, write_json, write_scene

__all__ = ["SynthConfig", "generate_scene", "generate_scenes", "scene_seed", "CLASSES", "class_list"]

SCENES_FILE = "scenes.json"


def generate_scene(
    out_dir: Path, config: Optional[SynthConfig] = None, overwrite: bool = False, progress: Optional[Progress] = None
) -> Path:
    """Write one scene to ``out_dir`` and return it.

    Raises:
        ValueError: an impossible config (message lists every problem).
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    return write_scene(Path(out_dir), config or SynthConfig(), overwrite=overwrite, progress=progress)


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` in a multi-scene set made from ``seed`` (distinct per index, deterministic)."""
    return int(np.random.SeedSequence([seed, 100, index]).generate_state(1)[0])


def generate_scenes(
    out_dir: Path,
    config: Optional[SynthConfig] = None,
    num_scenes: int = 4,
    unseen_fraction: float = 0.25,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int, int], None]] = None,
) -> List[Path]:
    """Write ``num_scenes`` scenes to ``out_dir/scene_000 ...`` and ``out_dir/scenes.json``; return the folders.

    Scenes share ``config`` except the seed (see :func:`scene_seed`), hence the class list, and differ in objects
    and layout. The last ``max(1, round(num_scenes * unseen_fraction))`` scenes (none for a single scene) are split
    "unseen" (held out for generalisation), the others "train". ``progress(scene, done, total)`` per view.
    """
    config = config or SynthConfig()
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1 (got {num_scenes})")
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in [0, 1) (got {unseen_fraction})")
    config.check()
    out_dir = Path(out_dir)
    prepare_output(out_dir, overwrite, extra=(SCENES_FILE, "scene_[0-9][0-9][0-9]*"))
    num_unseen = 0 if num_scenes == 1 else max(1, round(num_scenes * unseen_fraction))
    entries: List[Dict[str, Any]] = []
    folders = []
    for i in range(num_scenes):
        name = f"scene_{i:03d}"
        scene_config = SynthConfig(**{**config.to_dict(), "seed": scene_seed(config.seed, i)})
        step = None if progress is None else (lambda done, total, i=i: progress(i, done, total))
        folder = write_scene(out_dir / name, scene_config, overwrite=overwrite, progress=step)
        folders.append(folder)
        entries.append(
            {
                "name": name,
                "path": name,
                "split": "unseen" if i >= num_scenes - num_unseen else "train",
                "seed": scene_config.seed,
                **({"gaussians": f"{name}/{GAUSSIANS_NAME}"} if config.fuse_gaussians else {}),
            }
        )
    write_json(
        out_dir / SCENES_FILE,
        {
            "version": 1,
            "generator": "gs-synth",
            "seed": config.seed,
            "classes": class_list(),
            "scenes": entries,
        },
    )
    return folders
