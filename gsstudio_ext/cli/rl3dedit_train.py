"""``gs-rl3dedit-train``: GRPO fine-tuning of the RL3DEdit multi-view editor (a LoRA on FLUX.1-Kontext) on trained
scenes and a list of instructions.

Examples::

    gs-rl3dedit-train --scenes data/bear/gaussians.ply data/face/gaussians.ply --instructions instructions.txt
    gs-rl3dedit-train --scenes face=outputs/face/splatfacto/run/config.yml --transforms data/face/transforms.json \\
        --instructions instructions.txt --training.editor.model-name-or-path /models/FLUX.1-Kontext-dev
    torchrun --nproc-per-node 8 -m gsstudio_ext.cli.rl3dedit_train --scenes ... --instructions ...
    gs-rl3dedit-train --scenes ... --instructions ... --editor tiny --verifier reprojection --perceptual tiny  # offline

Each scene is a .ply, a nerfstudio run (folder, config.yml or .ckpt) with the cameras of its dataset's
``transforms.json`` (found next to the scene, or one ``--transforms`` per scene). The instruction file has one
instruction per line; ``[bear, face] text`` limits a line to the named scenes (``name=path`` names a scene; by default
a scene is named after its dataset folder). Writes ``<out>/lora.safetensors`` (load it with
``--training.editor.lora-path`` or ``KontextEditorConfig.lora_path``), ``<out>/checkpoints/`` and
``<out>/train_log.jsonl``.

``--editor``, ``--verifier`` and ``--perceptual`` pick the backends; the real ones take their settings from
``--training.editor.*``, ``--training.reward.verifier.*`` and ``--training.reward.perceptual.*``. Under torchrun
(WORLD_SIZE > 1) every rank trains on its own samples on its local GPU (NCCL; gloo on CPU) and the gradients are
averaged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
import torch.distributed as dist
import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gsstudio_ext.methods.rl3dedit.editor_training import EditorTrainingConfig, TrainingResult
from gsstudio_ext.methods.rl3dedit.rewards import ReprojectionVerifierConfig
from gsstudio_ext.methods.rl3dedit.training_samples import SampleSourceConfig

CONSOLE = Console()


@dataclass
class RL3DEditTrainCommand:
    """Fine-tune the multi-view editor's LoRA with GRPO (RL3DEdit, editing-methods.md §3.3-3.6)."""

    scenes: Tuple[str, ...]
    """Trained scenes: a .ply, a nerfstudio run folder, config.yml or .ckpt; ``name=path`` names one."""
    instructions: Path
    """Text file, one instruction per line; ``[scene, ...] text`` scopes a line; '#' starts a comment."""
    transforms: Tuple[Path, ...] = ()
    """The datasets' transforms.json (or folders), one per scene; empty = found next to each scene."""
    editor: Literal["flux-kontext", "tiny"] = "flux-kontext"
    """Editor: FLUX.1-Kontext-dev (--training.editor.*) or a tiny random one (tests, smoke runs)."""
    verifier: Literal["vggt", "reprojection"] = "vggt"
    """3D verifier: VGGT-1B (the paper's; --training.reward.verifier.*) or the offline reprojection stand-in."""
    perceptual: Literal["lpips-vgg", "tiny"] = "lpips-vgg"
    """Anchor-reward distance: LPIPS-VGG (--training.reward.perceptual.*) or a tiny random net."""
    out: Optional[Path] = None
    """Output folder; None = --training.output-dir."""
    updates: Optional[int] = None
    """GRPO updates per rank; None = --training.updates (None there: one epoch)."""
    device: Optional[str] = None
    """Device; None = the local GPU (cuda:LOCAL_RANK) when CUDA is available, else cpu."""
    training: EditorTrainingConfig = field(default_factory=EditorTrainingConfig)
    """Editor, LoRA, GRPO, reward and schedule settings."""
    samples: SampleSourceConfig = field(default_factory=SampleSourceConfig)
    """View sets, render size and shuffling of the training samples."""
    reprojection: ReprojectionVerifierConfig = field(default_factory=ReprojectionVerifierConfig)
    """Settings of the reprojection verifier (with --verifier reprojection)."""


def training_config(cmd: RL3DEditTrainCommand) -> EditorTrainingConfig:
    """The training config with the chosen backends, output folder and update count."""
    from gsstudio_ext.models.registry import kontext_editor_config, perceptual_config

    config = dataclasses.replace(cmd.training)
    reward = dataclasses.replace(config.reward)
    if cmd.editor == "tiny":
        config.editor = kontext_editor_config("tiny", lora_path=config.editor.lora_path)
    if cmd.verifier == "reprojection":
        reward.verifier = cmd.reprojection
    if cmd.perceptual == "tiny":
        reward.perceptual = perceptual_config("tiny")
    config.reward = reward
    if cmd.out is not None:
        config.output_dir = cmd.out
    if cmd.updates is not None:
        config.updates = cmd.updates
    return config


def _setup_distributed(requested: Optional[str]) -> Tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed from torchrun's environment when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if requested is not None:
        device = torch.device(requested)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)  # one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


def run(cmd: RL3DEditTrainCommand) -> TrainingResult:
    from gsstudio_ext.methods.rl3dedit.editor_training import train_editor
    from gsstudio_ext.methods.rl3dedit.training_samples import SampleSource, parse_scene_arg, read_instructions

    if cmd.transforms and len(cmd.transforms) != len(cmd.scenes):
        raise ValueError(f"give one --transforms per scene ({len(cmd.scenes)}), got {len(cmd.transforms)}")
    config = training_config(cmd)
    rank, world, device = _setup_distributed(cmd.device)
    try:
        transforms = list(cmd.transforms) or [None] * len(cmd.scenes)
        scenes = [parse_scene_arg(s, t) for s, t in zip(cmd.scenes, transforms)]
        source = SampleSource(cmd.samples, scenes, read_instructions(cmd.instructions), rank, world, device)
        if rank == 0:
            CONSOLE.print(
                f"{len(source)} samples ({len(source.scenes)} scenes, {len(source.instructions)} instructions), "
                f"{world} rank(s) on {device}; output {config.output_dir}"
            )
        with Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=CONSOLE, disable=rank != 0,
        ) as bar:  # fmt: skip
            task = bar.add_task("GRPO", total=None)

            def progress(update: int, total: int, stats: dict) -> None:
                text = f"GRPO reward {stats.get('reward_mean', float('nan')):.4f}"
                bar.update(task, completed=update, total=total, description=text)

            result = train_editor(config, source, progress, device)
        if rank == 0:
            CONSOLE.print(f"LoRA: {result.lora_path}; log: {result.log_path}")
        return result
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def entrypoint() -> None:
    run(tyro.cli(RL3DEditTrainCommand))


if __name__ == "__main__":
    entrypoint()
