"""Run nerfstudio's Trainer in-process (demo, tests, benchmarks) and reload a finished run, on any device."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.models.base_model import Model
from nerfstudio.pipelines.base_pipeline import Pipeline

from gsstudio_ext.core.atomic import atomic_write


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_config(
    config: TrainerConfig,
    data: Path,
    output_dir: Path,
    max_steps: Optional[int] = None,
    device: Optional[str] = None,
    timestamp: str = "run",
) -> TrainerConfig:
    """A copy of ``config`` pointed at ``data``, writing under ``output_dir``, headless (tensorboard logs only)."""
    config = copy.deepcopy(config)
    config.pipeline.datamanager.data = Path(data)
    config.output_dir = Path(output_dir)
    config.timestamp = timestamp
    config.vis = "tensorboard"
    config.machine.device_type = device or default_device()
    config.machine.num_devices = 1
    if max_steps is not None:
        config.max_num_iterations = max_steps
        config.steps_per_save = max_steps
        config.steps_per_eval_all_images = max_steps + 1
        config.steps_per_eval_image = max_steps + 1
    return config


def train(config: TrainerConfig, on_setup: Optional[Callable[[Model], None]] = None) -> Tuple[Trainer, Path]:
    """Train to ``config.max_num_iterations`` and save; returns the trainer and the saved ``config.yml``.

    ``on_setup`` is called with the freshly built model before the first step.
    """
    if config.timestamp == "{timestamp}":
        config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    if on_setup is not None:
        on_setup(trainer.pipeline.model)
    trainer.train()
    return trainer, config.get_base_dir() / "config.yml"


def load_run(config_path: Path, test_mode: str = "test") -> Tuple[TrainerConfig, Pipeline]:
    """Reload a saved run for evaluation or rendering (nerfstudio's ``eval_setup``); clear error on a bad path."""
    from nerfstudio.utils.eval_utils import eval_setup

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"no run config at {config_path}: pass the config.yml written by ns-train")
    config, pipeline, _, _ = eval_setup(config_path, test_mode=test_mode)  # type: ignore[arg-type]
    return config, pipeline


def save_run_checkpoint(pipeline, checkpoint_dir: Path) -> Path:
    """Write the pipeline as the run's newest ``step-*.ckpt`` (one step after the latest), atomically."""
    checkpoint_dir = Path(checkpoint_dir)
    steps = [int(p.stem.split("-")[1]) for p in checkpoint_dir.glob("step-*.ckpt")]
    step = max(steps, default=0) + 1
    path = checkpoint_dir / f"step-{step:09d}.ckpt"
    state = {"step": step, "pipeline": pipeline.state_dict(), "optimizers": {}, "schedulers": {}, "scalers": {}}
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path
